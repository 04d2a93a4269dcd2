"""What every attack shares: input checks, distortion measures, the result record.

Success rates are computed only over the images the model classified
correctly *before* the attack: an image that is already wrong needs no attack,
and counting it would inflate an untargeted success rate.
"""
from dataclasses import dataclass, field

import numpy as np

from ..backend import get_array_module, to_numpy
from ..losses import check_labels

# A pixel counts as changed (L0) when it moved by more than half a grey level
# of an 8-bit image: C&W's tanh change of variables moves untouched pixels by
# about 1e-7, which is no change a viewer, or JSMA's pixel count, would see.
L0_TOLERANCE = 0.5 / 255


def prepare(model, x, labels, targets=None):
    """Check shapes, place the batch on the model's device in its dtype.

    Parameters
    ----------
    x : (N, C, H, W) images in [0, 1]
    labels : (N,) int true classes
    targets : (N,) int target classes, or None for an untargeted attack

    Returns
    -------
    x, labels, targets on the model's array module (targets may be None)
    """
    xp = model.xp
    if not hasattr(x, "ndim") or x.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {getattr(x, 'shape', type(x).__name__)}")
    x_np = to_numpy(x)
    if x_np.size and (float(x_np.min()) < 0 or float(x_np.max()) > 1):
        raise ValueError(f"pixels must lie in [0, 1], got values in [{float(x_np.min())}, {float(x_np.max())}]")
    N = x.shape[0]
    x = xp.asarray(x_np, dtype=model.dtype)
    K = model.n_classes
    labels = _as_classes(labels, N, K, "labels")
    if targets is not None:
        targets = _as_classes(targets, N, K, "targets")
        if np.any(targets == labels):
            raise ValueError("a target class must differ from the image's true label "
                             f"({int(np.sum(targets == labels))} of {N} targets equal their label)")
    return x, xp.asarray(labels), (None if targets is None else xp.asarray(targets))


def _as_classes(c, N, K, what):
    """Class indices (N,) as a NumPy int64 array, checked by ``losses.check_labels``."""
    return check_labels(to_numpy(np.asarray(c) if isinstance(c, (list, tuple)) else c), N, K, what).astype(np.int64)


def batches(N, batch_size):
    """Slices of at most ``batch_size`` images."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(i, min(i + batch_size, N)) for i in range(0, N, batch_size)]


def distortions(x, x_adv):
    """Per-image L0 (pixels changed by more than ``L0_TOLERANCE``), L2 and Linf of x_adv - x.

    Returns
    -------
    l0 : (N,) int; l2 : (N,) float; linf : (N,) float (computed in float64)
    """
    d = (to_numpy(x_adv).astype(np.float64) - to_numpy(x).astype(np.float64)).reshape(len(x), -1)
    return ((np.abs(d) > L0_TOLERANCE).sum(axis=1),
            np.sqrt((d * d).sum(axis=1)),
            np.abs(d).max(axis=1) if d.shape[1] else np.zeros(len(x)))


@dataclass
class AttackResult:
    """The adversarial images of one attack run and everything measured about them.

    All arrays are NumPy, one entry per image (N).

    Attributes
    ----------
    attack, wrt, T : what ran and what it differentiated
    params : dict of the attack's settings
    x_adv : (N, C, H, W) adversarial images, pixels in [0, 1]
    labels : true classes; targets : target classes or None (untargeted)
    pred_before, pred_after : the model's predictions on x and on x_adv
    success : pred_after != labels (the untargeted criterion)
    target_reached : pred_after == targets, or None for an untargeted attack
    l0, l2, linf : distortions (see ``distortions``)
    iterations : gradient steps taken per image
    gradient_evals : backward passes (vector-Jacobian products) per image
    formulation : "exact" or "paper" (the published float32 arithmetic, see
        ``fgsm`` and ``jsma``), or None for an attack with only one (C&W)
    """
    attack: str
    wrt: str
    T: float
    params: dict
    x_adv: np.ndarray
    labels: np.ndarray
    targets: object
    pred_before: np.ndarray
    pred_after: np.ndarray
    success: np.ndarray
    target_reached: object
    l0: np.ndarray
    l2: np.ndarray
    linf: np.ndarray
    iterations: np.ndarray
    gradient_evals: np.ndarray
    extra: dict = field(default_factory=dict)
    formulation: object = None

    @property
    def targeted(self):
        return self.targets is not None

    @property
    def initially_correct(self):
        """(N,) bool: the model got the clean image right (only these count)."""
        return self.pred_before == self.labels

    @property
    def achieved(self):
        """(N,) bool: the attack's own goal (target reached, or label lost)."""
        return self.target_reached if self.targeted else self.success

    def summary(self):
        """Success rate over the initially correct images, with its denominator, and mean distortions."""
        ok = self.initially_correct
        won = self.achieved & ok
        n_ok, n_won = int(ok.sum()), int(won.sum())
        goal = "reached their target class" if self.targeted else "changed the prediction"
        out = {
            "attack": self.attack, "wrt": self.wrt, "T": self.T, "formulation": self.formulation,
            "targeted": self.targeted,
            "n_images": int(len(self.labels)), "n_correct": n_ok, "n_success": n_won,
            "success_rate": (n_won / n_ok) if n_ok else float("nan"),
            "untargeted_success_rate": (int((self.success & ok).sum()) / n_ok) if n_ok else float("nan"),
            "note": (f"success rate = attacks that {goal} / attacks on images the model classified "
                     f"correctly before the attack ({n_won} / {n_ok}; {len(self.labels) - n_ok} attacks on "
                     "misclassified clean images are not counted)"),
        }
        for name in ("l0", "l2", "linf", "iterations", "gradient_evals"):
            vals = getattr(self, name)[won]
            out[f"mean_{name}_successful"] = float(vals.mean()) if len(vals) else float("nan")
        out["params"] = dict(self.params)
        return out

    def to_json(self):
        """A JSON-able dict: the summary plus every per-image number (not the images)."""
        per_image = {k: getattr(self, k).tolist() for k in
                     ("labels", "pred_before", "pred_after", "success", "l0", "l2", "linf",
                      "iterations", "gradient_evals")}
        per_image["initially_correct"] = self.initially_correct.tolist()
        if self.targeted:
            per_image["targets"] = self.targets.tolist()
            per_image["target_reached"] = self.target_reached.tolist()
        return {"summary": self.summary(), "per_image": per_image, "extra": self.extra}


def make_result(attack, wrt, T, params, model, x, x_adv, labels, targets, pred_before,
                iterations, gradient_evals, extra=None, formulation=None):
    """Measure x_adv (predictions, success, distortions) and build the record."""
    xp = get_array_module(x_adv)
    pred_after = model.predict(xp.asarray(x_adv))
    labels, pred_before = to_numpy(labels), to_numpy(pred_before)
    targets = None if targets is None else to_numpy(targets)
    l0, l2, linf = distortions(x, x_adv)
    return AttackResult(
        attack=attack, wrt=wrt, T=float(T), params=params, x_adv=to_numpy(x_adv),
        labels=labels, targets=targets, pred_before=pred_before, pred_after=pred_after,
        success=pred_after != labels,
        target_reached=None if targets is None else pred_after == targets,
        l0=l0, l2=l2, linf=linf, iterations=to_numpy(iterations).astype(np.int64),
        gradient_evals=to_numpy(gradient_evals).astype(np.int64), extra=extra or {},
        formulation=formulation)

"""Transfer attacks: craft adversarial examples on one network, evaluate them on another.

The attacker differentiates a *source* network they can attack (typically the
standard T = 1 network, whose gradient nothing masks) and sends the result to
the *target* (say, a network trained at T = 100 and deployed at T = 1). The
target's gradient is never used, so its masking plays no role: Papernot et
al.'s own black-box work found defensive distillation no help against
transferred examples. A transfer that works where white-box attacks on the
target failed is the classic sign that those attacks were masked, not that the
target is robust.

The source attack is APGD (default; it keeps increasing the loss after the
first success and returns the highest-loss adversarial point, which crosses
the source's boundary by a wide margin and so transfers well) or PGD (which
stops at the first success on the source: just across the boundary, and
transfers less often). Success is counted, as everywhere, over the images the
*target* classified correctly.
"""
import numpy as np

from .apgd import apgd
from .common import make_result, prepare
from .pgd import pgd

SOURCE_ATTACKS = ("apgd", "pgd")


def transfer(source, target, x, labels, eps, attack="apgd", loss="ce", T=1.0, norm="linf", steps=100,
             targets=None, seed=0, batch_size=100, progress=False):
    """Adversarial examples from ``source``, measured on ``target``.

    Parameters
    ----------
    source : Sequential, the network the attack differentiates (e.g. the standard T = 1 one)
    target : Sequential, the network under evaluation; only its predictions are used
    x : (N, C, H, W) images in [0, 1]; labels : (N,) int
    eps : float >= 0, the budget (L-infinity; L2 with ``norm="l2"`` and APGD)
    attack : "apgd" (default) or "pgd" (L-infinity, step eps / 4, random start)
    loss : "ce" or "dlr" for APGD; PGD uses the cross-entropy
    T : temperature of the cross-entropy on the *source* (1: the source's deployed softmax)
    norm : "linf" or "l2" (APGD only)
    steps : int >= 1, iterations on the source
    targets : (N,) int or None
    seed, batch_size, progress : passed to the source attack

    Returns
    -------
    x_adv : (N, C, H, W) NumPy; result : AttackResult measured on the *target*,
        with ``extra["source_success"]`` (N,) whether the source itself was
        fooled (its goal reached), ``extra["source_summary"]``.
    """
    if attack not in SOURCE_ATTACKS:
        raise ValueError(f"the transfer attack crafts with one of {', '.join(SOURCE_ATTACKS)}, got {attack!r}")
    if attack == "pgd" and (norm != "linf" or loss != "ce"):
        raise ValueError(f"PGD here is L-infinity with the cross-entropy; got norm={norm!r}, loss={loss!r} "
                         "(use attack='apgd' for L2 or DLR)")
    # the target must read the same images and name the same classes as the source
    xs, _, _ = prepare(source, x, labels, targets)
    xt, labels_t, targets_t = prepare(target, x, labels, targets)
    Ks, Kt = int(source.logits(xs[:1]).shape[1]), int(target.logits(xt[:1]).shape[1])
    if Ks != Kt:
        raise ValueError(f"source and target must have the same classes: the source has {Ks}, the target {Kt}")
    if attack == "apgd":
        x_adv, src = apgd(source, x, labels, eps, norm=norm, loss=loss, T=T, steps=steps, targets=targets,
                          seed=seed, batch_size=batch_size, progress=progress)
    else:
        # PGD's usual step, eps / 4 (any positive step at eps = 0: the box holds x in place)
        x_adv, src = pgd(source, x, labels, eps, step=eps / 4 if eps > 0 else 1.0, steps=steps,
                         targets=targets, wrt="loss", T=T, random_start=True, seed=seed,
                         batch_size=batch_size, progress=progress)
    pred_before = target.predict(xt)
    params = dict(src.params, source_attack=src.attack)
    extra = {"source_success": np.asarray(src.achieved).tolist(), "source_summary": src.summary()}
    result = make_result(f"transfer-{src.attack}", src.wrt, src.T, params, target, xt,
                         target.xp.asarray(x_adv, dtype=target.dtype), labels_t, targets_t, pred_before,
                         iterations=src.iterations, gradient_evals=src.gradient_evals, extra=extra)
    return result.x_adv, result

"""The saturation, in one picture: one test digit seen by networks trained at T = 1, 20, 100.

For each network (the standard model, and the ``temperature`` recipe, or
``--recipes distilled``, at each higher T), all deployed at T = 1, one row:

1. the digit and the network's prediction;
2. its softmax at T = 1, as log10 p_i per class (float64, so the tiny
   probabilities are seen), with what float32 makes of it: the top
   probability rounds to exactly 1.0, the others to exactly 0;
3. the input gradient of the cross-entropy as deployed (float32, softmax at
   T = 1): at a high T it is exactly zero, or vanishingly small;
4. the same gradient with the logits rescaled by 1 / T_train (softmax(z / T),
   Carlini and Wagner's fix): it is back.

All gradient maps share one colour scale, so a vanishing gradient *looks*
blank; each panel prints the gradient's true L2 norm (float64, log space) and
how many of its 784 float32 entries are exactly zero.

Usage::

    python experiments/saturation.py --quick     # the models of grad_vs_T.py --quick
    python experiments/saturation.py             # the full study's models

Outputs in ``--out`` (default ``results/saturation`` or ``results/saturation_quick``):
``saturation.png``, ``saturation.csv`` and ``saturation.json``.
"""
import os

import numpy as np

from .. import functional as F
from ..attacks.magnitudes import LN10, float64_copy, log10_loss_grad_norms
from ..attacks.sources import loss_gradient
from ..backend import to_numpy
from ..cli import UsageError
from . import common

QUICK = {"T": [1, 20, 100], "train_size": 5000, "epochs": 3, "n": 100}
FULL = {"T": [1, 20, 100], "train_size": None, "epochs": 5, "n": 100}
COLUMNS = ["recipe", "T", "seed", "index", "label", "prediction", "top_prob_float32", "saturated",
           "zero_probs_float32", "log10_one_minus_top_prob", "log10_runner_up_prob", "logit_margin", "masked_zero_entries",
           "masked_log10_l2", "rescaled_zero_entries", "rescaled_log10_l2", "pixels"]


def look(model, x, y, T):
    """What one image shows a network trained at T: probabilities and both input gradients.

    Parameters
    ----------
    x : (1, 1, 28, 28) float32 image; y : (1,) int label; T : the training temperature

    Returns
    -------
    dict: log10 probabilities (float64, (K,)), float32 probabilities (K,),
    masked and rescaled float32 gradient maps (28, 28) and their true log10 L2 norms
    """
    xp = model.xp
    xd, yd = xp.asarray(x, dtype=model.dtype), xp.asarray(y)
    model64 = float64_copy(model)
    z64 = model64.logits(xd.astype(xp.float64))
    logp = F.log_softmax(z64, 1.0)                                   # the deployed softmax, T = 1
    log10_p = to_numpy(logp)[0] / LN10
    p32 = to_numpy(model.probabilities(xd, 1.0))[0]
    # log10(1 - p_top): the sum of the others in log space, without cancellation
    log10_one_minus_p = to_numpy(F.log_one_minus_p(logp, logp.argmax(axis=1)))[0] / LN10
    out = {"log10_p": log10_p, "p32": p32, "logits": to_numpy(z64)[0],
           "log10_one_minus_p": float(log10_one_minus_p)}
    for source, t in (("masked", 1.0), ("rescaled", T)):
        g, _ = loss_gradient(model, xd, yd, t)                       # float32, as an attacker gets it
        out[f"{source}_map"] = to_numpy(g)[0, 0]
        out[f"{source}_log10_l2"] = float(to_numpy(log10_loss_grad_norms(model64, xd, yd, t)["l2"])[0])
    return out


def pick_image(models, data, n, index=None):
    """``index`` if given, else the first of the first n test images every model gets right."""
    if index is not None:
        return index
    x, y = common.test_subset(data, n)
    ok = np.ones(len(y), dtype=bool)
    for model in models:
        ok &= to_numpy(model.predict(model.xp.asarray(x, dtype=model.dtype))) == y
    if not ok.any():
        raise ValueError(f"no image among the first {n} test images is classified correctly by every model; "
                         f"give --index")
    return int(np.flatnonzero(ok)[0])


def plot(views, x, y, path, settings):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = [v[f"{s}_map"] for v in views for s in ("masked", "rescaled")]
    # one scale for every map, set by the largest: a vanished gradient then looks blank
    vmax = max(float(np.abs(m).max()) for m in maps) or 1.0
    rows = len(views)
    fig, axes = plt.subplots(rows, 4, figsize=(16, 4.2 * rows), gridspec_kw={"width_ratios": [0.8, 1.4, 1, 1]},
                             layout="constrained")
    axes = np.atleast_2d(axes)
    for r, v in enumerate(views):
        ax = axes[r, 0]
        ax.imshow(x[0, 0], cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"{v['recipe']}, trained at T = {v['T']:g}\nlabel {v['label']}, predicted {v['prediction']}",
                     fontsize=10)
        ax.axis("off")

        ax = axes[r, 1]
        K = len(v["log10_p"])
        colors = ["tab:green" if k == v["prediction"] else "tab:gray" for k in range(K)]
        ax.bar(range(K), v["log10_p"], color=colors)
        # the predicted class's bar has height log10(p) ~ 0: mark it so it is not missed
        ax.plot([v["prediction"]], [0], "v", color="tab:green", ms=9, label="predicted class (log10 p ~ 0)")
        ax.legend(fontsize=8, loc="lower right")
        ax.set_xticks(range(K))
        ax.set_xlabel("class")
        ax.set_ylabel("log10 p_i (float64)")
        low = float(v["log10_p"].min())
        ax.set_ylim(min(low * 1.15, -1), max(1.0, -0.08 * low))
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(f"softmax at T = 1 (as deployed): true top p = 1 - 10^{v['log10_one_minus_p']:.1f}\n"
                     f"float32: top p = {v['p32'].max():.9g}{' exactly' if v['saturated'] else ''}, "
                     f"{v['zero_probs']} of {K - 1} others = 0", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)

        for c, source in ((2, "masked"), (3, "rescaled")):
            ax = axes[r, c]
            m = v[f"{source}_map"]
            im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            zeros = int((m == 0).sum())
            what = ("masked: d loss / dx,\nsoftmax at T = 1 as deployed" if source == "masked"
                    else f"rescaled: d loss / dx,\nsoftmax(z / {v['T']:g}) (C&W's fix)")
            ax.set_title(what, fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"true L2 norm 10^{v[f'{source}_log10_l2']:.1f} (float64)\n"
                          f"float32: {zeros} of {m.size} entries exactly 0", fontsize=9)
    fig.colorbar(im, ax=axes[:, 3].tolist(), shrink=0.8,
                 label="input-gradient entry (float32; one scale for all maps)")
    fig.suptitle(f"One test digit (index {views[0]['index']}): the softmax saturates and the input gradient "
                 f"vanishes as the training temperature grows ({settings['architecture']} network, "
                 f"{settings['epochs']} epochs on {settings['train_size'] or 55000} images)", fontsize=12)
    common.save_figure(fig, path)
    plt.close(fig)


def main():
    parser = common.make_parser(__doc__)
    common.add_common_options(parser, QUICK, FULL)
    parser.add_argument("--index", type=int, help="the test image to show (default: the first one every "
                                                  "model classifies correctly, among the first --n)")
    args = parser.parse_args()
    settings = common.settings_from(args, QUICK, FULL)
    if args.index is not None and not 0 <= args.index < 10000:
        raise UsageError(f"--index must be a test image in [0, 9999], got {args.index}")
    recipe = settings["recipes"][0]
    seed = settings["seeds"][0]
    out = args.out or os.path.join("results", "saturation_quick" if settings["quick"] else "saturation")
    common.check_output(out)                  # before any model is trained
    settings["recipes"], settings["seeds"] = [recipe], [seed]
    common.announce(settings, "saturation", seconds_per_model_quick=40, seconds_per_model_full=240)

    data = common.load_data(args)
    models = []
    for rec, T, s in common.grid(settings):
        model, meta = common.model_for(rec, T, s, settings, args, data)
        models.append((rec, T, model))
    index = pick_image([m for _, _, m in models], data, settings["n"], args.index)
    x, y = data.test_x[index:index + 1], data.test_y[index:index + 1]

    views, rows = [], []
    for rec, T, model in models:
        v = look(model, x, y, T)
        pred = int(np.argmax(v["log10_p"]))
        v.update(recipe=rec, T=T, index=index, label=int(y[0]), prediction=pred,
                 saturated=bool(v["p32"].max() == 1.0), zero_probs=int((v["p32"] == 0).sum()))
        views.append(v)
        others = np.delete(v["log10_p"], pred)
        z = np.sort(v["logits"])
        rows.append({"recipe": rec, "T": T, "seed": seed, "index": index, "label": int(y[0]), "prediction": pred,
                     "top_prob_float32": float(v["p32"].max()), "saturated": v["saturated"],
                     "zero_probs_float32": v["zero_probs"], "log10_one_minus_top_prob": v["log10_one_minus_p"],
                     "log10_runner_up_prob": float(others.max()),
                     "logit_margin": float(z[-1] - z[-2]),
                     "masked_zero_entries": int((v["masked_map"] == 0).sum()), "masked_log10_l2": v["masked_log10_l2"],
                     "rescaled_zero_entries": int((v["rescaled_map"] == 0).sum()),
                     "rescaled_log10_l2": v["rescaled_log10_l2"], "pixels": int(v["masked_map"].size)})

    common.write_csv(os.path.join(out, "saturation.csv"), rows, COLUMNS)
    common.write_json(os.path.join(out, "saturation.json"), {"settings": settings, "rows": rows,
                                                             "log10_probs": [v["log10_p"] for v in views]})
    plot(views, x, y, os.path.join(out, "saturation.png"), settings)
    print(f"\ntest image {index} (label {int(y[0])}), deployed at T = 1:")
    for r in rows:
        r["top_p"] = f"{r['top_prob_float32']:.9g}" + (" exactly" if r["saturated"] else "")
    common.print_table(rows, ["recipe", "T", "top_p", "zero_probs_float32", "log10_runner_up_prob",
                              "logit_margin", "masked_zero_entries", "masked_log10_l2", "rescaled_log10_l2"],
                       ["recipe", "T", "top p (f32)", "p == 0 (f32)", "log10 p runner-up", "logit margin",
                        "grad == 0 (of 784)", "log10 |grad| masked", "log10 |grad| rescaled"])
    print(f"\nwrote {out}/saturation.png, saturation.csv, saturation.json")
    return 0


"""``scratchnet evaluate``: test accuracy and softmax saturation of a saved model.

The measurement is ``scratchnet.training.evaluate``.
"""
import numpy as np

from . import data_options, device_option, temperature


DESCRIPTION = ("Evaluate a saved model on the 10,000 MNIST test images at T = 1: accuracy, confusion "
               "counts, the mean top probability, and the fraction of images whose top probability is "
               "exactly 1.0 in the model's dtype (float32).")


def add_parser(sub):
    """Register ``evaluate`` and its options."""
    p = sub.add_parser("evaluate", help="test accuracy and softmax saturation of a saved model",
                       description=DESCRIPTION)
    p.add_argument("model", metavar="MODEL.npz", help="a model .npz written by 'scratchnet train'")
    p.add_argument("--T", type=temperature, default=1.0, help="deployment temperature (default 1)")
    data_options(p)
    device_option(p, "evaluate")
    p.set_defaults(run=run)


def format_confusion(confusion):
    """The confusion counts as an aligned text table (rows: true class, columns: predicted)."""
    confusion = np.asarray(confusion)
    K = len(confusion)
    width = max(5, len(str(confusion.max())) + 1)
    lines = ["true\\pred" + "".join(f"{k:>{width}}" for k in range(K))]
    lines += [f"{i:>9}" + "".join(f"{c:>{width}}" for c in row) for i, row in enumerate(confusion)]
    return "\n".join(lines)


def run(args):
    """Print accuracy, saturation and the confusion counts of a saved model."""
    from ..data import load_mnist
    from ..model import load
    from ..training import evaluate
    model, meta = load(args.model, device=args.device)   # first, so a bad file fails before any data work
    data = load_mnist(args.data_dir, download=not args.no_download, validation=0)
    result = evaluate(model, data.test_x, data.test_y, T=args.T)
    if meta.get("recipe"):
        print(f"model: {meta['recipe']}, trained at T = {meta.get('T', 1):g}, seed {meta.get('seed')}, "
              f"{meta.get('epochs')} epochs")
    print(f"test accuracy: {100 * result['accuracy']:.2f} % ({round(result['accuracy'] * result['n'])} / {result['n']})")
    print(f"at T = {args.T:g} ({result['dtype']}): mean top probability {result['mean_max_probability']:.6f}; "
          f"top probability exactly 1.0 for {100 * result['saturated_fraction']:.2f} % of the images; "
          f"mean logit margin {result['mean_logit_margin']:.2f}")
    print("confusion counts:")
    print(format_confusion(result["confusion"]))
    return 0

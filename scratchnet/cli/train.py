"""``scratchnet train``: train a model with one of the study's recipes, through the cache.

The recipes are ``scratchnet/recipes.py``; the cache that keeps every trained
model once is ``scratchnet/cache.py``.
"""
from . import (UsageError, data_options, device_option, learning_rate, output_file, positive_int, random_seed,
               temperature)


def add_parser(sub):
    """Register ``train`` and its options."""
    from ..recipes import ARCHITECTURES, DEFAULT_EPOCHS, RECIPES
    from ..training import DEFAULT_LR, MAX_LR, OPTIMIZERS
    p = sub.add_parser(
        "train", help="train a model with one of the three recipes (or fetch it from the cache)",
        description="Train a model with one of the study's recipes and deploy it at T = 1. "
                    "Trained models are cached by recipe, T, seed and every training setting, "
                    "so asking again returns the cached model unless --force is given.")
    p.add_argument("--recipe", required=True, choices=RECIPES,
                   help="standard: hard labels at T = 1; temperature: hard labels, loss on softmax(z / T); "
                        "distilled: a temperature-T teacher's softmax(z / T) as soft labels for a student trained at T")
    p.add_argument("--T", type=temperature, default=None,
                   help="training temperature, from 1e-6 to 1e6 (what float32 can resolve; default 1; "
                        "required to be 1 for standard)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"epochs (default {DEFAULT_EPOCHS['standard']} for every recipe)")
    p.add_argument("--seed", type=random_seed, default=0,
                   help="seed for initialisation, shuffling and dropout, >= 0 (default 0)")
    data_options(p)
    p.add_argument("--out", type=output_file, default=None,
                   help="also write the deployed model to this .npz path (its folder is checked first)")
    p.add_argument("--cache-dir", default=None,
                   help="model cache folder (default $SCRATCHNET_CACHE, then ~/.cache/scratchnet/models)")
    p.add_argument("--force", action="store_true", help="retrain even if the model is cached")
    p.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="papernot",
                   help="papernot: the study's network (default); small: a fast one for quick checks")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="adam (default; warm-up + cosine decay) or sgd (momentum 0.9, learning rate multiplied by T)")
    p.add_argument("--lr", type=learning_rate, default=None,
                   help=f"peak learning rate, > 0 and at most {MAX_LR:g} (default {DEFAULT_LR['adam']} for adam, "
                        f"{DEFAULT_LR['sgd']} x T for sgd)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="mini-batch size (default 128)")
    p.add_argument("--train-size", type=positive_int, default=None,
                   help="use only the first N training images (default: all 55,000 after the validation split)")
    device_option(p, "train")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (default: bars on a terminal, one line per epoch in a log)")
    p.set_defaults(run=run)


def run(args):
    """Train (or fetch from the cache) the requested model and say where it is."""
    from ..cache import get_model
    from ..data import load_mnist
    from ..model import save
    from ..recipes import check_recipe
    if args.recipe != "standard" and args.T is None:
        raise UsageError(f"--recipe {args.recipe} needs a temperature: add --T (e.g. --T 20)")
    try:
        T = check_recipe(args.recipe, 1.0 if args.T is None else args.T)   # before any slow work
    except ValueError as e:
        raise UsageError(str(e)) from None
    data = load_mnist(args.data_dir, download=not args.no_download, progress=not args.quiet)
    model, meta = get_model(args.recipe, T, args.seed, args.epochs, architecture=args.architecture,
                            batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                            train_size=args.train_size, data=data, cache_dir=args.cache_dir,
                            force=args.force, device=args.device, progress=not args.quiet)
    print(f"{meta['recipe']} model, trained at T = {meta['T']:g}, seed {meta['seed']}, {meta['epochs']} epochs: "
          f"test accuracy {100 * meta['test_accuracy']:.2f} %"
          + ("" if meta.get("val_accuracy") is None else f", validation accuracy {100 * meta['val_accuracy']:.2f} %"))
    print(f"at T = 1, {100 * meta['test_saturated_fraction']:.1f} % of test images have a top probability "
          f"of exactly 1.0 (mean logit margin {meta['test_mean_logit_margin']:.1f})")
    print(f"cached at {meta['path']}")
    if args.out:
        meta = {k: v for k, v in meta.items() if k != "path"}
        save(model, args.out, meta)
        print(f"written to {args.out}")
    return 0

"""The difference-of-logits ratio (DLR) loss of Croce and Hein (ICML 2020, arXiv 2003.01690).

With the logits of one image sorted in descending order, ``z_pi1 >= z_pi2 >= ...``::

    untargeted:  DLR(z, y)    = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)
    targeted:    DLR(z, y, t) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)

An attack *increases* DLR: the numerator is minus the margin of the true class,
so DLR > 0 exactly when the image is misclassified (untargeted), or when the
target beats the true class (targeted).

Why it beats a temperature: both the numerator and the denominator are
*differences* of logits, so a shift ``z + b`` cancels in each, and a positive
factor ``a z`` multiplies both and cancels in the ratio:
``DLR(a z + b) = DLR(z)`` for every a > 0. A network trained at temperature T
has logits about T times those of the standard network; DLR sees the two
alike. Cross-entropy at T = 1 does not: it exponentiates the T-fold logits,
saturates, and its gradient underflows to exactly zero (``sources.py``).

Its gradient w.r.t. the logits (below each forward formula in ``dlr_loss``)
scales as ``1 / a``, so ``d DLR / dx = (d DLR / dz) (dz / dx)`` has the same
size for the T-trained network (dz/dx about T times larger) as for the
standard one: the T cancels again, now between the two factors of the chain
rule. APGD then takes the sign (L-infinity) or the direction (L2) of that
gradient, so even a leftover scale would not matter; an exact zero would.
"""
from ..backend import get_array_module
from ..losses import one_hot

# Keeps the ratio finite when the top three logits coincide (an untrained or
# dead network); the paper's code adds the same constant.
DLR_EPS = 1e-12


def dlr_loss(z, labels, targets=None):
    """DLR values per image and their gradient w.r.t. the logits.

    Parameters
    ----------
    z : (N, K) logits, K >= 3 (untargeted) or K >= 4 (targeted)
    labels : (N,) int, the true classes y
    targets : (N,) int target classes t, or None for the untargeted loss

    Returns
    -------
    values : (N,) DLR(z_n), to be increased by the attack
    dz : (N, K) d values_n / d z_n

    Local derivative (a = numerator margin, D = denominator, e_i one-hot rows)::

        untargeted:  dDLR/dz = -(e_y - e_r) / D + a / D^2 (e_pi1 - e_pi3)
        targeted:    dDLR/dz = -(e_y - e_t) / D + a / D^2 (e_pi1 - (e_pi3 + e_pi4) / 2)

    where r is the best class other than y. Sorting is piecewise constant, so
    the derivative holds wherever no two of the logits involved tie.
    """
    xp = get_array_module(z)
    N, K = z.shape
    need = 3 if targets is None else 4
    if K < need:
        raise ValueError(f"the {'targeted ' if targets is not None else ''}DLR loss needs at least "
                         f"{need} classes (it reads the {need} largest logits), got {K}")
    rows = xp.arange(N)
    order = xp.argsort(-z, axis=1)               # pi_1, pi_2, ...: classes by decreasing logit
    z_sorted = z[rows[:, None], order]
    e_y = one_hot(labels, K, xp, z.dtype)
    e_pi1 = one_hot(order[:, 0], K, xp, z.dtype)
    e_pi3 = one_hot(order[:, 2], K, xp, z.dtype)
    z_y = z[rows, labels]
    if targets is None:
        # ----- untargeted -----
        rival = xp.where(e_y > 0, -xp.inf, z).argmax(axis=1)        # r = argmax_{i != y} z_i
        a = z_y - z[rows, rival]                                      # margin of y over its best rival
        D = z_sorted[:, 0] - z_sorted[:, 2] + z.dtype.type(DLR_EPS)   # z_pi1 - z_pi3: the scale
        values = -a / D                                               # a / D: the scale of z cancels here
        # d(-a/D) = -da / D + a dD / D^2, with da = e_y - e_r and dD = e_pi1 - e_pi3
        e_r = one_hot(rival, K, xp, z.dtype)
        dz = -(e_y - e_r) / D[:, None] + (a / (D * D))[:, None] * (e_pi1 - e_pi3)
        return values, dz
    # ----- targeted -----
    e_t = one_hot(targets, K, xp, z.dtype)
    e_pi4 = one_hot(order[:, 3], K, xp, z.dtype)
    a = z_y - z[rows, targets]                                        # margin of y over the target
    D = z_sorted[:, 0] - (z_sorted[:, 2] + z_sorted[:, 3]) / 2 + z.dtype.type(DLR_EPS)
    values = -a / D                                                   # the scale cancels in the ratio
    # da = e_y - e_t;  dD = e_pi1 - (e_pi3 + e_pi4) / 2
    dz = -(e_y - e_t) / D[:, None] + (a / (D * D))[:, None] * (e_pi1 - (e_pi3 + e_pi4) / 2)
    return values, dz


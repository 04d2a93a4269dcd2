"""Adversarial attacks, and the input gradients and diagnostics they rest on.

* ``sources``: every quantity an attack differentiates (loss, probabilities
  at T, logits), by explicit backprop;
* ``magnitudes``: the true size of those gradients, in log space.
* ``diagnostics``: why a gradient vanished, image by image (p == 1.0, exact
  zeros, the logit margin and the suppression it predicts).
* ``fgsm``, ``pgd``, ``jsma``, ``cw``: the attacks, batched, pixels in [0, 1].
* ``apgd`` (with ``dlr``), ``square``, ``transfer``: the adaptive evaluation --
  APGD with cross-entropy or the scale-invariant DLR loss, the gradient-free
  Square attack, and examples crafted on one network and sent to another
  (APGD picks its objective with ``loss=``, Square its scores with ``output=``).
* ``indicators``: the six indicators of attack failure, and ``evaluate``.

The ``scratchnet attack`` command line is ``scratchnet/cli/attack.py``.

Every attack takes ``wrt=`` ("probs" | "logits" | "loss") and ``T=``: point it
at the saturated softmax (what Papernot et al. measured) or at the logits /
softmax(z / T_train) (Carlini and Wagner's fix) on the same model.
"""
from .common import AttackResult, distortions
from .apgd import apgd
from .cw import cw_l2
from .diagnostics import gradient_diagnostics, summarize, summarize_by_correctness, compare_suppression
from .fgsm import fgsm
from .magnitudes import log10_loss_grad_norms, log10_probs_jacobian_norms
from .sources import attack_gradient, jacobian, loss_gradient, objective_gradient, vjps
from .jsma import jsma
from .pgd import pgd
from .square import square_linf
from .transfer import transfer
from . import indicators

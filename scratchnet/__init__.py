"""scratchnet: a convolutional network written by hand, to show why a high
softmax temperature hides the input gradient (defensive distillation as
gradient masking)."""
from .backend import get_array_module, resolve_device, to_device, to_numpy
from .losses import softmax_cross_entropy
from .model import ModelFileError, Sequential, load, papernot_mnist, save

__version__ = "0.1.0"

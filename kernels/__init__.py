"""The kernel registry: ``get(name, xp)`` returns the implementation of a hot
kernel for the array module ``xp``.

Three implementations of each kernel share one signature:

=============  ======================  ==========================================
table          module                  used for
=============  ======================  ==========================================
``reference``  ``kernels/reference``   the specification; tests compare to it
``cpu``        ``kernels/cpu``         NumPy arrays (Numba, parallel over cores)
``gpu``        ``kernels/gpu``         CuPy arrays (CUDA, compiled once, cached)
=============  ======================  ==========================================

Layer code calls ``kernels.get("conv2d_forward", xp)(x, ...)`` and never
branches on the device itself. The GPU table is filled on first use, so
importing scratchnet never requires CuPy.

The whole-layer convolution (``conv2d_forward``, ``conv2d_backward``) is a
kernel too, so that the CPU can pick its algorithm (Winograd F(2x2, 3x3) for
3x3 filters at stride 1, im2col one image per thread otherwise) and never
build the batch's whole im2col matrix; so is ReLU, which the CPU does in one
parallel pass. An implementation that lacks these (the GPU) gets the generic
versions below: its own im2col / col2im with its array module's matrix
product, and ReLU from array operators, exactly as in ``kernels/reference.py``.
A kernel an implementation has neither of its own nor generically (the CPU's
batch im2col / col2im, which its convolutions never need) is the reference's.

Why ``scratchnet.kernels``: the folder ``kernels/`` sits at the top of the
repository, beside ``scratchnet/``, because it is half of the design (the hot
loops, apart from the layers that call them). But PyPI already has a
distribution named ``kernels``; had scratchnet installed a top-level package of
that name, it would have replaced that one, or been hidden by it. So the
folder is imported and installed as ``scratchnet.kernels``: setup.cfg maps the
package onto ``kernels/`` (``package_dir``), and in the source tree
``scratchnet/kernels`` is a symbolic link to it, so the same import works from a
checkout, an editable install and a wheel. Inside the folder, imports are
relative (``from . import reference``).
"""
import numpy as np

from . import reference

NAMES = ("im2col", "col2im", "maxpool_forward", "maxpool_backward", "conv2d_forward", "conv2d_backward",
         "relu_forward", "relu_backward")

_tables = {"reference": {name: getattr(reference, name) for name in NAMES}}


def _generic_kernels(im2col, col2im):
    """conv2d_* as in kernels.reference, on another implementation's im2col / col2im;
    relu_* from array methods that NumPy and CuPy share."""

    def conv2d_forward(x, W, b, stride, pad):
        return reference.conv2d_forward(x, W, b, stride, pad, im2col=im2col)

    def conv2d_backward(dy, x, W, stride, pad, param_grads=True, need_dx=True):
        return reference.conv2d_backward(dy, x, W, stride, pad, param_grads, need_dx, im2col=im2col, col2im=col2im)

    def relu_forward(x):
        return x.clip(0, None)                    # max(x, 0), NaN kept, with array methods only

    return {"conv2d_forward": conv2d_forward, "conv2d_backward": conv2d_backward,
            "relu_forward": relu_forward, "relu_backward": reference.relu_backward}


def _table(impl):
    if impl not in _tables:
        if impl == "cpu":
            from . import cpu as module
        elif impl == "gpu":
            from . import gpu as module
        else:
            raise ValueError(f"unknown kernel implementation {impl!r}; expected 'reference', 'cpu' or 'gpu'")
        table = {name: getattr(module, name) for name in NAMES if hasattr(module, name)}
        if "im2col" in table:
            generic = _generic_kernels(table["im2col"], table["col2im"])
            table.update({name: generic[name] for name in generic if name not in table})
        # what is still missing (the CPU's batch im2col / col2im: its convolution
        # unfolds one image at a time inside conv2d_*) is the reference version
        table.update({name: _tables["reference"][name] for name in NAMES if name not in table})
        _tables[impl] = table
    return _tables[impl]


def get(name, xp=np, impl=None):
    """The kernel ``name`` for arrays of module ``xp``.

    Parameters
    ----------
    name : one of ``NAMES``
    xp : numpy or cupy; picks 'cpu' for numpy and 'gpu' for cupy
    impl : 'reference', 'cpu' or 'gpu' to ask for one implementation explicitly
    """
    if name not in NAMES:
        raise ValueError(f"unknown kernel {name!r}; expected one of {', '.join(NAMES)}")
    if impl is None:
        impl = "cpu" if xp is np else "gpu"
    return _table(impl)[name]


# ===== JSMA's pixel-pair search =====
#
# ``get("jsma_pair_search", xp)``: the fused Numba search on the CPU; on the GPU
# the reference itself, whose chunked array code runs on CuPy as it is
# (``kernels/gpu.py`` takes it from ``kernels/reference.py``).

NAMES = NAMES + ("jsma_pair_search",)
_tables["reference"]["jsma_pair_search"] = reference.jsma_pair_search

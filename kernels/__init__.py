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

Layer code calls ``kernels.get("im2col", xp)(x, ...)`` and never branches on the
device itself. The GPU table is filled on first use, so importing scratchnet
never requires CuPy.
"""
import numpy as np

from . import reference

NAMES = ("im2col", "col2im", "maxpool_forward", "maxpool_backward")

_tables = {"reference": {name: getattr(reference, name) for name in NAMES}}


def _table(impl):
    if impl not in _tables:
        if impl == "cpu":
            from . import cpu as module
        elif impl == "gpu":
            from . import gpu as module
        else:
            raise ValueError(f"unknown kernel implementation {impl!r}; expected 'reference', 'cpu' or 'gpu'")
        _tables[impl] = {name: getattr(module, name) for name in NAMES}
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

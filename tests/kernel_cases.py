"""Shapes every kernel implementation is checked on against kernels/reference.py:
odd sizes, non-square windows, strides above 1, paddings up to the window size,
and windows that do not tile the image exactly."""

# (N, C, H, W, KH, KW, stride, pad)
CONV_CASES = [
    (1, 1, 5, 5, 3, 3, 1, 0),
    (2, 3, 7, 6, 3, 2, 1, 1),
    (3, 2, 9, 11, 3, 3, 2, 1),
    (2, 5, 8, 7, 2, 3, 3, 2),
    (1, 4, 6, 6, 5, 5, 1, 2),
    (2, 1, 28, 28, 3, 3, 1, 0),
]

# (N, C, H, W, KH, KW, stride)
POOL_CASES = [
    (2, 3, 8, 8, 2, 2, 2),
    (1, 2, 7, 9, 2, 2, 2),      # odd size: the last row and column are never pooled
    (2, 2, 7, 7, 3, 3, 2),      # overlapping windows
    (1, 3, 6, 5, 2, 3, 1),
    (3, 1, 9, 9, 3, 3, 3),
]

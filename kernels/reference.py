"""The specification: plain NumPy versions of the four hot kernels.

These are slow but obviously right. Every fast kernel (``kernels/cpu.py`` on
Numba, ``kernels/gpu.py`` on CUDA) has exactly the same signature and is tested
against the function of the same name here.

Layouts (NCHW throughout)
-------------------------
im2col turns an input ``x`` of shape (N, C, H, W) into a matrix ``cols`` of
shape (N * OH * OW, C * KH * KW): one row per output pixel ``(n, oh, ow)``
(row-major), one column per weight ``(c, kh, kw)`` (row-major), so that a
convolution is one matrix product ``cols @ W.reshape(F, -1).T``.
Zero padding ``pad`` is added on every side; the window moves by ``stride``.

Max pooling keeps, for every output pixel, the flat position ``kh * KW + kw``
of the maximum inside its window (the first one on ties); the backward pass
sends each incoming gradient back to that position.
"""
import numpy as np


def output_size(size, k, stride, pad):
    """Number of window positions along one axis: (size + 2 pad - k) // stride + 1."""
    return (size + 2 * pad - k) // stride + 1


# ===== im2col / col2im =====

def im2col(x, KH, KW, stride, pad):
    """Unfold every KHxKW window of ``x`` into one row.

    Parameters
    ----------
    x : (N, C, H, W) array
    KH, KW : int, window size
    stride, pad : int

    Returns
    -------
    cols : (N * OH * OW, C * KH * KW) array, same dtype as x
    """
    N, C, H, W = x.shape
    OH, OW = output_size(H, KH, stride, pad), output_size(W, KW, stride, pad)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = np.empty((N, OH, OW, C, KH, KW), dtype=x.dtype)
    for kh in range(KH):
        for kw in range(KW):
            # every output pixel's (kh, kw) tap, for all of them at once
            window = xp[:, :, kh:kh + stride * OH:stride, kw:kw + stride * OW:stride]
            cols[:, :, :, :, kh, kw] = window.transpose(0, 2, 3, 1)
    return cols.reshape(N * OH * OW, C * KH * KW)


def col2im(cols, x_shape, KH, KW, stride, pad):
    """Adjoint of im2col: add every column entry back onto the pixel it came from.

    Parameters
    ----------
    cols : (N * OH * OW, C * KH * KW) array
    x_shape : (N, C, H, W), the shape of the image im2col unfolded

    Returns
    -------
    x : (N, C, H, W) array; a pixel covered by several windows gets their sum
    """
    N, C, H, W = x_shape
    OH, OW = output_size(H, KH, stride, pad), output_size(W, KW, stride, pad)
    c6 = cols.reshape(N, OH, OW, C, KH, KW)
    xp = np.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=cols.dtype)
    for kh in range(KH):
        for kw in range(KW):
            xp[:, :, kh:kh + stride * OH:stride, kw:kw + stride * OW:stride] += \
                c6[:, :, :, :, kh, kw].transpose(0, 3, 1, 2)
    return xp[:, :, pad:pad + H, pad:pad + W]


# ===== max pooling =====

def maxpool_forward(x, KH, KW, stride):
    """Maximum over each KHxKW window (no padding).

    Parameters
    ----------
    x : (N, C, H, W) array

    Returns
    -------
    y : (N, C, OH, OW) array, the window maxima
    argmax : (N, C, OH, OW) int64, flat position kh * KW + kw of the maximum
        inside its window; the first (lowest) position wins a tie
    """
    N, C, H, W = x.shape
    OH, OW = output_size(H, KH, stride, 0), output_size(W, KW, stride, 0)
    windows = np.empty((N, C, OH, OW, KH * KW), dtype=x.dtype)
    for kh in range(KH):
        for kw in range(KW):
            windows[..., kh * KW + kw] = x[:, :, kh:kh + stride * OH:stride, kw:kw + stride * OW:stride]
    argmax = windows.argmax(axis=-1)  # np.argmax returns the first maximum
    y = np.take_along_axis(windows, argmax[..., None], axis=-1)[..., 0]
    return y, argmax.astype(np.int64)


def maxpool_backward(dy, argmax, x_shape, KH, KW, stride):
    """Route each dy to the input pixel that won its window.

    Parameters
    ----------
    dy : (N, C, OH, OW) array, gradient w.r.t. the pooled output
    argmax : (N, C, OH, OW) int array from maxpool_forward
    x_shape : (N, C, H, W)

    Returns
    -------
    dx : (N, C, H, W) array; overlapping windows add up
    """
    N, C, H, W = x_shape
    _, _, OH, OW = dy.shape
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for kh in range(KH):
        for kw in range(KW):
            won = (argmax == kh * KW + kw)
            dx[:, :, kh:kh + stride * OH:stride, kw:kw + stride * OW:stride] += np.where(won, dy, 0)
    return dx


# ===== whole convolution layer (built from im2col) =====

def conv2d_forward(x, W, b, stride, pad, im2col=im2col):
    """Cross-correlation of x with F filters: one matrix product over im2col rows.

    Parameters
    ----------
    x : (N, C, H, W) array
    W : (F, C, KH, KW) array, the filters
    b : (F,) array, one bias per filter
    stride, pad : int
    im2col : the unfolding to use (this module's by default; the registry
        passes the GPU's to build the GPU convolution from these same lines)

    Returns
    -------
    y : (N, F, OH, OW) array,
        y[n, f, oh, ow] = b[f] + sum_{c, kh, kw} W[f, c, kh, kw] * x_pad[n, c, oh stride + kh, ow stride + kw]
    """
    N, _, H, Wd = x.shape
    F, C, KH, KW = W.shape
    OH, OW = output_size(H, KH, stride, pad), output_size(Wd, KW, stride, pad)
    cols = im2col(x, KH, KW, stride, pad)                  # (N*OH*OW, C*KH*KW)
    y = cols @ W.reshape(F, -1).T + b                      # (N*OH*OW, F)
    return y.reshape(N, OH, OW, F).transpose(0, 3, 1, 2).copy()   # NCHW, contiguous


def conv2d_backward(dy, x, W, stride, pad, param_grads=True, need_dx=True, im2col=im2col, col2im=col2im):
    """Gradients of conv2d_forward: the same matrix product, transposed.

    Parameters
    ----------
    dy : (N, F, OH, OW) array, gradient w.r.t. y
    x : (N, C, H, W) array, the forward pass's input
    W : (F, C, KH, KW) array
    param_grads : bool; False skips dW and db (returned as None) when only dx is wanted
    need_dx : bool; False skips dx (returned as None): a network's first layer,
        in training, has no layer below it to pass dx to
    im2col, col2im : the unfolding and its adjoint (see ``conv2d_forward``)

    Returns
    -------
    dx : (N, C, H, W) = col2im(dy W);  dW : (F, C, KH, KW) = dy^T im2col(x);  db : (F,) = sum of dy
    """
    F, C, KH, KW = W.shape
    dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, F)          # (N*OH*OW, F), rows ordered as im2col's
    dx = col2im(dy2 @ W.reshape(F, -1), x.shape, KH, KW, stride, pad) if need_dx else None
    if not param_grads:
        return dx, None, None
    dW = (dy2.T @ im2col(x, KH, KW, stride, pad)).reshape(W.shape)
    db = dy2.sum(axis=0)
    return dx, dW, db


# ===== Winograd F(2x2, 3x3): the same 3x3 convolution with fewer multiplications =====
#
# Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016
# (arXiv:1509.09308). Cut the output into 2x2 tiles; each needs the 4x4 input
# tile d around it. For one channel and one filter g (3x3) the tile is
#
#     Y = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise, 4x4)
#
# Summed over channels, the elementwise product becomes, for each of the 16
# positions (a, b) of the 4x4 tile, one matrix product over channels:
# M[a, b] (F, tiles) = U[a, b] (F, C) @ V[a, b] (C, tiles). So a 2x2 output tile
# costs 16 multiply-adds per (channel, filter) instead of 2 * 2 * 9 = 36: 2.25x
# fewer. The transforms with B^T, G and A^T only add and halve numbers, and are
# done once per tile and channel (or filter), not once per channel *and* filter.

WINOGRAD_BT = np.array([[1, 0, -1, 0],
                        [0, 1, 1, 0],
                        [0, -1, 1, 0],
                        [0, 1, 0, -1]], dtype=np.float64)   # input tile  d (4x4) -> B^T d B
WINOGRAD_G = np.array([[1, 0, 0],
                       [0.5, 0.5, 0.5],
                       [0.5, -0.5, 0.5],
                       [0, 0, 1]], dtype=np.float64)       # filter      g (3x3) -> G g G^T
WINOGRAD_AT = np.array([[1, 1, 1, 0],
                        [0, 1, -1, -1]], dtype=np.float64)  # product     m (4x4) -> A^T m A (2x2)


def winograd_filters(W):
    """U = G g G^T for every filter and channel.

    Parameters
    ----------
    W : (F, C, 3, 3) array

    Returns
    -------
    U : (4, 4, F, C) array, W's dtype (computed in float64, so a float32 U is
        the correctly rounded transform)
    """
    U = np.einsum("ak,fckl,bl->abfc", WINOGRAD_G, W.astype(np.float64), WINOGRAD_G)
    return U.astype(W.dtype)


def winograd_filters_adjoint(dU, dtype):
    """dW = G^T dU G summed into the 3x3 filters: the gradient of ``winograd_filters``.

    Parameters
    ----------
    dU : (4, 4, F, C) array, gradient w.r.t. U

    Returns
    -------
    dW : (F, C, 3, 3) array of ``dtype``
    """
    dW = np.einsum("ak,abfc,bl->fckl", WINOGRAD_G, dU.astype(np.float64), WINOGRAD_G)
    return dW.astype(dtype)


def _winograd_tiles(x, pad, TH, TW, size):
    """The (size x size) tiles of x padded by ``pad``, one every 2 pixels:
    (N, C, H, W) -> (N, C, TH, TW, size, size); pixels past the image are zero."""
    N, C, H, W = x.shape
    xp = np.zeros((N, C, 2 * TH + size - 2, 2 * TW + size - 2), dtype=x.dtype)
    xp[:, :, pad:pad + H, pad:pad + W] = x
    tiles = np.lib.stride_tricks.sliding_window_view(xp, (size, size), axis=(2, 3))
    return tiles[:, :, ::2, ::2][:, :, :TH, :TW]


def winograd_conv3x3_forward(x, W, b, pad):
    """A 3x3, stride-1 convolution by Winograd F(2x2, 3x3); equals ``conv2d_forward(x, W, b, 1, pad)``.

    Parameters
    ----------
    x : (N, C, H, W) array
    W : (F, C, 3, 3) array
    b : (F,) array
    pad : int, zero padding on every side

    Returns
    -------
    y : (N, F, OH, OW) array, OH = H + 2 pad - 2; an odd OH or OW is computed as
        the next even size and cut back
    """
    N, C, H, Wd = x.shape
    OH, OW = H + 2 * pad - 2, Wd + 2 * pad - 2
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    d = _winograd_tiles(x, pad, TH, TW, 4)                                  # (N, C, TH, TW, 4, 4)
    V = np.einsum("ai,nctsij,bj->abncts", WINOGRAD_BT, d, WINOGRAD_BT)      # B^T d B
    U = winograd_filters(W)                                                 # G g G^T
    M = np.einsum("abfc,abncts->abnfts", U, V)                              # 16 products over channels
    Y = np.einsum("ia,abnfts,jb->nftisj", WINOGRAD_AT, M, WINOGRAD_AT)      # A^T m A
    y = Y.reshape(N, W.shape[0], 2 * TH, 2 * TW)[:, :, :OH, :OW] + b[:, None, None]
    return y.astype(np.result_type(x, W))


def winograd_conv3x3_backward(dy, x, W, pad, param_grads=True):
    """Gradients of ``winograd_conv3x3_forward``; equal ``conv2d_backward(dy, x, W, 1, pad)``.

    Every step of the forward pass is linear, so the backward pass runs the
    same algebra transposed. With Mbar = A dY A^T for every 2x2 tile dY of dy
    (the adjoint of Y = A^T M A):

        dV[a, b] = U[a, b]^T Mbar[a, b]        (the 16 products, transposed)
        dd = B dV B^T, added back onto the 4x4 input tile it came from
        dU[a, b] = sum over tiles of Mbar[a, b] V[a, b]^T,   dW = G^T dU G

    Parameters
    ----------
    dy : (N, F, OH, OW) array
    x : (N, C, H, W) array, the forward pass's input
    W : (F, C, 3, 3) array
    pad : int
    param_grads : bool; False skips dW and db (returned as None)

    Returns
    -------
    dx : (N, C, H, W);  dW : (F, C, 3, 3);  db : (F,)
    """
    N, C, H, Wd = x.shape
    OH, OW = dy.shape[2:]
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    dY = _winograd_tiles(dy, 0, TH, TW, 2)                                  # (N, F, TH, TW, 2, 2)
    Mbar = np.einsum("ai,nftsij,bj->abnfts", WINOGRAD_AT.T, dY, WINOGRAD_AT.T)   # A dY A^T
    dV = np.einsum("abfc,abnfts->abncts", winograd_filters(W), Mbar)        # U^T Mbar
    dd = np.einsum("ai,abncts,bj->nctsij", WINOGRAD_BT, dV, WINOGRAD_BT)    # B dV B^T
    dxp = np.zeros((N, C, 2 * TH + 2, 2 * TW + 2), dtype=dd.dtype)
    for i in range(4):                   # tiles overlap by two pixels: add, as col2im does
        for j in range(4):
            dxp[:, :, i:i + 2 * TH:2, j:j + 2 * TW:2] += dd[..., i, j]
    dx = dxp[:, :, pad:pad + H, pad:pad + Wd].astype(np.result_type(dy, W))
    if not param_grads:
        return dx, None, None
    d = _winograd_tiles(x, pad, TH, TW, 4)
    V = np.einsum("ai,nctsij,bj->abncts", WINOGRAD_BT, d, WINOGRAD_BT)
    dU = np.einsum("abnfts,abncts->abfc", Mbar, V)
    return dx, winograd_filters_adjoint(dU, dx.dtype), dy.sum(axis=(0, 2, 3))


# ===== ReLU =====

def relu_forward(x):
    """y = max(x, 0), elementwise; a NaN stays NaN (a diverged network must show it).

    Parameters
    ----------
    x : array of any shape

    Returns
    -------
    y : array, x's shape and dtype
    """
    return np.maximum(x, 0)


def relu_backward(dy, y):
    """dx = dy where y > 0, 0 elsewhere: y = relu(x) is positive exactly where x is,
    so the forward output serves as the mask and no separate mask is kept.

    Parameters
    ----------
    dy : array, gradient w.r.t. y
    y : array of dy's shape, relu_forward's output

    Returns
    -------
    dx : array, dy's shape and dtype
    """
    return dy * (y > 0)


# ===== JSMA's pixel-pair search =====
#
# This search is written once for NumPy and CuPy (the GPU runs it as it is);
# ``kernels/cpu.py`` has a fused Numba version that never forms the tables.

JSMA_PAIR_CHUNK = 8


def _array_module(a):
    """numpy, or cupy for a CuPy array (kernels/ does not import scratchnet)."""
    if type(a).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def jsma_pair_scale(g, rescale):
    """Each image's gradient divided by its largest |entry| (rescale=True), or g itself.

    Parameters
    ----------
    g : (n, P) float array
    rescale : bool

    Returns
    -------
    (n, P) array of g's dtype. A positive factor per image changes no
    comparison and no argmax, but products of tiny float32 gradients
    (1e-25 * 1e-25 = 1e-50, below float32's smallest number 1.4e-45) stop
    underflowing to 0. An all-zero image stays all zero.
    """
    if not rescale:
        return g
    xp = _array_module(g)
    m = xp.abs(g).max(axis=1, keepdims=True)
    return g / xp.where(m > 0, m, 1)


def jsma_pair_search(alpha, beta, domain, rescale=True, pair_chunk=JSMA_PAIR_CHUNK):
    """The best pixel pair of each image under JSMA's increasing-pixel saliency map.

    Papernot et al.'s Algorithm 3: over pairs p != q of pixels still in the
    domain, with A = alpha_p + alpha_q and B = beta_p + beta_q, keep the pair
    with the largest score -A * B among those with A > 0 and B < 0, starting
    from a best score of 0 and accepting only a strictly larger one.

    Parameters
    ----------
    alpha : (n, P) float, the target class's gradient per pixel
    beta : (n, P) float, the other classes' summed gradient per pixel
    domain : (n, P) bool, pixels that may still be increased
    rescale : bool. True: alpha and beta are first divided, per image, by their
        largest |entry| (``jsma_pair_scale``), so no product underflows (the
        "exact" formulation). False: the products are formed from the raw
        gradients in their own dtype (the "paper" formulation): where every
        admissible product underflows to 0, no pair has a positive score and
        none is returned, just as the published float32 search finds none.
    pair_chunk : int >= 1, images whose (P x P) tables exist at one time

    Returns
    -------
    p, q : (n,) int64 pixel indices, p < q, where found; 0 and 0 where not
    found : (n,) bool, True where some pair has a score > 0

    The score is formed as -max(A, 0) * min(B, 0): equal to -A * B = A * |B|
    where A > 0 and B < 0, and 0 everywhere else, so the conditions and the
    score take one pass each over the table.

    Ties: the first best pair in the order (p, q) with p < q, row by row (the
    scores are symmetric, so this is the first maximum of the full P x P table).

    Memory: about 8 bytes x P^2 x pair_chunk (two float32 tables A and B).
    """
    xp = _array_module(alpha)
    n, P = alpha.shape
    # A pixel outside the domain gets alpha = -inf and beta = +inf: every pair
    # containing it then has A = -inf, B = +inf, and a score of exactly 0.
    a = xp.where(domain, jsma_pair_scale(alpha, rescale), -xp.inf)
    b = xp.where(domain, jsma_pair_scale(beta, rescale), xp.inf)
    p_out = xp.zeros(n, dtype=xp.int64)
    q_out = xp.zeros(n, dtype=xp.int64)
    found = xp.zeros(n, dtype=bool)
    for s in range(0, n, pair_chunk):
        ac, bc = a[s:s + pair_chunk], b[s:s + pair_chunk]
        c = len(ac)
        A = ac[:, :, None] + ac[:, None, :]          # (c, P, P): alpha_p + alpha_q
        xp.maximum(A, 0, out=A)                      # raising p and q must help the target ...
        B = bc[:, :, None] + bc[:, None, :]          # (c, P, P): beta_p + beta_q
        xp.minimum(B, 0, out=B)                      # ... and hurt the other classes
        A *= B                                       # the product, in the gradients' dtype
        xp.negative(A, out=A)                        # the score -A * B = A * |B|, in place
        score = A.reshape(c, -1)
        score[:, ::P + 1] = 0                        # the diagonal p == q: not a pair
        best = score.argmax(axis=1)                  # the first maximum, row by row
        ok = score[xp.arange(c), best] > 0           # a score of 0 is no pair: the map is empty
        found[s:s + c] = ok
        p_out[s:s + c] = xp.where(ok, best // P, 0)
        q_out[s:s + c] = xp.where(ok, best % P, 0)
        del A, B, score
    return p_out, q_out, found

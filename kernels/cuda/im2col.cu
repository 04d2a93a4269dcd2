// im2col and col2im on the GPU: the CUDA twins of kernels/reference.py.
//
// Layouts (NCHW, every array C-contiguous):
//   x    : (N, C, H, W)
//   cols : (N * OH * OW, C * KH * KW); row (n, oh, ow), column (c, kh, kw), both row-major
//
// One thread per OUTPUT element, so no two threads ever write the same place and
// no atomics are needed. The loops are grid-stride loops: a launch with fewer
// threads than elements is still correct, each thread simply takes several.
// Sizes and indices are `long long` because CuPy passes a Python int as a
// long long, and because N * OH * OW * C * KH * KW can pass 2^31 for big batches.
//
// The kernels are written once as templates; the extern "C" entry points below
// give the float and double versions plain names that CuPy can look up.

template <typename T>
__device__ void im2col(const T* x, T* cols,
                       long long N, long long C, long long H, long long W,
                       long long KH, long long KW, long long OH, long long OW,
                       long long stride, long long pad)
{
    const long long K = C * KH * KW;              // length of one row of cols
    const long long total = N * OH * OW * K;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        // this thread writes cols[row, col]; split both back into their parts
        const long long row = i / K, col = i % K;
        const long long ow = row % OW, oh = (row / OW) % OH, n = row / (OW * OH);
        const long long kw = col % KW, kh = (col / KW) % KH, c = col / (KW * KH);
        // the input pixel under tap (kh, kw) of window (oh, ow); outside the image is padding
        const long long h = oh * stride - pad + kh;
        const long long w = ow * stride - pad + kw;
        const bool inside = 0 <= h && h < H && 0 <= w && w < W;
        cols[i] = inside ? x[((n * C + c) * H + h) * W + w] : T(0);
    }
}

template <typename T>
__device__ void col2im(const T* cols, T* x,
                       long long N, long long C, long long H, long long W,
                       long long KH, long long KW, long long OH, long long OW,
                       long long stride, long long pad)
{
    // A GATHER: each thread owns one pixel x[n, c, h, w] and adds up every
    // entry of cols that im2col copied from it (one per window covering it).
    const long long K = C * KH * KW;
    const long long total = N * C * H * W;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long w = i % W, h = (i / W) % H, c = (i / (W * H)) % C, n = i / (W * H * C);
        T acc = T(0);
        for (long long kh = 0; kh < KH; ++kh) {
            // window row oh puts pixel row h at tap kh when oh * stride - pad + kh == h
            const long long t = h + pad - kh;
            if (t < 0 || t % stride != 0 || t / stride >= OH) continue;
            const long long oh = t / stride;
            for (long long kw = 0; kw < KW; ++kw) {
                const long long u = w + pad - kw;
                if (u < 0 || u % stride != 0 || u / stride >= OW) continue;
                const long long ow = u / stride;
                acc += cols[((n * OH + oh) * OW + ow) * K + (c * KH + kh) * KW + kw];
            }
        }
        x[i] = acc;
    }
}

extern "C" __global__ void im2col_f32(const float* x, float* cols,
                                      long long N, long long C, long long H, long long W,
                                      long long KH, long long KW, long long OH, long long OW,
                                      long long stride, long long pad)
{
    im2col<float>(x, cols, N, C, H, W, KH, KW, OH, OW, stride, pad);
}

extern "C" __global__ void im2col_f64(const double* x, double* cols,
                                      long long N, long long C, long long H, long long W,
                                      long long KH, long long KW, long long OH, long long OW,
                                      long long stride, long long pad)
{
    im2col<double>(x, cols, N, C, H, W, KH, KW, OH, OW, stride, pad);
}

extern "C" __global__ void col2im_f32(const float* cols, float* x,
                                      long long N, long long C, long long H, long long W,
                                      long long KH, long long KW, long long OH, long long OW,
                                      long long stride, long long pad)
{
    col2im<float>(cols, x, N, C, H, W, KH, KW, OH, OW, stride, pad);
}

extern "C" __global__ void col2im_f64(const double* cols, double* x,
                                      long long N, long long C, long long H, long long W,
                                      long long KH, long long KW, long long OH, long long OW,
                                      long long stride, long long pad)
{
    col2im<double>(cols, x, N, C, H, W, KH, KW, OH, OW, stride, pad);
}

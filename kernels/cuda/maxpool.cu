// Max pooling forward and backward on the GPU: the CUDA twins of
// maxpool_forward / maxpool_backward in kernels/reference.py.
//
// Layouts (NCHW, every array C-contiguous):
//   x, dx          : (N, C, H, W)
//   y, dy, argmax  : (N, C, OH, OW); argmax is int64, the flat position
//                    kh * KW + kw of the maximum inside its window
//
// No padding. One thread per OUTPUT element (grid-stride loop), so no atomics;
// the backward pass is a gather, like col2im. Sizes are `long long`, the type
// CuPy gives a Python int.

template <typename T>
__device__ void maxpool_forward(const T* x, T* y, long long* argmax,
                                long long N, long long C, long long H, long long W,
                                long long KH, long long KW, long long OH, long long OW,
                                long long stride)
{
    const long long total = N * C * OH * OW;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long ow = i % OW, oh = (i / OW) % OH, nc = i / (OW * OH);
        const T* plane = x + nc * H * W;                 // image plane (n, c)
        const long long h0 = oh * stride, w0 = ow * stride;  // top-left corner of the window
        T best = plane[h0 * W + w0];
        long long best_k = 0;
        for (long long kh = 0; kh < KH; ++kh) {
            for (long long kw = 0; kw < KW; ++kw) {
                const T v = plane[(h0 + kh) * W + (w0 + kw)];
                if (v > best) {            // strict: the first maximum wins a tie, as np.argmax
                    best = v;
                    best_k = kh * KW + kw;
                }
            }
        }
        y[i] = best;
        argmax[i] = best_k;
    }
}

template <typename T>
__device__ void maxpool_backward(const T* dy, const long long* argmax, T* dx,
                                 long long N, long long C, long long H, long long W,
                                 long long KH, long long KW, long long OH, long long OW,
                                 long long stride)
{
    // A GATHER: each thread owns one input pixel dx[n, c, h, w] and adds the dy
    // of every window that covers it and whose maximum sat exactly here.
    const long long total = N * C * H * W;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long w = i % W, h = (i / W) % H, nc = i / (W * H);
        T acc = T(0);
        for (long long kh = 0; kh < KH; ++kh) {
            // window row oh covers pixel row h at tap kh when oh * stride + kh == h
            const long long t = h - kh;
            if (t < 0 || t % stride != 0 || t / stride >= OH) continue;
            const long long oh = t / stride;
            for (long long kw = 0; kw < KW; ++kw) {
                const long long u = w - kw;
                if (u < 0 || u % stride != 0 || u / stride >= OW) continue;
                const long long ow = u / stride;
                const long long j = (nc * OH + oh) * OW + ow;   // that window's output element
                if (argmax[j] == kh * KW + kw) acc += dy[j];
            }
        }
        dx[i] = acc;
    }
}

extern "C" __global__ void maxpool_forward_f32(const float* x, float* y, long long* argmax,
                                               long long N, long long C, long long H, long long W,
                                               long long KH, long long KW, long long OH, long long OW,
                                               long long stride)
{
    maxpool_forward<float>(x, y, argmax, N, C, H, W, KH, KW, OH, OW, stride);
}

extern "C" __global__ void maxpool_forward_f64(const double* x, double* y, long long* argmax,
                                               long long N, long long C, long long H, long long W,
                                               long long KH, long long KW, long long OH, long long OW,
                                               long long stride)
{
    maxpool_forward<double>(x, y, argmax, N, C, H, W, KH, KW, OH, OW, stride);
}

extern "C" __global__ void maxpool_backward_f32(const float* dy, const long long* argmax, float* dx,
                                                long long N, long long C, long long H, long long W,
                                                long long KH, long long KW, long long OH, long long OW,
                                                long long stride)
{
    maxpool_backward<float>(dy, argmax, dx, N, C, H, W, KH, KW, OH, OW, stride);
}

extern "C" __global__ void maxpool_backward_f64(const double* dy, const long long* argmax, double* dx,
                                                long long N, long long C, long long H, long long W,
                                                long long KH, long long KW, long long OH, long long OW,
                                                long long stride)
{
    maxpool_backward<double>(dy, argmax, dx, N, C, H, W, KH, KW, OH, OW, stride);
}

// Just enough of CUDA C for g++ to compile kernels/cuda/*.cu as plain C++, so
// that the tests can run the GPU kernels' index arithmetic on the CPU.
//
// The launch is simulated by tests/cuda_on_cpu.py: it calls shim_set_launch once,
// then, for every (block, thread) of the grid in turn, shim_set_thread followed
// by the kernel itself. Running the threads one after another is faithful only
// because the kernels share no memory and never synchronise; each thread writes
// its own output elements.
#pragma once

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct uint3 { unsigned int x, y, z; };

// the built-in variables of the thread being run (1-D launches only)
static uint3 threadIdx, blockIdx, blockDim, gridDim;

extern "C" void shim_set_launch(unsigned int grid, unsigned int block)
{
    gridDim = uint3{grid, 1, 1};
    blockDim = uint3{block, 1, 1};
}

extern "C" void shim_set_thread(unsigned int block, unsigned int thread)
{
    blockIdx = uint3{block, 0, 0};
    threadIdx = uint3{thread, 0, 0};
}

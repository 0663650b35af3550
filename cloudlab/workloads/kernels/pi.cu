// Monte Carlo pi on a GPU: the same samples as cloudlab.workloads.pi's CPU kernels.
//
// Sample i of a run: block b = i / 2^20 takes the key (c, m) = SplitMix64(key + b * GAMMA)
// split in two 32-bit halves (m odd); the sample is u = lowbias32(c + (i mod 2^20) * m),
// whose halves are the cell (x, y) of a 2^16 x 2^16 grid; the cell's centre is inside the
// quarter circle when x(x+1) <= ~(y(y+1)) in uint32 arithmetic. Everything happens in
// registers: each thread counts PER_THREAD consecutive samples, a warp adds its counts with
// shuffles, and one atomic per warp adds them to the total. No random numbers are stored,
// so the kernel is bound by integer multiplies, not memory bandwidth.
//
// The functions marked __host__ __device__ also compile for the CPU (a C++ compiler, with
// CLOUDLAB_HOST_TEST defined), where the tests check them against the NumPy reference, sample
// for sample; nvcc checks that the kernel compiles for the GPU.

typedef unsigned int u32;
typedef unsigned long long u64;

#define BLOCK_SHIFT 20
#define GAMMA 0x9E3779B97F4A7C15ULL
#define MIX1 0xBF58476D1CE4E5B9ULL
#define MIX2 0x94D049BB133111EBULL

__host__ __device__ inline void block_key(u64 key, u64 b, u32 *c, u32 *m) {
    u64 z = key + b * GAMMA;
    z = (z ^ (z >> 30)) * MIX1;
    z = (z ^ (z >> 27)) * MIX2;
    z = z ^ (z >> 31);
    *c = (u32)z;
    *m = (u32)(z >> 32) | 1u;
}

__host__ __device__ inline u32 inside(u32 u) {
    u32 h = (u ^ (u >> 16)) * 0x7FEB352Du;  // lowbias32 (Wellons' hash-prospector)
    h = (h ^ (h >> 15)) * 0x846CA68Bu;
    u32 x = h >> 16;
    u32 y = (h ^ x) & 0xFFFFu;
    return (x * (x + 1u)) <= ~(y * (y + 1u));
}

// Points inside among samples [i, end) of the stream `key`.
__host__ __device__ inline u32 count_range(u64 key, u64 i, u64 end) {
    u32 n = 0;
    while (i < end) {
        u64 b = i >> BLOCK_SHIFT;
        u64 block_end = (b + 1) << BLOCK_SHIFT;
        u32 steps = (u32)((block_end < end ? block_end : end) - i);
        u32 c, m;
        block_key(key, b, &c, &m);
        u32 u = c + (u32)(i & ((1ULL << BLOCK_SHIFT) - 1)) * m;
        for (u32 k = 0; k < steps; ++k) {
            n += inside(u);
            u += m;
        }
        i += steps;
    }
    return n;
}

#ifndef CLOUDLAB_HOST_TEST  // the tests compile the functions above with a C++ compiler
// Samples [start, stop), PER_THREAD per thread; *total += the points inside.
extern "C" __global__ void count_inside(u64 key, u64 start, u64 stop, u32 per_thread,
                                        u64 *total) {
    u64 first = start + (blockIdx.x * (u64)blockDim.x + threadIdx.x) * per_thread;
    u64 last = first + per_thread < stop ? first + per_thread : stop;
    u32 n = first < stop ? count_range(key, first, last) : 0u;
    for (int offset = 16; offset > 0; offset >>= 1)  // a warp's sum: at most 32 * per_thread
        n += __shfl_down_sync(0xFFFFFFFFu, n, offset);
    if ((threadIdx.x & 31) == 0 && n)
        atomicAdd(total, (u64)n);
}
#endif

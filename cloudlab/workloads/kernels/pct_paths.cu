// The system matrix's rows on a GPU: the same two passes as system.py's Numba kernels,
// one thread per history.
//
// count_paths: the hull entry and exit of each history and an upper bound of its samples
// (geometry: u0, t0, u2, t2, L, samples). fill_paths: walk each path (MLP, spline or
// straight chord) writing (pixel, chord) pairs from bound[r], merging consecutive samples
// in one pixel; lengths[r] = the pairs written. The arithmetic is system.py's, line for
// line, in double precision; chords accumulate in float32 as there.
//
// The functions marked __host__ __device__ also compile for the CPU (a C++ compiler, with
// CLOUDLAB_HOST_TEST defined): the tests compare them with the Numba kernels, row for row.

#ifdef CLOUDLAB_HOST_TEST
#include <cmath>
using std::ceil; using std::cos; using std::floor; using std::sin; using std::sqrt; using std::tan;
#endif

#define PHI 0
#define T_IN 1
#define THETA_IN 2
#define T_OUT 3
#define THETA_OUT 4
#define WEPL 5
#define FIELDS 6
#define PATH_MLP 0
#define PATH_SPLINE 1
#define WER 25.96

__host__ __device__ inline bool in_hull(const unsigned char *mask, int n, double pixel, double u,
                                        double t, double c, double s) {
    double x = u * c - t * s, y = u * s + t * c;
    int j = (int)floor(x / pixel + n / 2.0), i = (int)floor(y / pixel + n / 2.0);
    return 0 <= i && i < n && 0 <= j && j < n && mask[i * n + j];
}

__host__ __device__ inline void count_history(const double *h, const unsigned char *mask, int n,
                                              double pixel, double tracker, double step,
                                              double *geometry) {
    double reach = n * pixel / sqrt(2.0) + step;
    double c = cos(h[PHI]), s = sin(h[PHI]);
    double t_in = h[T_IN], tan_in = tan(h[THETA_IN]);
    double t_out = h[T_OUT], tan_out = tan(h[THETA_OUT]);
    geometry[5] = 0.0;
    double u0 = -reach;
    while (u0 < reach && !in_hull(mask, n, pixel, u0, t_in + (u0 + tracker) * tan_in, c, s))
        u0 += step;
    if (u0 >= reach)
        return;  // misses the hull
    double u2 = reach;
    while (u2 > u0 && !in_hull(mask, n, pixel, u2, t_out - (tracker - u2) * tan_out, c, s))
        u2 -= step;
    u0 = u0 - step / 2;
    u2 = u2 + step / 2;
    geometry[0] = u0;
    geometry[1] = t_in + (u0 + tracker) * tan_in;
    geometry[2] = u2;
    geometry[3] = t_out - (tracker - u2) * tan_out;
    geometry[4] = u2 - u0;
    geometry[5] = ceil((u2 - u0) / step);
}

// mlp.table_mlp: (t, theta) of the MLP at s = d / L from the tabulated coefficients.
__host__ __device__ inline void table_mlp(const double *table, int n_lengths, int n_s,
                                          double length_step, double length, double s,
                                          double t0, double th0, double t2, double th2,
                                          double *t, double *theta) {
    int last_length = n_lengths - 1, last_s = n_s - 1;
    double li = length / length_step + 0.5;
    li = li < 0.0 ? 0.0 : li;
    int i = (int)(li < last_length ? li : (double)last_length);
    double sc = s < 0.0 ? 0.0 : (s > 1.0 ? 1.0 : s);
    double x = sc * last_s;
    int j = (int)x < last_s - 1 ? (int)x : last_s - 1;
    double f = x - j, g = 1.0 - f;
    const double *lo = table + ((long long)i * n_s + j) * 8, *hi = lo + 8;
    double per_length = length > 0.0 ? 1.0 / length : 0.0;
    double c0 = g * lo[0] + f * hi[0], c1 = (g * lo[1] + f * hi[1]) * length;
    double c2 = g * lo[2] + f * hi[2], c3 = (g * lo[3] + f * hi[3]) * length;
    double c4 = (g * lo[4] + f * hi[4]) * per_length, c5 = g * lo[5] + f * hi[5];
    double c6 = (g * lo[6] + f * hi[6]) * per_length, c7 = g * lo[7] + f * hi[7];
    *t = c0 * t0 + c1 * th0 + c2 * t2 + c3 * th2;
    *theta = c4 * t0 + c5 * th0 + c6 * t2 + c7 * th2;
}

// Pairs written for one history from indices/chords[0]; 0 for a history without a row.
__host__ __device__ inline long long fill_history(const double *h, const double *geometry,
                                                  int n, double pixel, int kind,
                                                  const double *table, int n_lengths, int n_s,
                                                  double length_step, int *indices,
                                                  float *chords) {
    int samples = (int)geometry[5];
    if (samples == 0)
        return 0;
    double c = cos(h[PHI]), s = sin(h[PHI]);
    double u0 = geometry[0], t0 = geometry[1], length = geometry[4], t2 = geometry[3];
    double th0 = h[THETA_IN], th2 = h[THETA_OUT];
    double chord_length = sqrt(length * length + (t2 - t0) * (t2 - t0));
    double ratio = (h[WEPL] / WER) * (h[WEPL] / WER);
    double scale0 = (1.01 + 0.43 * ratio) * chord_length;
    double scale2 = (0.99 - 0.46 * ratio) * chord_length;
    double ca = cos(th0), sa = sin(th0), cb = cos(th2), sb = sin(th2);
    double step = length / samples;
    long long k = 0;
    int last = -1;
    for (int sample = 0; sample < samples; ++sample) {
        double f = (sample + 0.5) / samples;
        double u, t, chord;
        if (kind == PATH_MLP) {
            double d = f * length, theta, tn;
            table_mlp(table, n_lengths, n_s, length_step, length, f, t0, th0, t2, th2, &t, &theta);
            u = u0 + d;
            tn = tan(theta);
            chord = step * sqrt(1.0 + tn * tn);
        } else if (kind == PATH_SPLINE) {
            double target = f * length, q = f, du = 0.0, uq;
            for (int it = 0; it < 3; ++it) {
                du = (6*q*q - 6*q) * u0 + (3*q*q - 4*q + 1) * scale0 * ca
                     + (-6*q*q + 6*q) * (u0 + length) + (3*q*q - 2*q) * scale2 * cb;
                uq = (2*q*q*q - 3*q*q + 1) * u0 + (q*q*q - 2*q*q + q) * scale0 * ca
                     + (-2*q*q*q + 3*q*q) * (u0 + length) + (q*q*q - q*q) * scale2 * cb;
                q = q - (uq - u0 - target) / du;
                q = q < 0.0 ? 0.0 : (q > 1.0 ? 1.0 : q);
            }
            u = u0 + target;
            t = (2*q*q*q - 3*q*q + 1) * t0 + (q*q*q - 2*q*q + q) * scale0 * sa
                + (-2*q*q*q + 3*q*q) * t2 + (q*q*q - q*q) * scale2 * sb;
            double dt = (6*q*q - 6*q) * t0 + (3*q*q - 4*q + 1) * scale0 * sa
                        + (-6*q*q + 6*q) * t2 + (3*q*q - 2*q) * scale2 * sb;
            chord = step * sqrt(1.0 + (dt / du) * (dt / du));
        } else {  // the straight chord from hull entry to hull exit
            u = u0 + f * length;
            t = t0 + f * (t2 - t0);
            chord = chord_length / samples;
        }
        double x = u * c - t * s, y = u * s + t * c;
        int j = (int)floor(x / pixel + n / 2.0), i = (int)floor(y / pixel + n / 2.0);
        if (!(0 <= i && i < n && 0 <= j && j < n))
            continue;
        int pixel_id = i * n + j;
        if (pixel_id == last) {
            chords[k - 1] = (float)((double)chords[k - 1] + chord);
        } else {
            indices[k] = pixel_id;
            chords[k] = (float)chord;
            ++k;
            last = pixel_id;
        }
    }
    return k;
}

#ifndef CLOUDLAB_HOST_TEST
extern "C" __global__ void count_paths(const double *h, long long rows,
                                       const unsigned char *mask, int n, double pixel,
                                       double tracker, double step, double *geometry) {
    long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (r < rows)
        count_history(h + r * FIELDS, mask, n, pixel, tracker, step, geometry + r * 6);
}

extern "C" __global__ void fill_paths(const double *h, const double *geometry, long long rows,
                                      int n, double pixel, int kind, const double *table,
                                      int n_lengths, int n_s, double length_step,
                                      const long long *bound, int *indices, float *chords,
                                      long long *lengths) {
    long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (r < rows)
        lengths[r] = fill_history(h + r * FIELDS, geometry + r * 6, n, pixel, kind, table,
                                  n_lengths, n_s, length_step, indices + bound[r],
                                  chords + bound[r]);
}
#endif

/* out[M, N] = x[M, K] @ wt[K, N] for few rows (M <= 8), wt being a column-major [N, K] weight seen
 * as a contiguous [K, N] matrix. Built by respec/models/native.py.
 *
 * Why: for 2-8 rows (a speculative verify block, a small decode batch) the weight is read once and
 * each value is used M times, yet BLAS GEMMs pack the weight first and stream it at half the speed
 * they reach for one row. Here each thread owns whole column tiles: it keeps an M x tile block of
 * accumulators in registers, walks the K rows of its tile once, and prefetches PREFETCH rows ahead
 * (rows are N floats apart, too far for the hardware prefetchers to follow). Portable GNU C vector
 * code: AVX-512 / AVX2 / NEON come from -march=native. */
#include <omp.h>
#include <stddef.h>
#include <string.h>

#define VEC 16 /* floats per vector value */
#ifndef PREFETCH
#define PREFETCH 24
#endif

typedef float vec __attribute__((vector_size(VEC * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof(v)); /* unaligned load */
    return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof(v)); }

#define TILE_KERNEL(M, NV)                                                                         \
    static void tile_##M##_##NV(const float *x, const float *wt, float *out, long K, long N,      \
                                long col) {                                                        \
        vec acc[M][NV];                                                                            \
        for (int m = 0; m < M; m++)                                                                \
            for (int v = 0; v < NV; v++) acc[m][v] = (vec){0};                                     \
        const float *w = wt + col;                                                                 \
        for (long k = 0; k < K; k++, w += N) {                                                     \
            if (k + PREFETCH < K)                                                                  \
                for (int v = 0; v < NV; v++) __builtin_prefetch(w + PREFETCH * N + VEC * v, 0, 3); \
            vec wv[NV];                                                                            \
            for (int v = 0; v < NV; v++) wv[v] = load(w + VEC * v);                                \
            for (int m = 0; m < M; m++) {                                                          \
                float xs = x[m * K + k];                                                           \
                for (int v = 0; v < NV; v++) acc[m][v] += xs * wv[v];                              \
            }                                                                                      \
        }                                                                                          \
        for (int m = 0; m < M; m++)                                                                \
            for (int v = 0; v < NV; v++) store(out + m * N + col + VEC * v, acc[m][v]);            \
    }

TILE_KERNEL(1, 4) TILE_KERNEL(2, 4) TILE_KERNEL(3, 4) TILE_KERNEL(4, 4) TILE_KERNEL(5, 4)
TILE_KERNEL(6, 4) TILE_KERNEL(1, 2) TILE_KERNEL(2, 2) TILE_KERNEL(3, 2) TILE_KERNEL(4, 2)
TILE_KERNEL(5, 2) TILE_KERNEL(6, 2) TILE_KERNEL(7, 2) TILE_KERNEL(8, 2)

typedef void (*tile_fn)(const float *, const float *, float *, long, long, long);
/* [rows][0]: 2-vector tiles, [rows][1]: 4-vector tiles (too many accumulators for 7-8 rows). */
static const tile_fn TILES[9][2] = {
    {0, 0},
    {tile_1_2, tile_1_4}, {tile_2_2, tile_2_4}, {tile_3_2, tile_3_4}, {tile_4_2, tile_4_4},
    {tile_5_2, tile_5_4}, {tile_6_2, tile_6_4}, {tile_7_2, 0}, {tile_8_2, 0},
};

/* 0 on success; -1 when the shape is not handled (the caller falls back to BLAS). */
int skinny_matmul(const float *x, const float *wt, float *out, long M, long K, long N) {
    if (M < 1 || M > 8 || N % (2 * VEC)) return -1;
    /* Wide tiles when there are enough of them to keep every thread busy. */
    int wide = TILES[M][1] != 0 && N % (4 * VEC) == 0 && N / (4 * VEC) >= 16;
    long width = wide ? 4 * VEC : 2 * VEC;
    tile_fn tile = TILES[M][wide];
    long tiles = N / width;
#pragma omp parallel for schedule(static)
    for (long t = 0; t < tiles; t++) tile(x, wt, out, K, N, t * width);
    return 0;
}

/* The same product with each thread owning a contiguous range of columns and walking the weight's
 * rows in order, KB rows per pass, its accumulators in ``out`` (L1/L2) rather than in registers.
 * Why a second kernel: the tiles above read 128-256 bytes per weight row, a stride of N floats apart,
 * which costs DRAM page and TLB misses on wide matrices (the LM head: ~12 GB/s at 8 rows); here each
 * pass reads KB runs of the thread's whole column range (~19 GB/s at 8 rows on the same machine). */
#define KB 8
static inline __attribute__((always_inline)) void stream_pass(const float *x, const float *w, float *out, long M, long K, long N, long nv, long rows) {
    for (long v = 0; v < nv; v++) {
        vec wv[KB];
        for (int j = 0; j < rows; j++) wv[j] = load(w + j * N + VEC * v);
        for (long m = 0; m < M; m++) {
            const float *xm = x + m * K;
            vec acc = load(out + m * N + VEC * v);
            for (int j = 0; j < rows; j++) acc += xm[j] * wv[j];
            store(out + m * N + VEC * v, acc);
        }
    }
}

int stream_matmul(const float *x, const float *wt, float *out, long M, long K, long N) {
    if (M < 1 || M > 8 || N % VEC) return -1;
#pragma omp parallel
    {
        long vecs = N / VEC, threads = omp_get_num_threads(), t = omp_get_thread_num();
        long first = vecs * t / threads * VEC, last = vecs * (t + 1) / threads * VEC;
        for (long m = 0; m < M; m++) memset(out + m * N + first, 0, (last - first) * sizeof(float));
        long k = 0, nv = (last - first) / VEC;
        for (; k + KB <= K; k += KB) stream_pass(x + k, wt + k * N + first, out + first, M, K, N, nv, KB);
        if (k < K) stream_pass(x + k, wt + k * N + first, out + first, M, K, N, nv, K - k);
    }
    return 0;
}

/* out[r, :] = weight * (x[r, :] / sqrt(mean(x[r, :]^2) + eps)) for fp32 rows, in the order of
 * operations of the PyTorch RMSNorm it replaces. Built by respec/models/native.py.
 *
 * Why: the PyTorch version is ~7 small ops per call and a decode step at batch 1 makes 61 calls, so
 * on CPU its dispatch overhead costs more than its arithmetic; this is one call. */
#include <math.h>
#include <string.h>

#define VEC 16
typedef float vec __attribute__((vector_size(VEC * sizeof(float))));

static float sum_of_squares(const float *x, long dim) {
    vec acc = {0};
    long i = 0;
    for (; i + VEC <= dim; i += VEC) {
        vec v;
        memcpy(&v, x + i, sizeof(v));
        acc += v * v;
    }
    float total = 0;
    for (int j = 0; j < VEC; j++) total += acc[j];
    for (; i < dim; i++) total += x[i] * x[i];
    return total;
}

void rms_norm(const float *x, const float *weight, float *out, long rows, long dim, float eps) {
#pragma omp parallel for schedule(static) if (rows >= 64)
    for (long r = 0; r < rows; r++) {
        const float *row = x + r * dim;
        float *dst = out + r * dim;
        float scale = 1.0f / sqrtf(sum_of_squares(row, dim) / (float)dim + eps);
        for (long i = 0; i < dim; i++) dst[i] = weight[i] * (row[i] * scale);
    }
}

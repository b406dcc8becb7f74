/* Attention of a few new tokens per row over that row's KV cache, for fp32 on CPU. Built by
 * respec/models/native.py.
 *
 * Why: at decode sizes PyTorch's attention (flash or matmul + softmax) streams the cache at a third
 * of the machine's bandwidth, and pads every row to the longest one. Here each (row, kv head) pair
 * reads its own keys once, scores all the query heads of its group against them, and reads its own
 * values once; a row reads only up to its own last position.
 *
 * out[b, t, h, :] = sum_{l <= pos[b, t]} softmax_l(scale * q[b, t, h] . k[b, h / group, l]) v[b, h / group, l]
 * q: [B, T, H, D] with strides (q_row, q_token, q_head) in floats, D contiguous;
 * k, v: the cache rows [B, KV, max_len, D], contiguous; pos: [B, T] int64; out: [B, T, H, D]. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define VEC 16
#define PREFETCH_KEYS 8 /* keys ahead */
typedef float vec __attribute__((vector_size(VEC * sizeof(float))));
typedef int ivec __attribute__((vector_size(VEC * sizeof(int))));

static inline vec vload(const float *p) { vec v; memcpy(&v, p, sizeof(v)); return v; }
static inline void vstore(float *p, vec v) { memcpy(p, &v, sizeof(v)); }
static inline vec splat(float x) { return (vec){0} + x; }

/* mask ? a : b, lane by lane (C has no vector conditional operator). */
static inline vec lane_select(ivec mask, vec a, vec b) {
    ivec ia, ib;
    memcpy(&ia, &a, sizeof(ia));
    memcpy(&ib, &b, sizeof(ib));
    ia = (ia & mask) | (ib & ~mask);
    memcpy(&a, &ia, sizeof(a));
    return a;
}

/* exp(x) for x <= 0 to about one ulp: x = n ln2 + r with |r| <= ln2 / 2 and Cephes' expf polynomial
 * in r, scaled by 2^n through the exponent bits; 0 below -87 (where float underflows). */
static inline vec vexp(vec x) {
    ivec live = x > -87.0f;
    x = lane_select(live, x, splat(-87.0f));
    ivec n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, ivec); /* round, as x <= 0 */
    vec nf = __builtin_convertvector(n, vec);
    vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vec y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
             + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    ivec scale_bits = (n + 127) << 23;
    vec scale;
    memcpy(&scale, &scale_bits, sizeof(scale));
    return lane_select(live, y * scale, splat(0.0f));
}

/* Sum of the lanes as a tree of halvings (4 dependent adds instead of 16); compilers turn the
 * halving loops into vector shuffles. */
static inline float lane_sum(vec a) {
    float lanes[VEC];
    memcpy(lanes, &a, sizeof(lanes));
    for (int width = VEC / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++) lanes[j] += lanes[j + width];
    return lanes[0];
}

static inline float dot(const float *a, const float *b, long dim) {
    vec acc = vload(a) * vload(b);
    for (long d = VEC; d < dim; d += VEC) acc += vload(a + d) * vload(b + d);
    return lane_sum(acc);
}

/* scores[i, l] = scale * q_i . k_l for the n = T * group queries of one (row, kv head); -inf past a
 * query's own position. Keys are the outer loop so each is read from memory once. The values are
 * fetched meanwhile (one stream is latency bound at about half the bandwidth two streams reach). */
static void scores_of(const float *const *queries, const long *last, const float *keys, const float *values,
                      float *scores, long n, long span, long dim, float scale) {
    for (long l = 0; l < span; l++) {
        const float *key = keys + l * dim;
        for (long d = 0; d < dim; d += 64 / sizeof(float)) {
            __builtin_prefetch(key + PREFETCH_KEYS * dim + d, 0, 3);
            __builtin_prefetch(values + l * dim + d, 0, 3);
        }
        for (long i = 0; i < n; i++)
            scores[i * span + l] = l <= last[i] ? scale * dot(queries[i], key, dim) : -INFINITY;
    }
}

/* Turns each query's scores into unnormalised probabilities; returns nothing, writes the sums. */
static void exponentiate(float *scores, const long *last, float *sums, long n, long span) {
    for (long i = 0; i < n; i++) {
        float *s = scores + i * span, top = -INFINITY;
        long valid = last[i] + 1;
        for (long l = 0; l < valid; l++) top = s[l] > top ? s[l] : top;
        vec total = {0};
        long l = 0;
        for (; l + VEC <= span; l += VEC) {
            vec e = vexp(vload(s + l) - top);
            vstore(s + l, e);
            total += e;
        }
        float sum = lane_sum(total);
        for (; l < span; l++) {
            s[l] = l < valid ? expf(s[l] - top) : 0.0f;
            sum += s[l];
        }
        sums[i] = sum;
    }
}

static void weighted_values(const float *probs, const float *values, const float *sums, float *const *outs,
                            long n, long span, long dim) {
    for (long i = 0; i < n; i++) memset(outs[i], 0, dim * sizeof(float));
    for (long l = 0; l < span; l++) {
        const float *value = values + l * dim;
        for (long i = 0; i < n; i++) {
            float p = probs[i * span + l];
            if (p == 0.0f) continue;
            for (long d = 0; d < dim; d += VEC) vstore(outs[i] + d, vload(outs[i] + d) + p * vload(value + d));
        }
    }
    for (long i = 0; i < n; i++)
        for (long d = 0; d < dim; d += VEC) vstore(outs[i] + d, vload(outs[i] + d) / sums[i]);
}

/* out = x * cos + roll(x, D / 2) * signed_sin, as models/rope.py's apply_rope. */
static void rotate(const float *x, const float *cos, const float *sin, float *out, long dim) {
    long half = dim / 2;
    for (long d = 0; d < half; d++) {
        out[d] = x[d] * cos[d] + x[d + half] * sin[d];
        out[d + half] = x[d + half] * cos[d + half] + x[d] * sin[d + half];
    }
}

/* The new tokens' part of attention in one call instead of ~10 small ops: rotates the queries of
 * qk [B, T, H + KV, D] (strides qk_row, qk_token; heads contiguous) into q_out [B, T, H, D]; unless
 * read_only, rotates the keys and stores them and the values v [B, T, KV, D] (strides v_row,
 * v_token) at each token's position in the cache rows [B, KV, max_len, D]. cos/sin: [B, T, D].
 * 0 on success; -1, having done nothing, when a position is outside the cache. */
int rope_and_cache(const float *qk, long qk_row, long qk_token, const float *v, long v_row, long v_token,
                    const float *cos, const float *sin, float *q_out, float *k_cache, float *v_cache,
                    int read_only, const long *pos, long B, long T, long H, long KV, long D, long max_len) {
    for (long bt = 0; bt < B * T; bt++)
        if (pos[bt] < 0 || pos[bt] >= max_len) return -1;
#pragma omp parallel for schedule(static) if (B * T >= 16)
    for (long bt = 0; bt < B * T; bt++) {
        const float *token = qk + (bt / T) * qk_row + (bt % T) * qk_token, *c = cos + bt * D, *s = sin + bt * D;
        for (long h = 0; h < H; h++) rotate(token + h * D, c, s, q_out + (bt * H + h) * D, D);
        if (read_only) continue;
        const float *value = v + (bt / T) * v_row + (bt % T) * v_token;
        for (long g = 0; g < KV; g++) {
            long at = (((bt / T) * KV + g) * max_len + pos[bt]) * D;
            rotate(token + (H + g) * D, c, s, k_cache + at, D);
            memcpy(v_cache + at, value + g * D, D * sizeof(float));
        }
    }
    return 0;
}

/* New tokens per row one call takes: they size the per-(row, kv head) arrays on the stack. */
#define MAX_NEW_TOKENS 64

long decode_attention_max_tokens(void) { return MAX_NEW_TOKENS; }

/* 0 on success; -1 when the shape is not handled (the caller uses PyTorch's attention). */
int decode_attention(const float *q, long q_row, long q_token, long q_head, const float *k, const float *v,
                     const long *pos, float *out, long B, long T, long H, long KV, long D, long max_len,
                     float scale) {
    if (D % VEC || H % KV || T > MAX_NEW_TOKENS) return -1;
    long group = H / KV, n = T * group;
    int failed = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : failed)
    for (long pair = 0; pair < B * KV; pair++) {
        long b = pair / KV, g = pair % KV, span = 0;
        const float *queries[n];
        float *outs[n];
        long last[n];
        for (long t = 0; t < T; t++) {
            long p = pos[b * T + t];
            span = p + 1 > span ? p + 1 : span;
            for (long j = 0; j < group; j++) {
                long h = g * group + j, i = t * group + j;
                queries[i] = q + b * q_row + t * q_token + h * q_head;
                outs[i] = out + ((b * T + t) * H + h) * D;
                last[i] = p;
            }
        }
        float *scores = malloc(sizeof(float) * (n * span + n)), *sums = scores + n * span;
        if (scores == NULL || span > max_len) {
            failed = 1;
            free(scores);
            continue;
        }
        const float *keys = k + (b * KV + g) * max_len * D, *values = v + (b * KV + g) * max_len * D;
        scores_of(queries, last, keys, values, scores, n, span, D, scale);
        exponentiate(scores, last, sums, n, span);
        weighted_values(scores, values, sums, outs, n, span, D);
        free(scores);
    }
    return failed ? -1 : 0;
}

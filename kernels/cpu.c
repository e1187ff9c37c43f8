/* CPU kernels for the rollout engine's bf16 decode step (x86-64 with AVX-512 BF16).
 *
 * cpu.py compiles and loads this file and documents each entry point; the PyTorch code they
 * replace is the reference they are tested against (tests/kernels/test_cpu.py):
 *
 *   rlkit_decode_attention_bf16    one query token per sequence over its first lengths[b]
 *                                  K/V entries (GQA): sparse_decode_attention's contract
 *   rlkit_rope_append_attend_bf16  the attention block of a decode step after the fused qkv
 *                                  GEMM: RoPE on q and k, k and v appended to the cache,
 *                                  attention over the sequence's entries
 *   rlkit_add_rms_norm_bf16        optional residual add (in place), then RMSNorm
 *   rlkit_silu_mul_bf16            silu(gate) * up of the fused gate/up GEMM's output
 *   rlkit_sample_rows_bf16         temperature sampling with the sampled tokens' log-probs
 *   rlkit_window_scores_bf16       SnapKV's window attention scores (KV compression)
 *   rlkit_keep_top_f32             the entries a compression keeps (budget, window)
 *   rlkit_redundancy_bf16          R-KV's key redundancy (KV compression)
 *   rlkit_compact_rows             the kept entries moved to the front of their rows
 *
 * Rounding follows the PyTorch code step for step: every bf16 tensor that PyTorch would
 * materialise is rounded to bf16 (round to nearest even) at the same point, and everything
 * in between runs in float32; only summation orders differ.
 *
 * Attention: one work item per (sequence, kv head) covers the G = H / KVH query heads that
 * share the kv head, so each key and value row is read once for the whole group (why this
 * beats ATen's CPU flash kernel at one query per head: the step is a read of the cache).
 * Two passes over the entries: scores (bf16 dot products accumulated in float32 by
 * vdpbf16ps; products of bf16 are exact in float32), then softmax and the weighted sum of
 * values in float32, rounded to bf16 once. Work items are shared among the OpenMP threads of
 * the process (the libgomp that PyTorch loaded).
 *
 * Limits (cpu.py checks them and falls back to PyTorch otherwise): head_dim a multiple of 32
 * up to 256, at most 16 query heads per kv head.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

#define MAX_D 256
#define MAX_G 16

int rlkit_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
}

/* -- bf16 helpers ------------------------------------------------------------------------ */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, as PyTorch's float -> bfloat16 conversion. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* The lanes of a row of n elements that the 16-wide block starting at i covers. */
static inline __mmask16 lanes(int64_t i, int64_t n) {
    return n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
}

static inline __m512 load_bf16x16(const uint16_t *p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

static inline __m512 maskz_load_bf16x16(__mmask16 m, const uint16_t *p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

static inline __m256i to_bf16x16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

static inline __m512 round_bf16x16(__m512 x) {
    __m512i w = _mm512_cvtepu16_epi32(to_bf16x16(x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

/* exp(x) for float32 lanes: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial,
 * times 2^n by vscalefps. Relative error about 2e-7; lanes below -87.3 give 0 and lanes
 * above 88.7 give +inf (as expf). */
static inline __m512 exp512(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
    const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
    x = _mm512_min_ps(x, _mm512_set1_ps(88.8f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.3981999507e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    p = _mm512_scalef_ps(p, n);
    return _mm512_maskz_mov_ps(~tiny, p);
}

/* -- attention ----------------------------------------------------------------------------- */

/* Lane i of the result = the sum of the 16 lanes of v[i]. */
static inline __m512 reduce16(const __m512 v[16]) {
    __m512 r[8], s[4], u[2];
    for (int i = 0; i < 8; i++) /* per 128-bit block: v[2i] sums in lanes 0, 2; v[2i+1] in 1, 3 */
        r[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per block: lane l holds v[4i + l] */
        s[i] = _mm512_add_ps(_mm512_shuffle_ps(r[2 * i], r[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(r[2 * i], r[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++) /* blocks: s[2i] (b0+b1, b2+b3), s[2i+1] (b0+b1, b2+b3) */
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    /* block k: the full sums of v[4k .. 4k + 3] */
    return _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

#define INLINE static inline __attribute__((always_inline))

/* Pass 2 for GN query heads (compile-time GN and F = D / 16, so the GN * F accumulators
 * stay in registers): out_g = sum_j p_gj v_j * inv_g, rounded to bf16 once. */
INLINE void pass2(const uint16_t *v, int64_t v_sl, int64_t len, const float *p, const float *inv,
                  uint16_t *out, const int GN, const int F) {
    __m512 acc[4][16];
    for (int g = 0; g < GN; g++)
        for (int f = 0; f < F; f++) acc[g][f] = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j++) {
        const uint16_t *vj = v + j * v_sl;
        if (j + 8 < len)
            for (int c = 0; c < F * 16; c += 32)
                _mm_prefetch((const char *)(vj + 8 * v_sl + c), _MM_HINT_T0);
        __m512 vf[16];
        for (int f = 0; f < F; f++) vf[f] = load_bf16x16(vj + 16 * f);
        for (int g = 0; g < GN; g++) {
            __m512 pb = _mm512_set1_ps(p[g * len + j]);
            for (int f = 0; f < F; f++) acc[g][f] = _mm512_fmadd_ps(pb, vf[f], acc[g][f]);
        }
    }
    for (int g = 0; g < GN; g++) {
        __m512 s = _mm512_set1_ps(inv[g]);
        for (int f = 0; f < F; f++)
            _mm256_storeu_si256((__m256i *)(out + g * F * 16 + 16 * f),
                                to_bf16x16(_mm512_mul_ps(acc[g][f], s)));
    }
}

/* Attention of G bf16 query rows q[g * q_sh ...] over len entries of one kv head, for a
 * compile-time D (the dispatcher below instantiates each supported one). */
INLINE void attend_d(const uint16_t *q, int64_t q_sh, const uint16_t *k, int64_t k_sl,
                     const uint16_t *v, int64_t v_sl, int64_t len, int G, float scale,
                     float *scores, uint16_t *out, const int D) {
    const int C = D / 32; /* bf16 chunks of 32 in a row */
    const int F = D / 16; /* float32 chunks of 16 */
    if (len <= 0) {
        memset(out, 0, sizeof(uint16_t) * (size_t)G * D);
        return;
    }

    /* Pass 1: scores[g * len + j] = scale * q_g . k_j, 16 entries at a time per head (their
     * 16 partial-sum vectors reduced together), the tail one entry at a time. */
    const __m512 vscale = _mm512_set1_ps(scale);
    int64_t j0 = 0;
    for (; j0 + 16 <= len; j0 += 16) {
        const uint16_t *kb = k + j0 * k_sl;
        /* The next block's keys, while this one computes (the cache is read from DRAM). */
        for (int e = 0; e < 16 && j0 + 16 + e < len; e++)
            for (int c = 0; c < D; c += 32)
                _mm_prefetch((const char *)(kb + (16 + e) * k_sl + c), _MM_HINT_T0);
        for (int g = 0; g < G; g++) {
            __m512bh qg[8];
            for (int c = 0; c < C; c++)
                qg[c] = (__m512bh)_mm512_loadu_si512((const void *)(q + g * q_sh + 32 * c));
            __m512 acc[16];
            for (int e = 0; e < 16; e++) {
                acc[e] = _mm512_setzero_ps();
                for (int c = 0; c < C; c++)
                    acc[e] = _mm512_dpbf16_ps(
                        acc[e], qg[c],
                        (__m512bh)_mm512_loadu_si512((const void *)(kb + e * k_sl + 32 * c)));
            }
            _mm512_storeu_ps(scores + g * len + j0, _mm512_mul_ps(reduce16(acc), vscale));
        }
    }
    for (int64_t j = j0; j < len; j++) {
        const uint16_t *kj = k + j * k_sl;
        for (int g = 0; g < G; g++) {
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < C; c++)
                acc = _mm512_dpbf16_ps(
                    acc, (__m512bh)_mm512_loadu_si512((const void *)(q + g * q_sh + 32 * c)),
                    (__m512bh)_mm512_loadu_si512((const void *)(kj + 32 * c)));
            scores[g * len + j] = _mm512_reduce_add_ps(acc) * scale;
        }
    }

    /* Softmax per query head, in place: scores become unnormalised probabilities. */
    float inv_sum[MAX_G];
    for (int g = 0; g < G; g++) {
        float *s = scores + g * len;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 16 <= len; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
        float m = _mm512_reduce_max_ps(vmax);
        for (; j < len; j++) m = s[j] > m ? s[j] : m;
        __m512 vm = _mm512_set1_ps(m), vsum = _mm512_setzero_ps();
        for (j = 0; j + 16 <= len; j += 16) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm));
            _mm512_storeu_ps(s + j, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        if (j < len) {
            const __mmask16 tail = lanes(j, len);
            __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), vm));
            e = _mm512_maskz_mov_ps(tail, e);
            _mm512_mask_storeu_ps(s + j, tail, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        inv_sum[g] = 1.0f / _mm512_reduce_add_ps(vsum);
    }

    /* Pass 2, in chunks of query heads whose accumulators fit the 32 vector registers. */
    const int gmax = F <= 4 ? 4 : (F <= 8 ? 2 : 1);
    for (int g0 = 0; g0 < G; g0 += gmax) {
        const int gn = G - g0 < gmax ? G - g0 : gmax;
        const float *p = scores + g0 * len;
        uint16_t *o = out + g0 * D;
        switch (gn) {
        case 1: pass2(v, v_sl, len, p, inv_sum + g0, o, 1, F); break;
        case 2: pass2(v, v_sl, len, p, inv_sum + g0, o, 2, F); break;
        case 3: pass2(v, v_sl, len, p, inv_sum + g0, o, 3, F); break;
        default: pass2(v, v_sl, len, p, inv_sum + g0, o, 4, F); break;
        }
    }
}

static void attend_one(const uint16_t *q, int64_t q_sh, const uint16_t *k, int64_t k_sl,
                       const uint16_t *v, int64_t v_sl, int64_t len, int G, int D, float scale,
                       float *scores, uint16_t *out) {
#define ATTEND_CASE(d)                                                                       \
    case d: attend_d(q, q_sh, k, k_sl, v, v_sl, len, G, scale, scores, out, d); break;
    switch (D) {
        ATTEND_CASE(32) ATTEND_CASE(64) ATTEND_CASE(96) ATTEND_CASE(128)
        ATTEND_CASE(160) ATTEND_CASE(192) ATTEND_CASE(224) ATTEND_CASE(256)
    }
#undef ATTEND_CASE
}

/* Returns 0 on success, 1 if a scratch allocation failed (out is then unspecified). */
int rlkit_decode_attention_bf16(const uint16_t *q, int64_t q_sb, int64_t q_sh,
                                const uint16_t *k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                                const uint16_t *v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
                                const int64_t *lengths, uint16_t *out, int B, int H, int KVH,
                                int L, int D, float scale) {
    const int G = H / KVH;
    const int64_t items = (int64_t)B * KVH;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)G * (size_t)(L > 0 ? L : 1));
        /* Every thread takes part in the loop (a worksharing construct), even without scratch. */
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            if (!scores) {
                failed = 1;
                continue;
            }
            const int64_t b = it / KVH, h = it % KVH;
            int64_t len = lengths[b];
            len = len < 0 ? 0 : (len > L ? L : len);
            attend_one(q + b * q_sb + h * G * q_sh, q_sh, k + b * k_sb + h * k_sh, k_sl,
                       v + b * v_sb + h * v_sh, v_sl, len, G, D, scale, scores,
                       out + (b * H + h * G) * (int64_t)D);
        }
        free(scores);
    }
    return failed;
}

/* RoPE, half-split layout, as rlkit.models.decoder.rotate in bf16:
 * out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), rotate_half(x) = (-x2, x1).
 * D / 2 is a multiple of 16. */
static void rope_row(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, int D,
                     uint16_t *out) {
    const int half = D / 2;
    for (int d = 0; d < half; d += 16) {
        __m512 x1 = load_bf16x16(x + d), x2 = load_bf16x16(x + half + d);
        __m512 c1 = load_bf16x16(cos + d), c2 = load_bf16x16(cos + half + d);
        __m512 s1 = load_bf16x16(sin + d), s2 = load_bf16x16(sin + half + d);
        __m512 lo = _mm512_add_ps(round_bf16x16(_mm512_mul_ps(x1, c1)),
                                  round_bf16x16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), s1)));
        __m512 hi = _mm512_add_ps(round_bf16x16(_mm512_mul_ps(x2, c2)),
                                  round_bf16x16(_mm512_mul_ps(x1, s2)));
        _mm256_storeu_si256((__m256i *)(out + d), to_bf16x16(lo));
        _mm256_storeu_si256((__m256i *)(out + half + d), to_bf16x16(hi));
    }
}

/* The attention block of a decode step of T tokens per sequence (T = 1, or a speculative
 * verify step's last token + drafts), after the fused qkv GEMM.
 *   qkv      [B * T, (H + 2 KVH) * D] rows of stride qkv_rs (token t of sequence b at row
 *            b * T + t): q heads, then k heads, then v heads
 *   cos, sin [B * T, D] rows of stride cs_rs (each token's true position)
 *   k, v     cache stores [B, KVH, cap, D] with strides (sb, sh, sl)
 *   lengths  [B] entries of each sequence after its T tokens: token t's k/v go to
 *            lengths[b] - T + t, and its query attends to the entries before that and itself
 *   out      [B * T, H * D] contiguous
 *   q_ring   optional [B, H, W, D] (strides rb, rh, rw): each rotated query is also stored at
 *            ring_pos[b * T + t] (the compressed cache's recent-query window)
 * Returns 0, 1 if a scratch allocation failed, 2 if a length is outside [T, cap]. */
int rlkit_rope_append_attend_bf16(const uint16_t *qkv, int64_t qkv_rs, const uint16_t *cos,
                                 const uint16_t *sin, int64_t cs_rs, uint16_t *k, int64_t k_sb,
                                 int64_t k_sh, int64_t k_sl, uint16_t *v, int64_t v_sb, int64_t v_sh,
                                 int64_t v_sl, int64_t cap, const int64_t *lengths, uint16_t *out,
                                 int B, int H, int KVH, int D, float scale, uint16_t *q_ring,
                                 int64_t r_sb, int64_t r_sh, int64_t r_sw,
                                 const int64_t *ring_pos, int T) {
    const int G = H / KVH;
    int64_t max_len = 0;
    for (int b = 0; b < B; b++) {
        if (lengths[b] < T || lengths[b] > cap) return 2;
        max_len = lengths[b] > max_len ? lengths[b] : max_len;
    }
    const int64_t items = (int64_t)B * KVH;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)G * (size_t)max_len);
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            if (!scores) {
                failed = 1;
                continue;
            }
            const int64_t b = it / KVH, h = it % KVH;
            const int64_t len = lengths[b];
            uint16_t *kd = k + b * k_sb + h * k_sh, *vd = v + b * v_sb + h * v_sh;
            /* Every new key and value first: token t's query reads entries up to its own. */
            for (int t = 0; t < T; t++) {
                const int64_t r = b * T + t, at = len - T + t;
                const uint16_t *row = qkv + r * qkv_rs;
                rope_row(row + (int64_t)(H + h) * D, cos + r * cs_rs, sin + r * cs_rs, D,
                         kd + at * k_sl);
                memcpy(vd + at * v_sl, row + (int64_t)(H + KVH + h) * D, sizeof(uint16_t) * D);
            }
            for (int t = 0; t < T; t++) {
                const int64_t r = b * T + t;
                const uint16_t *row = qkv + r * qkv_rs;
                const uint16_t *cb = cos + r * cs_rs, *sb = sin + r * cs_rs;
                uint16_t qr[MAX_G * MAX_D];
                for (int g = 0; g < G; g++) {
                    rope_row(row + (int64_t)(h * G + g) * D, cb, sb, D, qr + g * D);
                    if (q_ring)
                        memcpy(q_ring + b * r_sb + (h * G + g) * r_sh + ring_pos[r] * r_sw,
                               qr + g * D, sizeof(uint16_t) * D);
                }
                attend_one(qr, D, kd, k_sl, vd, v_sl, len - T + t + 1, G, D, scale, scores,
                           out + (r * H + h * G) * (int64_t)D);
            }
        }
        free(scores);
    }
    return failed;
}

/* -- row-wise ops -------------------------------------------------------------------------- */

/* For each of `rows` rows of `dim`: if delta, x = bf16(x + delta) in place (the residual
 * stream); then out = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))), as RMSNorm in
 * rlkit.models.decoder (normalise in float32, multiply by the weight in bf16). */
void rlkit_add_rms_norm_bf16(uint16_t *x, int64_t x_rs, const uint16_t *delta, int64_t d_rs,
                             const uint16_t *w, float eps, uint16_t *out, int64_t o_rs,
                             int64_t rows, int64_t dim) {
#pragma omp parallel for schedule(static) if (rows * dim >= (1 << 14))
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *xr = x + r * x_rs;
        const uint16_t *dr = delta ? delta + r * d_rs : NULL;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t i = 0; i < dim; i += 16) {
            const __mmask16 m = lanes(i, dim);
            __m512 xv = maskz_load_bf16x16(m, xr + i);
            if (dr) {
                xv = round_bf16x16(_mm512_add_ps(xv, maskz_load_bf16x16(m, dr + i)));
                _mm256_mask_storeu_epi16(xr + i, m, to_bf16x16(xv));
            }
            ss = _mm512_fmadd_ps(xv, xv, ss);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / dim + eps));
        uint16_t *orow = out + r * o_rs;
        for (int64_t i = 0; i < dim; i += 16) {
            const __mmask16 m = lanes(i, dim);
            __m512 h = round_bf16x16(_mm512_mul_ps(maskz_load_bf16x16(m, xr + i), inv));
            __m512 y = _mm512_mul_ps(h, maskz_load_bf16x16(m, w + i));
            _mm256_mask_storeu_epi16(orow + i, m, to_bf16x16(y));
        }
    }
}

/* out[r] = bf16(bf16(silu(gate)) * up) with gate = row[:inter], up = row[inter:], as
 * F.silu(gate) * up in bf16. */
void rlkit_silu_mul_bf16(const uint16_t *gu, int64_t gu_rs, uint16_t *out, int64_t o_rs,
                         int64_t rows, int64_t inter) {
#pragma omp parallel for schedule(static) if (rows * inter >= (1 << 14))
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gu + r * gu_rs, *u = g + inter;
        uint16_t *o = out + r * o_rs;
        for (int64_t i = 0; i < inter; i += 16) {
            const __mmask16 m = lanes(i, inter);
            __m512 gv = maskz_load_bf16x16(m, g + i);
            __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            __m512 s = round_bf16x16(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
            _mm256_mask_storeu_epi16(o + i, m, to_bf16x16(_mm512_mul_ps(s, maskz_load_bf16x16(m, u + i))));
        }
    }
}

/* -- sampling ------------------------------------------------------------------------------ */

/* exp(x * inv_temp - max) over the 16-wide block of a row of V logits at i; 0 past the row. */
static inline __m512 block_probs(const uint16_t *x, int64_t i, int64_t V, __m512 inv_temp,
                                 __m512 max) {
    const __mmask16 m = lanes(i, V);
    __m512 z = _mm512_sub_ps(_mm512_mul_ps(maskz_load_bf16x16(m, x + i), inv_temp), max);
    return _mm512_maskz_mov_ps(m, exp512(z));
}

/* The sum of the 16 lanes in float64. */
static inline double block_sum(__m512 e) {
    return _mm512_reduce_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(e))) +
           _mm512_reduce_add_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
}

/* Temperature sampling over full rows of bf16 logits, as rlkit.rollout.sampling.sample without
 * top-k / top-p: x = logit * inv_temp in float32, log-probs x - max - log(sum exp(x - max)),
 * and the inverse-CDF draw of one uniform u[r] in [0, 1): the first token whose running sum
 * of probabilities (float64) exceeds u * total. Writes tokens[r] and logprobs[r]. */
void rlkit_sample_rows_bf16(const uint16_t *logits, int64_t rs, int64_t rows, int64_t V,
                            float inv_temp, const double *u, int64_t *tokens, float *logprobs) {
    const __m512 it = _mm512_set1_ps(inv_temp);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *x = logits + r * rs;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t i = 0; i < V; i += 16) {
            const __mmask16 m = lanes(i, V);
            __m512 xv = _mm512_mul_ps(maskz_load_bf16x16(m, x + i), it);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, xv);
        }
        const float mx = _mm512_reduce_max_ps(vmax);
        const __m512 vm = _mm512_set1_ps(mx);
        /* Per-block sums in float64, as the reference's float64 cumulative sum. */
        double total = 0.0;
        for (int64_t i = 0; i < V; i += 16) total += block_sum(block_probs(x, i, V, it, vm));
        const float lse = mx + logf((float)total);
        const double target = u[r] * total;
        double run = 0.0;
        int64_t tok = V - 1;
        for (int64_t i = 0; i < V; i += 16) {
            const __m512 e = block_probs(x, i, V, it, vm);
            const double block = block_sum(e);
            if (run + block > target) { /* the token is in this block: walk it */
                float p[16];
                _mm512_storeu_ps(p, e);
                int64_t n = V - i < 16 ? V - i : 16;
                tok = i + n - 1;
                for (int64_t t = 0; t < n; t++) {
                    run += p[t];
                    if (run > target) {
                        tok = i + t;
                        break;
                    }
                }
                break;
            }
            run += block;
        }
        tokens[r] = tok;
        logprobs[r] = bf16_to_f32(x[tok]) * inv_temp - lse;
    }
}

/* -- KV compression (Sparse-RL) ------------------------------------------------------------ */

/* out[j] = scale * q . k_j for j < n (q: D bf16 with unit stride, D a multiple of 32). */
static void dot_scores(const uint16_t *q, const uint16_t *k, int64_t k_sl, int64_t n, int D,
                       float scale, float *out) {
    const int C = D / 32;
    __m512bh qc[8];
    for (int c = 0; c < C; c++) qc[c] = (__m512bh)_mm512_loadu_si512((const void *)(q + 32 * c));
    const __m512 vs = _mm512_set1_ps(scale);
    int64_t j0 = 0;
    for (; j0 + 16 <= n; j0 += 16) {
        __m512 acc[16];
        for (int e = 0; e < 16; e++) {
            acc[e] = _mm512_setzero_ps();
            for (int c = 0; c < C; c++)
                acc[e] = _mm512_dpbf16_ps(
                    acc[e], qc[c],
                    (__m512bh)_mm512_loadu_si512((const void *)(k + (j0 + e) * k_sl + 32 * c)));
        }
        _mm512_storeu_ps(out + j0, _mm512_mul_ps(reduce16(acc), vs));
    }
    for (; j0 < n; j0++) {
        __m512 acc = _mm512_setzero_ps();
        for (int c = 0; c < C; c++)
            acc = _mm512_dpbf16_ps(
                acc, qc[c], (__m512bh)_mm512_loadu_si512((const void *)(k + j0 * k_sl + 32 * c)));
        out[j0] = _mm512_reduce_add_ps(acc) * scale;
    }
}

/* SnapKV's window attention (rlkit.rollout.compression.window_attention): for each sequence r
 * and kv head h, the softmax attention that the W window queries of each of the G query heads
 * of the group give the entries, averaged over those G * W rows, float32 out[r, h, 0..L).
 * Query i (oldest first) sits at entry lens[r] - W + i and sees entries 0..that; entries at
 * or past lens[r] get 0. Returns 0, 1 if a scratch allocation failed, 2 if a length is
 * outside [W, L]. */
int rlkit_window_scores_bf16(const uint16_t *q, int64_t q_sr, int64_t q_sh, int64_t q_si,
                             const uint16_t *k, int64_t k_sr, int64_t k_sh, int64_t k_sl,
                             const int64_t *lens, float *out, int64_t R, int H, int KVH, int W,
                             int64_t L, int D, float scale) {
    if (any_outside(lens, R, W, L)) return 2;
    const int G = H / KVH;
    const float inv_rows = 1.0f / (float)(G * W);
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *s = (float *)malloc(sizeof(float) * (size_t)(L > 0 ? L : 1));
#pragma omp for schedule(static)
        for (int64_t it = 0; it < R * KVH; it++) {
            if (!s) {
                failed = 1;
                continue;
            }
            const int64_t r = it / KVH, h = it % KVH, len = lens[r];
            float *acc = out + it * L;
            memset(acc, 0, sizeof(float) * (size_t)L);
            for (int g = 0; g < G; g++)
                for (int i = 0; i < W; i++) {
                    const int64_t n = len - W + i + 1; /* entries query i sees */
                    dot_scores(q + r * q_sr + (h * G + g) * q_sh + i * q_si, k + r * k_sr + h * k_sh,
                               k_sl, n, D, scale, s);
                    __m512 vmax = _mm512_set1_ps(-INFINITY);
                    for (int64_t j = 0; j < n; j += 16)
                        vmax = _mm512_mask_max_ps(vmax, lanes(j, n), vmax,
                                                  _mm512_maskz_loadu_ps(lanes(j, n), s + j));
                    const __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
                    __m512 vsum = _mm512_setzero_ps();
                    for (int64_t j = 0; j < n; j += 16) {
                        const __mmask16 t = lanes(j, n);
                        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, s + j), vm));
                        e = _mm512_maskz_mov_ps(t, e);
                        _mm512_mask_storeu_ps(s + j, t, e);
                        vsum = _mm512_add_ps(vsum, e);
                    }
                    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
                    for (int64_t j = 0; j < n; j += 16) {
                        const __mmask16 t = lanes(j, n);
                        __m512 a = _mm512_maskz_loadu_ps(t, acc + j);
                        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(t, s + j), inv, a);
                        _mm512_mask_storeu_ps(acc + j, t, a);
                    }
                }
            for (int64_t j = 0; j < L; j++) acc[j] *= inv_rows;
        }
        free(s);
    }
    return failed;
}

/* R-KV's redundancy (rlkit.rollout.compression.redundancy): for each sequence r and kv head
 * h, out[r, h, i] = the sum of cos(k_i, k_j) over the other valid entries j whose cosine is
 * at least `threshold`, divided by max(lens[r] - 1, 1); float32, keys normalised in float32
 * as F.normalize (eps 1e-12). Entries at or past lens[r] get 0. D a multiple of 16. Returns 1
 * if a scratch allocation failed, 2 if a length is outside [0, L]. */
int rlkit_redundancy_bf16(const uint16_t *k, int64_t k_sr, int64_t k_sh, int64_t k_sl,
                          const int64_t *lens, float *out, int64_t R, int KVH, int64_t L, int D,
                          float threshold) {
    if (any_outside(lens, R, 0, L)) return 2;
    const int F = D / 16;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *kn = (float *)malloc(sizeof(float) * (size_t)(L > 0 ? L : 1) * (size_t)D);
#pragma omp for schedule(static)
        for (int64_t it = 0; it < R * KVH; it++) {
            if (!kn) {
                failed = 1;
                continue;
            }
            const int64_t r = it / KVH, h = it % KVH, len = lens[r];
            const uint16_t *kb = k + r * k_sr + h * k_sh;
            float *o = out + it * L;
            for (int64_t j = 0; j < len; j++) {
                __m512 sq = _mm512_setzero_ps();
                for (int f = 0; f < F; f++) {
                    __m512 x = load_bf16x16(kb + j * k_sl + 16 * f);
                    sq = _mm512_fmadd_ps(x, x, sq);
                }
                float norm = sqrtf(_mm512_reduce_add_ps(sq));
                const __m512 inv = _mm512_set1_ps(1.0f / (norm > 1e-12f ? norm : 1e-12f));
                for (int f = 0; f < F; f++)
                    _mm512_storeu_ps(kn + j * D + 16 * f,
                                     _mm512_mul_ps(load_bf16x16(kb + j * k_sl + 16 * f), inv));
            }
            const __m512 thr = _mm512_set1_ps(threshold);
            const float inv_others = 1.0f / (float)(len - 1 > 1 ? len - 1 : 1);
            for (int64_t i = 0; i < len; i++) {
                __m512 qi[16];
                for (int f = 0; f < F; f++) qi[f] = _mm512_loadu_ps(kn + i * D + 16 * f);
                __m512 total = _mm512_setzero_ps();
                for (int64_t j0 = 0; j0 < len; j0 += 16) {
                    const int64_t n = len - j0 < 16 ? len - j0 : 16;
                    __m512 acc[16];
                    for (int e = 0; e < 16; e++) {
                        acc[e] = _mm512_setzero_ps();
                        if (e < n)
                            for (int f = 0; f < F; f++)
                                acc[e] = _mm512_fmadd_ps(
                                    qi[f], _mm512_loadu_ps(kn + (j0 + e) * D + 16 * f), acc[e]);
                    }
                    const __m512 sim = reduce16(acc);
                    __mmask16 keep = lanes(j0, len) & _mm512_cmp_ps_mask(sim, thr, _CMP_GE_OQ);
                    if (i >= j0 && i < j0 + 16) keep &= (__mmask16)~(1u << (i - j0));
                    total = _mm512_mask_add_ps(total, keep, total, sim);
                }
                o[i] = _mm512_reduce_add_ps(total) * inv_others;
            }
            for (int64_t i = len; i < L; i++) o[i] = 0.0f;
        }
        free(kn);
    }
    return failed;
}

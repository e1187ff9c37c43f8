/* CPU kernels for the rollout engine's float32 decode step (x86-64 with AVX2 and FMA).
 *
 * The float32 twin of cpu.c: the same entry points with an _f32 suffix, for engines whose
 * weights and KV cache are float32 — the engine's choice on a CPU without native bf16
 * arithmetic (AVX2-only x86), where bf16 GEMMs are emulated and run several times slower.
 * cpu.py compiles and loads this file and documents each entry point; the PyTorch code they
 * replace is the reference they are tested against (tests/kernels/test_cpu.py):
 *
 *   rlkit_decode_attention_f32    one query token per sequence over its first lengths[b]
 *                                 K/V entries (GQA): sparse_decode_attention's contract
 *   rlkit_rope_append_attend_f32  the attention block of a decode step after the fused qkv
 *                                 GEMM: RoPE on q and k, k and v appended to the cache,
 *                                 attention over the sequence's entries
 *   rlkit_add_rms_norm_f32        optional residual add (in place), then RMSNorm
 *   rlkit_silu_mul_f32            silu(gate) * up of the fused gate/up GEMM's output
 *   rlkit_sample_rows_f32         temperature sampling with the sampled tokens' log-probs
 *   rlkit_window_scores_f32       SnapKV's window attention scores (KV compression)
 *   rlkit_redundancy_f32          R-KV's key redundancy (KV compression)
 *   rlkit_linear_f32              y = x W^T + b on a weight packed once into panels
 *                                 (cpu.py's pack_linear): the decode step's GEMMs
 *   rlkit_keep_top_f32, rlkit_compact_rows   (cpu_common.h, shared with cpu.c)
 *
 * Everything is float32, as the PyTorch code it replaces; results differ from it only by
 * summation order and fused multiply-adds (a few float32 ulps).
 *
 * Attention: one work item per (sequence, kv head) covers the G = H / KVH query heads that
 * share the kv head, so each key and value row is read from memory once for the whole group;
 * while it computes, the thread prefetches its next item's rows. Pass 1 takes 8 keys at a
 * time per query head (8 partial-sum vectors, one transpose-reduce); pass 2 accumulates
 * p * v for up to 3 query heads x 32 dims in registers (12 ymm).
 *
 * Limits (cpu.py checks them and falls back to PyTorch otherwise): head_dim a multiple of 8
 * up to 256, at most 16 query heads per kv head.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

#define MAX_D 256
#define MAX_G 16
#define INLINE static inline __attribute__((always_inline))

int rlkit_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* -- helpers ------------------------------------------------------------------------------- */

/* The lanes of a row of n elements that the 8-wide block starting at i covers, as a mask for
 * _mm256_maskload_ps / _mm256_maskstore_ps (all lanes when n - i >= 8). */
INLINE __m256i lanes8(int64_t i, int64_t n) {
    const int64_t k = n - i >= 8 ? 8 : n - i;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* The 8 floats of a row of n at i, or those left (the rest zero) in the row's last block.
 * Full blocks take plain loads and stores: AMD's masked stores (vmaskmovps) cost about ten
 * times a plain one, and the decode step's row ops call these per 8 floats. */
INLINE __m256 load8(const float *p, int64_t i, int64_t n) {
    return n - i >= 8 ? _mm256_loadu_ps(p + i) : _mm256_maskload_ps(p + i, lanes8(i, n));
}

INLINE void store8(float *p, int64_t i, int64_t n, __m256 v) {
    if (n - i >= 8)
        _mm256_storeu_ps(p + i, v);
    else
        _mm256_maskstore_ps(p + i, lanes8(i, n), v);
}

INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Lane i of the result = the sum of the 8 lanes of v[i]. */
INLINE __m256 reduce8(const __m256 v[8]) {
    __m256 a0 = _mm256_hadd_ps(v[0], v[1]), a1 = _mm256_hadd_ps(v[2], v[3]);
    __m256 a2 = _mm256_hadd_ps(v[4], v[5]), a3 = _mm256_hadd_ps(v[6], v[7]);
    /* per 128-bit half: a0 = (v0 pairs, v1 pairs), ... */
    __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);
    /* b0 low half: partial sums of v0..v3 (low lanes), high half: the other partials */
    __m256 lo = _mm256_permute2f128_ps(b0, b1, 0x20), hi = _mm256_permute2f128_ps(b0, b1, 0x31);
    return _mm256_add_ps(lo, hi);
}

/* exp(x) for float32 lanes: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial,
 * times 2^n built in the exponent bits. Relative error about 2e-7; lanes below -87.3 give 0
 * and lanes above 88.72 give +inf (as expf). */
INLINE __m256 exp256(__m256 x) {
    const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
    const __m256 huge = _mm256_cmp_ps(x, _mm256_set1_ps(88.72283f), _CMP_GT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.3981999507e-3f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    p = _mm256_andnot_ps(tiny, p);
    return _mm256_blendv_ps(p, _mm256_set1_ps(INFINITY), huge);
}

/* -- attention ----------------------------------------------------------------------------- */

/* The rows a thread reads next (its next work item's keys, then its values), prefetched one
 * row per `ahead_row` call from the loops over the current item's rows, so that the next
 * item's cache rows stream in from DRAM while this one computes instead of when it starts.
 * A decode step reads the whole KV cache once (SmolLM2 at batch 32: ~280 MB a step). */
typedef struct {
    const char *k, *v;       /* the next item's first key and value rows */
    int64_t k_sl, v_sl;      /* their row strides in bytes */
    int64_t rows, row_bytes; /* rows of each to fetch, bytes per row */
    int64_t done;            /* rows prefetched so far: keys, then values */
} Ahead;

INLINE void ahead_row(Ahead *a) {
    if (!a || a->done >= 2 * a->rows) return;
    const char *r = a->done < a->rows ? a->k + a->done * a->k_sl
                                      : a->v + (a->done - a->rows) * a->v_sl;
    for (int64_t b = 0; b < a->row_bytes; b += 64) _mm_prefetch(r + b, _MM_HINT_T0);
    a->done++;
}

/* scores[j] = scale * q . k_j for j < n (q and each key: F blocks of 8 floats); one row of
 * `ahead` per 8 keys. */
INLINE void dot_rows(const float *q, const float *k, int64_t k_sl, int64_t n, float scale,
                     float *out, Ahead *ahead, const int F) {
    const __m256 vs = _mm256_set1_ps(scale);
    int64_t j0 = 0;
    for (; j0 + 8 <= n; j0 += 8) {
        ahead_row(ahead);
        const float *kb = k + j0 * k_sl;
        __m256 acc[8];
        for (int e = 0; e < 8; e++) acc[e] = _mm256_setzero_ps();
        for (int f = 0; f < F; f++) {
            const __m256 qf = _mm256_loadu_ps(q + 8 * f);
            for (int e = 0; e < 8; e++)
                acc[e] = _mm256_fmadd_ps(qf, _mm256_loadu_ps(kb + e * k_sl + 8 * f), acc[e]);
        }
        _mm256_storeu_ps(out + j0, _mm256_mul_ps(reduce8(acc), vs));
    }
    for (; j0 < n; j0++) {
        __m256 acc = _mm256_setzero_ps();
        for (int f = 0; f < F; f++)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * f), _mm256_loadu_ps(k + j0 * k_sl + 8 * f),
                                  acc);
        out[j0] = hsum8(acc) * scale;
    }
}

/* Softmax of n scores in place, unnormalised: s[j] = exp(s[j] - max); returns 1 / sum. */
static float softmax_row(float *s, int64_t n) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
    float m = hmax8(vmax);
    for (; j < n; j++) m = s[j] > m ? s[j] : m;
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
        _mm256_storeu_ps(s + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float total = hsum8(vsum);
    for (; j < n; j++) {
        s[j] = expf(s[j] - m);
        total += s[j];
    }
    return 1.0f / total;
}

/* Pass 2 for GN query heads and FN blocks of 8 dims starting at dim 8 * f0 (compile-time GN,
 * FN: the GN * FN accumulators stay in registers): out_g[dims] = sum_j p_gj v_j[dims] * inv_g.
 * One row of `ahead` per 2 entries. */
INLINE void pass2(const float *v, int64_t v_sl, int64_t len, const float *p, const float *inv,
                  float *out, int D, int f0, Ahead *ahead, const int GN, const int FN) {
    __m256 acc[3][4];
    for (int g = 0; g < GN; g++)
        for (int f = 0; f < FN; f++) acc[g][f] = _mm256_setzero_ps();
    const float *vb = v + 8 * f0;
    for (int64_t j = 0; j < len; j++) {
        const float *vj = vb + j * v_sl;
        if (j + 8 < len) _mm_prefetch((const char *)(vj + 8 * v_sl), _MM_HINT_T0);
        if (j & 1) ahead_row(ahead);
        __m256 pb[3];
        for (int g = 0; g < GN; g++) pb[g] = _mm256_broadcast_ss(p + g * len + j);
        for (int f = 0; f < FN; f++) {
            const __m256 vf = _mm256_loadu_ps(vj + 8 * f);
            for (int g = 0; g < GN; g++) acc[g][f] = _mm256_fmadd_ps(pb[g], vf, acc[g][f]);
        }
    }
    for (int g = 0; g < GN; g++) {
        const __m256 s = _mm256_set1_ps(inv[g]);
        for (int f = 0; f < FN; f++)
            _mm256_storeu_ps(out + g * D + 8 * (f0 + f), _mm256_mul_ps(acc[g][f], s));
    }
}

/* Attention of G float32 query rows q[g * q_sh ...] over len entries of one kv head, for a
 * compile-time F = D / 8 (the dispatcher below instantiates each supported one). */
INLINE void attend_f(const float *q, int64_t q_sh, const float *k, int64_t k_sl, const float *v,
                     int64_t v_sl, int64_t len, int G, float scale, float *scores, float *out,
                     Ahead *ahead, const int F) {
    const int D = 8 * F;
    if (len <= 0) {
        memset(out, 0, sizeof(float) * (size_t)G * D);
        return;
    }
    float inv_sum[MAX_G];
    for (int g = 0; g < G; g++) {
        dot_rows(q + g * q_sh, k, k_sl, len, scale, scores + g * len, ahead, F);
        inv_sum[g] = softmax_row(scores + g * len, len);
    }
    /* Pass 2 in tiles of up to 3 heads x 4 blocks of 8 dims (up to 12 accumulators; heads
     * split evenly over the tiles, so that no tile has far fewer accumulators than FMA
     * latency needs): each tile reads the values once. */
    const int tiles = (G + 2) / 3;
    for (int t = 0, g0 = 0; t < tiles; t++) {
        const int gn = (G - g0 + tiles - t - 1) / (tiles - t);
        for (int f0 = 0; f0 < F; f0 += 4) {
            const int fn = F - f0 < 4 ? F - f0 : 4;
            const float *p = scores + g0 * len;
            float *o = out + g0 * D;
#define PASS2(GN_, FN_) pass2(v, v_sl, len, p, inv_sum + g0, o, D, f0, ahead, GN_, FN_)
#define PASS2_FN(GN_)                                                                        \
    switch (fn) {                                                                            \
    case 1: PASS2(GN_, 1); break;                                                            \
    case 2: PASS2(GN_, 2); break;                                                            \
    case 3: PASS2(GN_, 3); break;                                                            \
    default: PASS2(GN_, 4); break;                                                           \
    }
            if (gn == 3) {
                PASS2_FN(3)
            } else if (gn == 2) {
                PASS2_FN(2)
            } else {
                PASS2_FN(1)
            }
#undef PASS2_FN
#undef PASS2
        }
        g0 += gn;
    }
}

/* Attention of one work item (a sequence's kv head); `ahead` (or NULL): the thread's next
 * item's rows to prefetch meanwhile. */
static void attend_one(const float *q, int64_t q_sh, const float *k, int64_t k_sl,
                       const float *v, int64_t v_sl, int64_t len, int G, int D, float scale,
                       float *scores, float *out, Ahead *ahead) {
    switch (D / 8) {
#define ATTEND_CASE(f)                                                                       \
    case f: attend_f(q, q_sh, k, k_sl, v, v_sl, len, G, scale, scores, out, ahead, f); break;
        ATTEND_CASE(1) ATTEND_CASE(2) ATTEND_CASE(3) ATTEND_CASE(4) ATTEND_CASE(5)
        ATTEND_CASE(6) ATTEND_CASE(7) ATTEND_CASE(8) ATTEND_CASE(10) ATTEND_CASE(12)
        ATTEND_CASE(14) ATTEND_CASE(16) ATTEND_CASE(20) ATTEND_CASE(24) ATTEND_CASE(28)
        ATTEND_CASE(32)
#undef ATTEND_CASE
    default: /* other multiples of 8 up to 256: the same code without a constant F */
        attend_f(q, q_sh, k, k_sl, v, v_sl, len, G, scale, scores, out, ahead, D / 8);
    }
}

/* The Ahead of work item `it` (sequence it / KVH, kv head it % KVH) of a cache whose rows
 * are float32 [B, KVH, L, D] with the given strides (elements), over its first `rows`
 * entries. */
static Ahead ahead_of(int64_t it, int KVH, const float *k, int64_t k_sb, int64_t k_sh,
                      int64_t k_sl, const float *v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
                      int64_t rows, int D) {
    const int64_t b = it / KVH, h = it % KVH;
    const Ahead a = {(const char *)(k + b * k_sb + h * k_sh),
                     (const char *)(v + b * v_sb + h * v_sh),
                     k_sl * (int64_t)sizeof(float),
                     v_sl * (int64_t)sizeof(float),
                     rows < 0 ? 0 : rows,
                     D * (int64_t)sizeof(float),
                     0};
    return a;
}

/* Returns 0 on success, 1 if a scratch allocation failed (out is then unspecified). */
int rlkit_decode_attention_f32(const float *q, int64_t q_sb, int64_t q_sh, const float *k,
                               int64_t k_sb, int64_t k_sh, int64_t k_sl, const float *v,
                               int64_t v_sb, int64_t v_sh, int64_t v_sl, const int64_t *lengths,
                               float *out, int B, int H, int KVH, int L, int D, float scale) {
    const int G = H / KVH;
    const int64_t items = (int64_t)B * KVH;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)G * (size_t)(L > 0 ? L : 1));
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            if (!scores) {
                failed = 1;
                continue;
            }
            const int64_t b = it / KVH, h = it % KVH;
            int64_t len = lengths[b];
            len = len < 0 ? 0 : (len > L ? L : len);
            int64_t next = it + 1 < items ? lengths[(it + 1) / KVH] : 0;
            next = next > L ? L : next;
            Ahead ahead = ahead_of(it + 1, KVH, k, k_sb, k_sh, k_sl, v, v_sb, v_sh, v_sl, next, D);
            attend_one(q + b * q_sb + h * G * q_sh, q_sh, k + b * k_sb + h * k_sh, k_sl,
                       v + b * v_sb + h * v_sh, v_sl, len, G, D, scale, scores,
                       out + (b * H + h * G) * (int64_t)D, &ahead);
        }
        free(scores);
    }
    return failed;
}

/* RoPE, half-split layout, as rlkit.models.decoder.rotate in float32:
 * out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1). D / 2 a multiple of 4. */
static void rope_row(const float *x, const float *cos, const float *sin, int D, float *out) {
    const int half = D / 2;
    int d = 0;
    for (; d + 8 <= half; d += 8) {
        __m256 x1 = _mm256_loadu_ps(x + d), x2 = _mm256_loadu_ps(x + half + d);
        __m256 lo = _mm256_sub_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(cos + d)),
                                  _mm256_mul_ps(x2, _mm256_loadu_ps(sin + d)));
        __m256 hi = _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(cos + half + d)),
                                  _mm256_mul_ps(x1, _mm256_loadu_ps(sin + half + d)));
        _mm256_storeu_ps(out + d, lo);
        _mm256_storeu_ps(out + half + d, hi);
    }
    for (; d < half; d++) {
        const float x1 = x[d], x2 = x[half + d];
        out[d] = x1 * cos[d] - x2 * sin[d];
        out[half + d] = x2 * cos[half + d] + x1 * sin[half + d];
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
/* One work item of the attention block (see rlkit_rope_append_attend_f32 below): sequence
 * it / KVH, kv head it % KVH: its T new keys and values into the cache, then attention of its
 * G query heads' T tokens. scores: G * (the longest length) floats of scratch. */
static void append_attend_item(int64_t it, const float *qkv, int64_t qkv_rs, const float *cos,
                               const float *sin, int64_t cs_rs, float *k, int64_t k_sb,
                               int64_t k_sh, int64_t k_sl, float *v, int64_t v_sb, int64_t v_sh,
                               int64_t v_sl, const int64_t *lengths, float *out, int B, int H,
                               int KVH, int D, float scale, float *q_ring, int64_t r_sb,
                               int64_t r_sh, int64_t r_sw, const int64_t *ring_pos, int T,
                               float *scores) {
    const int G = H / KVH;
    const int64_t items = (int64_t)B * KVH;
    const int64_t b = it / KVH, h = it % KVH;
    const int64_t len = lengths[b];
    float *kd = k + b * k_sb + h * k_sh, *vd = v + b * v_sb + h * v_sh;
    /* The next item's cached rows (those before the T entries it writes), prefetched while
     * this item computes. */
    Ahead ahead = ahead_of(it + 1, KVH, k, k_sb, k_sh, k_sl, v, v_sb, v_sh, v_sl,
                           it + 1 < items ? lengths[(it + 1) / KVH] - T : 0, D);
    /* Every new key and value first: token t's query reads entries up to its own. */
    for (int t = 0; t < T; t++) {
        const int64_t r = b * T + t, at = len - T + t;
        const float *row = qkv + r * qkv_rs;
        rope_row(row + (int64_t)(H + h) * D, cos + r * cs_rs, sin + r * cs_rs, D, kd + at * k_sl);
        memcpy(vd + at * v_sl, row + (int64_t)(H + KVH + h) * D, sizeof(float) * D);
    }
    for (int t = 0; t < T; t++) {
        const int64_t r = b * T + t;
        const float *row = qkv + r * qkv_rs;
        const float *cb = cos + r * cs_rs, *sb = sin + r * cs_rs;
        float qr[MAX_G * MAX_D];
        for (int g = 0; g < G; g++) {
            rope_row(row + (int64_t)(h * G + g) * D, cb, sb, D, qr + g * D);
            if (q_ring)
                memcpy(q_ring + b * r_sb + (h * G + g) * r_sh + ring_pos[r] * r_sw, qr + g * D,
                       sizeof(float) * D);
        }
        attend_one(qr, D, kd, k_sl, vd, v_sl, len - T + t + 1, G, D, scale, scores,
                   out + (r * H + h * G) * (int64_t)D, &ahead);
    }
}

/* The longest of B lengths, or -1 if one is outside [T, cap]. */
static int64_t longest(const int64_t *lengths, int B, int T, int64_t cap) {
    int64_t max_len = 0;
    for (int b = 0; b < B; b++) {
        if (lengths[b] < T || lengths[b] > cap) return -1;
        max_len = lengths[b] > max_len ? lengths[b] : max_len;
    }
    return max_len;
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
int rlkit_rope_append_attend_f32(const float *qkv, int64_t qkv_rs, const float *cos,
                                 const float *sin, int64_t cs_rs, float *k, int64_t k_sb,
                                 int64_t k_sh, int64_t k_sl, float *v, int64_t v_sb, int64_t v_sh,
                                 int64_t v_sl, int64_t cap, const int64_t *lengths, float *out,
                                 int B, int H, int KVH, int D, float scale, float *q_ring,
                                 int64_t r_sb, int64_t r_sh, int64_t r_sw,
                                 const int64_t *ring_pos, int T) {
    const int G = H / KVH;
    const int64_t max_len = longest(lengths, B, T, cap);
    if (max_len < 0) return 2;
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
            append_attend_item(it, qkv, qkv_rs, cos, sin, cs_rs, k, k_sb, k_sh, k_sl, v, v_sb,
                               v_sh, v_sl, lengths, out, B, H, KVH, D, scale, q_ring, r_sb, r_sh,
                               r_sw, ring_pos, T, scores);
        }
        free(scores);
    }
    return failed;
}

/* -- row-wise ops -------------------------------------------------------------------------- */

/* One row of `dim`: if dr, xr += dr in place (the residual stream); then
 * orow = w * (xr * rsqrt(mean(xr^2) + eps)), as RMSNorm in rlkit.models.decoder. */
INLINE void add_rms_norm_row(float *xr, const float *dr, const float *w, float eps, float *orow,
                             int64_t dim) {
    __m256 ss = _mm256_setzero_ps();
    for (int64_t i = 0; i < dim; i += 8) {
        __m256 xv = load8(xr, i, dim);
        if (dr) {
            xv = _mm256_add_ps(xv, load8(dr, i, dim));
            store8(xr, i, dim, xv);
        }
        ss = _mm256_fmadd_ps(xv, xv, ss);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sqrtf(hsum8(ss) / (float)dim + eps));
    for (int64_t i = 0; i < dim; i += 8) {
        const __m256 h = _mm256_mul_ps(load8(xr, i, dim), inv);
        store8(orow, i, dim, _mm256_mul_ps(load8(w, i, dim), h));
    }
}

/* o = silu(g) * u over a row of `inter`, as F.silu(gate) * up. */
INLINE void silu_mul_row(const float *g, const float *u, float *o, int64_t inter) {
    for (int64_t i = 0; i < inter; i += 8) {
        const __m256 gv = load8(g, i, inter);
        __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        store8(o, i, inter, _mm256_mul_ps(s, load8(u, i, inter)));
    }
}

/* For each of `rows` rows of `dim`: if delta, x += delta in place (the residual stream); then
 * out = w * (x * rsqrt(mean(x^2) + eps)), as RMSNorm in rlkit.models.decoder. */
void rlkit_add_rms_norm_f32(float *x, int64_t x_rs, const float *delta, int64_t d_rs,
                            const float *w, float eps, float *out, int64_t o_rs, int64_t rows,
                            int64_t dim) {
#pragma omp parallel for schedule(static) if (rows * dim >= (1 << 18))
    for (int64_t r = 0; r < rows; r++)
        add_rms_norm_row(x + r * x_rs, delta ? delta + r * d_rs : NULL, w, eps, out + r * o_rs,
                         dim);
}

/* out[r] = silu(gate) * up with gate = row[:inter], up = row[inter:], as F.silu(gate) * up. */
void rlkit_silu_mul_f32(const float *gu, int64_t gu_rs, float *out, int64_t o_rs, int64_t rows,
                        int64_t inter) {
#pragma omp parallel for schedule(static) if (rows * inter >= (1 << 18))
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * gu_rs;
        silu_mul_row(g, g + inter, out + r * o_rs, inter);
    }
}

/* -- sampling ------------------------------------------------------------------------------ */

/* exp(x * inv_temp - max) over the 8-wide block of a row of V logits at i; 0 past the row. */
INLINE __m256 block_probs(const float *x, int64_t i, int64_t V, __m256 inv_temp, __m256 max) {
    const __m256i m = lanes8(i, V);
    __m256 z = _mm256_sub_ps(_mm256_mul_ps(_mm256_maskload_ps(x + i, m), inv_temp), max);
    return _mm256_and_ps(exp256(z), _mm256_castsi256_ps(m));
}

/* The sum of the 8 lanes in float64. */
INLINE double block_sum(__m256 e) {
    __m256d s = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(e)),
                              _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

/* Temperature sampling over full rows of float32 logits, as rlkit.rollout.sampling.sample
 * without top-k / top-p: x = logit * inv_temp, log-probs x - max - log(sum exp(x - max)), and
 * the inverse-CDF draw of one uniform u[r] in [0, 1): the first token whose running sum of
 * probabilities (float64) exceeds u * total. Writes tokens[r] and logprobs[r]. */
void rlkit_sample_rows_f32(const float *logits, int64_t rs, int64_t rows, int64_t V,
                           float inv_temp, const double *u, int64_t *tokens, float *logprobs) {
    const __m256 it = _mm256_set1_ps(inv_temp);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *x = logits + r * rs;
        __m256 vmax = _mm256_set1_ps(-INFINITY);
        int64_t i = 0;
        for (; i + 8 <= V; i += 8) vmax = _mm256_max_ps(vmax, _mm256_mul_ps(_mm256_loadu_ps(x + i), it));
        float mx = hmax8(vmax);
        for (; i < V; i++) mx = x[i] * inv_temp > mx ? x[i] * inv_temp : mx;
        const __m256 vm = _mm256_set1_ps(mx);
        double total = 0.0;
        for (i = 0; i < V; i += 8) total += block_sum(block_probs(x, i, V, it, vm));
        const float lse = mx + logf((float)total);
        const double target = u[r] * total;
        double run = 0.0;
        int64_t tok = V - 1;
        for (i = 0; i < V; i += 8) {
            const __m256 e = block_probs(x, i, V, it, vm);
            const double block = block_sum(e);
            if (run + block > target) { /* the token is in this block: walk it */
                float p[8];
                _mm256_storeu_ps(p, e);
                const int64_t n = V - i < 8 ? V - i : 8;
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
        logprobs[r] = x[tok] * inv_temp - lse;
    }
}

/* -- KV compression (Sparse-RL) ------------------------------------------------------------ */

/* SnapKV's window attention (rlkit.rollout.compression.window_attention), float32: for each
 * sequence r and kv head h, the softmax attention that the W window queries of each of the G
 * query heads of the group give the entries, averaged over those G * W rows, out[r, h, 0..L).
 * Query i (oldest first) sits at entry lens[r] - W + i and sees entries 0..that; entries at
 * or past lens[r] get 0. Returns 0, 1 if a scratch allocation failed, 2 if a length is
 * outside [W, L]. */
int rlkit_window_scores_f32(const float *q, int64_t q_sr, int64_t q_sh, int64_t q_si,
                            const float *k, int64_t k_sr, int64_t k_sh, int64_t k_sl,
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
                    dot_rows(q + r * q_sr + (h * G + g) * q_sh + i * q_si, k + r * k_sr + h * k_sh,
                             k_sl, n, scale, s, NULL, D / 8);
                    const __m256 inv = _mm256_set1_ps(softmax_row(s, n));
                    for (int64_t j = 0; j < n; j += 8) {
                        const __m256 a = _mm256_fmadd_ps(load8(s, j, n), inv, load8(acc, j, n));
                        store8(acc, j, n, a);
                    }
                }
            for (int64_t j = 0; j < L; j++) acc[j] *= inv_rows;
        }
        free(s);
    }
    return failed;
}

/* R-KV's redundancy (rlkit.rollout.compression.redundancy), float32 keys: for each sequence r
 * and kv head h, out[r, h, i] = the sum of cos(k_i, k_j) over the other valid entries j whose
 * cosine is at least `threshold`, divided by max(lens[r] - 1, 1); keys normalised as
 * F.normalize (eps 1e-12). Entries at or past lens[r] get 0. D a multiple of 8. Returns 1 if
 * a scratch allocation failed, 2 if a length is outside [0, L]. */
int rlkit_redundancy_f32(const float *k, int64_t k_sr, int64_t k_sh, int64_t k_sl,
                         const int64_t *lens, float *out, int64_t R, int KVH, int64_t L, int D,
                         float threshold) {
    if (any_outside(lens, R, 0, L)) return 2;
    const int F = D / 8;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *kn = (float *)malloc(sizeof(float) * (size_t)(L > 0 ? L : 1) * (size_t)D);
        float *sim = (float *)malloc(sizeof(float) * (size_t)(L > 0 ? L : 1));
#pragma omp for schedule(static)
        for (int64_t it = 0; it < R * KVH; it++) {
            if (!kn || !sim) {
                failed = 1;
                continue;
            }
            const int64_t r = it / KVH, h = it % KVH, len = lens[r];
            const float *kb = k + r * k_sr + h * k_sh;
            float *o = out + it * L;
            for (int64_t j = 0; j < len; j++) {
                __m256 sq = _mm256_setzero_ps();
                for (int f = 0; f < F; f++) {
                    const __m256 x = _mm256_loadu_ps(kb + j * k_sl + 8 * f);
                    sq = _mm256_fmadd_ps(x, x, sq);
                }
                const float norm = sqrtf(hsum8(sq));
                const __m256 inv = _mm256_set1_ps(1.0f / (norm > 1e-12f ? norm : 1e-12f));
                for (int f = 0; f < F; f++)
                    _mm256_storeu_ps(kn + j * D + 8 * f,
                                     _mm256_mul_ps(_mm256_loadu_ps(kb + j * k_sl + 8 * f), inv));
            }
            const float inv_others = 1.0f / (float)(len - 1 > 1 ? len - 1 : 1);
            for (int64_t i = 0; i < len; i++) {
                dot_rows(kn + i * D, kn, D, len, 1.0f, sim, NULL, F);
                float total = 0.0f;
                for (int64_t j = 0; j < len; j++)
                    if (j != i && sim[j] >= threshold) total += sim[j];
                o[i] = total * inv_others;
            }
            for (int64_t i = len; i < L; i++) o[i] = 0.0f;
        }
        free(kn);
        free(sim);
    }
    return failed;
}

/* -- GEMM ---------------------------------------------------------------------------------- */

/* The decode step's linears: y [M, N] = x [M, K] W^T + bias, M a few rows (the decode batch)
 * and W [N, K] one of the model's weights, each read once per step. At M = 32 a step streams
 * all 540 MB of SmolLM2's float32 weights from DRAM for 8.6 GFLOP, so the kernel must keep
 * both FMA pipes busy while the weights stream in: the weight is packed once (cpu.py's
 * pack_linear) into panels of NR = 24 output columns, each [K, 24] contiguous and the last
 * zero-padded,
 *     packed[p][k][j] = W[24 p + j, k],
 * so a panel is one sequential run of memory (hardware and software prefetch follow it), and
 * every row block of x reuses it from L1 (a block of GEMM_KC rows of it, 24 KB) or L2.
 *
 * Micro-kernel: MR = 4 rows x 24 columns, the 12 accumulators in ymm registers; per k, three
 * vector loads of the panel and four broadcasts of x feed 12 FMAs (16 registers in all). Rows
 * past a multiple of 4 take the same kernel with MR = 1..3.
 *
 * Loop nest (per thread: a contiguous range of panels, OpenMP static split; each thread
 * writes its own columns of y):
 *     chunks of GEMM_MC rows of x (x's block stays in L2; one chunk at decode batch sizes)
 *       panels p of the thread, prefetching panel p + 1 while p computes
 *         blocks of GEMM_KC along K (the panel's block stays in L1)
 *           row blocks of MR rows: micro-kernel, accumulating into y after the first block
 * The bias is added once, with the last K block. */
#define GEMM_NR 24
#define GEMM_MR 4
#define GEMM_MC 64
#define GEMM_KC 256

/* y[r, :ncols] (+)= x[r, :kc] . panel block + bias for the MR rows of one row block: x rows
 * of stride lda, panel block [kc, 24] contiguous, y rows of stride ldc. accum: add to y
 * (K blocks after the first); bias (or NULL): 24 floats, added here (the last K block).
 * Every k also prefetches pf + k * pf_step: the caller's share of the next panel. */
INLINE void gemm_tile(const float *a, int64_t lda, const float *b, int64_t kc, float *c,
                      int64_t ldc, const float *bias, int ncols, int accum, const char *pf,
                      int64_t pf_step, const int MR) {
    __m256 acc[GEMM_MR][3];
#pragma GCC unroll 4
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 3
        for (int j = 0; j < 3; j++) acc[r][j] = _mm256_setzero_ps();
#pragma GCC unroll 2
    for (int64_t k = 0; k < kc; k++) {
        const float *bk = b + k * GEMM_NR;
        const __m256 b0 = _mm256_loadu_ps(bk), b1 = _mm256_loadu_ps(bk + 8);
        const __m256 b2 = _mm256_loadu_ps(bk + 16);
        _mm_prefetch(pf + k * pf_step, _MM_HINT_T0);
#pragma GCC unroll 4
        for (int r = 0; r < MR; r++) {
            const __m256 ar = _mm256_broadcast_ss(a + r * lda + k);
            acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
            acc[r][2] = _mm256_fmadd_ps(ar, b2, acc[r][2]);
        }
    }
    /* Fully unrolled, so that acc stays in registers (a loop GCC keeps would put it on the
     * stack and store all 12 accumulators at every k). */
#pragma GCC unroll 4
    for (int r = 0; r < MR; r++) {
        float *cr = c + r * ldc;
#pragma GCC unroll 3
        for (int j = 0; j < 3; j++) {
            if (8 * j >= ncols) continue;
            __m256 v = acc[r][j];
            if (bias) v = _mm256_add_ps(v, load8(bias, 8 * j, ncols));
            if (accum) v = _mm256_add_ps(v, load8(cr, 8 * j, ncols));
            store8(cr, 8 * j, ncols, v);
        }
    }
}

static void gemm_rows(int mr, const float *a, int64_t lda, const float *b, int64_t kc, float *c,
                      int64_t ldc, const float *bias, int ncols, int accum, const char *pf,
                      int64_t pf_step) {
    switch (mr) {
#define GEMM_CASE(m)                                                                         \
    case m: gemm_tile(a, lda, b, kc, c, ldc, bias, ncols, accum, pf, pf_step, m); break;
        GEMM_CASE(1) GEMM_CASE(2) GEMM_CASE(3)
#undef GEMM_CASE
    default: gemm_tile(a, lda, b, kc, c, ldc, bias, ncols, accum, pf, pf_step, GEMM_MR);
    }
}

/* Thread t of nt's share of y [M, N] (rows of stride y_rs) = x [M, K] (rows of stride x_rs)
 * W^T + bias, with W packed as above (w: ceil(N / 24) panels of [K, 24]) and bias [N] or
 * NULL: its contiguous range of panels (each thread writes its own columns of y). */
static void gemm_part(const float *x, int64_t x_rs, const float *w, const float *bias, float *y,
                      int64_t y_rs, int64_t M, int64_t N, int64_t K, int64_t t, int64_t nt) {
    const int64_t P = (N + GEMM_NR - 1) / GEMM_NR;
    /* K blocks of near-equal size, at most GEMM_KC. */
    const int64_t nk = (K + GEMM_KC - 1) / GEMM_KC, kc_max = (K + nk - 1) / nk;
    const int64_t panel = K * GEMM_NR; /* floats */
    const int64_t p0 = P * t / nt, p1 = P * (t + 1) / nt;
    for (int64_t m0 = 0; m0 < M; m0 += GEMM_MC) {
        const int64_t mc = M - m0 < GEMM_MC ? M - m0 : GEMM_MC;
        const int64_t blocks = (mc + GEMM_MR - 1) / GEMM_MR;
        /* Each (K block, row block) call prefetches its share of the next panel: step bytes
         * per k, so that all of them together cover its K * 96 bytes. */
        const int64_t step = (GEMM_NR * (int64_t)sizeof(float) + blocks - 1) / blocks;
        for (int64_t p = p0; p < p1; p++) {
            const float *bp = w + p * panel;
            const int64_t n0 = p * GEMM_NR;
            const int ncols = (int)(N - n0 < GEMM_NR ? N - n0 : GEMM_NR);
            /* The thread's next panel: p + 1, its first one for the next chunk of rows, or
             * (the last call) this one again, already in cache. */
            const float *next = p + 1 < p1 ? bp + panel : (m0 + mc < M ? w + p0 * panel : bp);
            for (int64_t kb = 0; kb < nk; kb++) {
                const int64_t k0 = kb * kc_max, kc = K - k0 < kc_max ? K - k0 : kc_max;
                const float *bias_p = bias && k0 + kc == K ? bias + n0 : NULL;
                for (int64_t r = 0; r < blocks; r++) {
                    const int64_t m = m0 + r * GEMM_MR;
                    const int mr = (int)(M - m < GEMM_MR ? M - m : GEMM_MR);
                    const char *pf = (const char *)next + (kb * blocks + r) * kc_max * step;
                    gemm_rows(mr, x + m * x_rs + k0, x_rs, bp + k0 * GEMM_NR, kc,
                              y + m * y_rs + n0, y_rs, bias_p, ncols, kb > 0, pf, step);
                }
            }
        }
    }
}

/* Whether a GEMM is worth splitting over threads: at least two panels and 2^18 multiply-adds. */
INLINE int gemm_splits(int64_t M, int64_t N, int64_t K) {
    return (N + GEMM_NR - 1) / GEMM_NR > 1 && M * N * K >= (1 << 18);
}

/* y [M, N] = x [M, K] W^T + bias (gemm_part's arguments) on the OpenMP threads when
 * `gemm_splits`. */
void rlkit_linear_f32(const float *x, int64_t x_rs, const float *w, const float *bias, float *y,
                      int64_t y_rs, int64_t M, int64_t N, int64_t K) {
#pragma omp parallel if (gemm_splits(M, N, K))
    gemm_part(x, x_rs, w, bias, y, y_rs, M, N, K, omp_get_thread_num(), omp_get_num_threads());
}

/* -- the decode step's layers in one call -------------------------------------------------- */

/* One layer of rlkit_decode_layers_f32, as int64 slots (pointers as addresses; 0 = none). */
enum {
    DL_IN_NORM,                   /* input RMSNorm weight [hidden] */
    DL_QKV, DL_QKV_BIAS,          /* packed fused q/k/v [(H + 2 KVH) D, hidden], bias */
    DL_O, DL_O_BIAS,              /* packed o_proj [hidden, H D], bias */
    DL_POST_NORM,                 /* post-attention RMSNorm weight [hidden] */
    DL_GATE_UP, DL_GATE_UP_BIAS,  /* packed fused gate/up [2 inter, hidden], bias */
    DL_DOWN, DL_DOWN_BIAS,        /* packed down_proj [hidden, inter], bias */
    DL_K, DL_K_SB, DL_K_SH, DL_K_SL, /* k cache store [B, KVH, cap, D] and strides */
    DL_V, DL_V_SB, DL_V_SH, DL_V_SL, /* v cache store and strides */
    DL_CAP, DL_LENGTHS,           /* the stores' capacity, lengths [B] after the T tokens */
    DL_RING, DL_R_SB, DL_R_SH, DL_R_SW, DL_RING_POS, /* query ring [B, H, W, D] (or 0), slots */
    DL_SLOTS
};

#define DL_PTR(l, i) ((float *)(intptr_t)(l)[i])

/* Rows [M t / nt, M (t + 1) / nt) of M: thread t's share of a row-wise op. */
#define ROWS_OF(M, t, nt) for (int64_t r = (M) * (t) / (nt); r < (M) * ((t) + 1) / (nt); r++)

/* Thread t of nt's share of y = x W^T + b, all of it on thread 0 where the GEMM is too small
 * to split (as rlkit_linear_f32). */
static void gemm_shared(const float *x, int64_t x_rs, const int64_t *l, int wi, float *y,
                        int64_t M, int64_t N, int64_t K, int64_t t, int64_t nt) {
    const float *w = DL_PTR(l, wi), *bias = DL_PTR(l, wi + 1);
    if (gemm_splits(M, N, K))
        gemm_part(x, x_rs, w, bias, y, N, M, N, K, t, nt);
    else if (t == 0)
        gemm_part(x, x_rs, w, bias, y, N, M, N, K, 0, 1);
}

/* Every layer of a decode step of T tokens for each of B sequences, the whole forward between
 * the embedding and the LM head, in one OpenMP region (Decoder.forward_decode_fused's loop:
 * the same kernels in the same order, so the same results as those entry points one by one):
 *   h = RMSNorm_0(x); per layer: qkv = h Wqkv^T; RoPE, cache append and attention (att);
 *   x += att Wo^T; h = RMSNorm_post(x); act = silu(gate) * up of h Wgu^T; x += act Wdown^T;
 *   h = RMSNorm_next(x) (the next layer's input norm, or final_norm after the last layer).
 * plan [n_layers, DL_SLOTS] (above); x [M = B T, hidden] the residual stream (updated in
 * place); cos, sin [M, D] rows of stride cs_rs; scratch (contiguous, float32): qkv
 * [M, (H + 2 KVH) D], att [M, H D], tmp [M, hidden], gu [M, 2 inter], act [M, inter];
 * h [M, hidden]: the final-norm hidden states. GEMMs split their panels over the threads,
 * attention its (sequence, kv head) items, the row ops their rows, with a barrier between.
 * Returns 0, 1 if a scratch allocation failed, 2 + i if layer i has a length outside
 * [T, cap]. */
int rlkit_decode_layers_f32(const int64_t *plan, int n_layers, float *x, const float *cos,
                            const float *sin, int64_t cs_rs, const float *final_norm, float *qkv,
                            float *att, float *tmp, float *gu, float *act, float *h, int B,
                            int T, int H, int KVH, int D, int64_t hidden, int64_t inter,
                            float eps, float scale) {
    const int G = H / KVH;
    const int64_t M = (int64_t)B * T, nqkv = (int64_t)(H + 2 * KVH) * D, nh = (int64_t)H * D;
    int64_t max_len = 1;
    for (int i = 0; i < n_layers; i++) {
        const int64_t *l = plan + (int64_t)i * DL_SLOTS;
        const int64_t n = longest((const int64_t *)(intptr_t)l[DL_LENGTHS], B, T, l[DL_CAP]);
        if (n < 0) return 2 + i;
        max_len = n > max_len ? n : max_len;
    }
    const int64_t items = (int64_t)B * KVH;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *scores = (float *)malloc(sizeof(float) * (size_t)G * (size_t)max_len);
        failed = scores == NULL;
        ROWS_OF(M, t, nt)
        add_rms_norm_row(x + r * hidden, NULL, DL_PTR(plan, DL_IN_NORM), eps, h + r * hidden,
                         hidden);
#pragma omp barrier
        for (int i = 0; i < n_layers; i++) {
            const int64_t *l = plan + (int64_t)i * DL_SLOTS;
            gemm_shared(h, hidden, l, DL_QKV, qkv, M, nqkv, hidden, t, nt);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t it = 0; it < items; it++) {
                if (!scores) continue;
                append_attend_item(
                    it, qkv, nqkv, cos, sin, cs_rs, DL_PTR(l, DL_K), l[DL_K_SB], l[DL_K_SH],
                    l[DL_K_SL], DL_PTR(l, DL_V), l[DL_V_SB], l[DL_V_SH], l[DL_V_SL],
                    (const int64_t *)(intptr_t)l[DL_LENGTHS], att, B, H, KVH, D, scale,
                    DL_PTR(l, DL_RING), l[DL_R_SB], l[DL_R_SH], l[DL_R_SW],
                    (const int64_t *)(intptr_t)l[DL_RING_POS], T, scores);
            } /* implicit barrier */
            gemm_shared(att, nh, l, DL_O, tmp, M, hidden, nh, t, nt);
#pragma omp barrier
            ROWS_OF(M, t, nt)
            add_rms_norm_row(x + r * hidden, tmp + r * hidden, DL_PTR(l, DL_POST_NORM), eps,
                             h + r * hidden, hidden);
#pragma omp barrier
            gemm_shared(h, hidden, l, DL_GATE_UP, gu, M, 2 * inter, hidden, t, nt);
#pragma omp barrier
            ROWS_OF(M, t, nt)
            silu_mul_row(gu + r * 2 * inter, gu + r * 2 * inter + inter, act + r * inter, inter);
#pragma omp barrier
            gemm_shared(act, inter, l, DL_DOWN, tmp, M, hidden, inter, t, nt);
#pragma omp barrier
            const float *next =
                i + 1 < n_layers ? DL_PTR(l + DL_SLOTS, DL_IN_NORM) : final_norm;
            ROWS_OF(M, t, nt)
            add_rms_norm_row(x + r * hidden, tmp + r * hidden, next, eps, h + r * hidden, hidden);
#pragma omp barrier
        }
        free(scores);
    }
    return failed;
}

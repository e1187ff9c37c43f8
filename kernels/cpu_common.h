/* Code shared by the CPU kernel builds (cpu.c: AVX-512 BF16; cpu_avx2.c: AVX2 + FMA):
 * plain C that every x86-64 build compiles the same way. Each build includes it once.
 *
 *   rlkit_keep_top_f32   the entries a compression keeps (budget, window)
 *   rlkit_compact_rows   the kept entries moved to the front of their rows
 */
#ifndef RLKIT_CPU_COMMON_H
#define RLKIT_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Whether any of the n lengths lies outside [lo, hi]. */
static inline int any_outside(const int64_t *lens, int64_t n, int64_t lo, int64_t hi) {
    for (int64_t i = 0; i < n; i++)
        if (lens[i] < lo || lens[i] > hi) return 1;
    return 0;
}

/* An unsigned key in the order of torch.sort on float32 (NaN above everything, -0 == +0). */
static inline uint32_t order_key(float f) {
    if (f != f) return 0xffffffffu;
    if (f == 0.0f) f = 0.0f;
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* rlkit.rollout.compression.keep_top: for each row (r, x) of scores [R, X, L] (unit stride
 * along L), the `budget` entries to keep, ascending, into out [R, X, budget]: the last
 * `window` valid entries (scored +inf) and the highest scores among the others, entries at or
 * past lens[r] scored -inf; ties go to the earlier entry (a stable descending sort). Found by
 * building the budget-th largest key bit by bit, not by sorting. budget <= L. Returns 1 if a
 * scratch allocation failed. */
int rlkit_keep_top_f32(const float *scores, int64_t s_sr, int64_t s_sx, const int64_t *lens,
                       int64_t R, int64_t X, int64_t L, int64_t budget, int64_t window,
                       int64_t *out) {
    const uint32_t pos_inf = order_key(INFINITY), neg_inf = order_key(-INFINITY);
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        uint32_t *key = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)(L > 0 ? L : 1));
#pragma omp for schedule(static)
        for (int64_t it = 0; it < R * X; it++) {
            if (!key) {
                failed = 1;
                continue;
            }
            const int64_t r = it / X, x = it % X, len = lens[r];
            const float *s = scores + r * s_sr + x * s_sx;
            for (int64_t j = 0; j < L; j++)
                key[j] = j >= len ? neg_inf : (j >= len - window ? pos_inf : order_key(s[j]));
            uint32_t t = 0; /* the largest t with at least `budget` keys >= t */
            for (int b = 31; b >= 0; b--) {
                const uint32_t cand = t | (1u << b);
                int64_t cnt = 0;
                for (int64_t j = 0; j < L; j++) cnt += key[j] >= cand;
                if (cnt >= budget) t = cand;
            }
            int64_t above = 0;
            for (int64_t j = 0; j < L; j++) above += key[j] > t;
            int64_t ties = budget - above, n = 0;
            int64_t *o = out + it * budget;
            for (int64_t j = 0; j < L && n < budget; j++)
                if (key[j] > t || (key[j] == t && ties-- > 0)) o[n++] = j;
        }
        free(key);
    }
    return failed;
}

/* Compaction after a compression, in place: for each sequence r (store slot rows[r]) and
 * head h, entry j of the row becomes entry idx[r, h, j] for j < budget (idx strictly
 * ascending from >= 0, so every source lies at or after its destination and a forward copy
 * is safe). The store is addressed in bytes: slot, head and entry strides, and row_bytes
 * per entry (K/V rows, or one float of H2O's statistic). idx's head stride 0 shares one row
 * among the heads. Returns 2, moving nothing, if an index row is not strictly ascending or
 * leaves [0, L). */
int rlkit_compact_rows(uint8_t *base, int64_t sb_slot, int64_t sb_head, int64_t sb_entry,
                       int64_t row_bytes, const int64_t *rows, int64_t R, int64_t heads,
                       const int64_t *idx, int64_t i_sr, int64_t i_sh, int64_t budget, int64_t L) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t h = 0; h < heads; h++) {
            const int64_t *ix = idx + r * i_sr + h * i_sh;
            for (int64_t j = 0; j < budget; j++)
                if (ix[j] < 0 || ix[j] >= L || (j > 0 && ix[j] <= ix[j - 1])) return 2;
        }
#pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < R * heads; it++) {
        const int64_t r = it / heads, h = it % heads;
        uint8_t *p = base + rows[r] * sb_slot + h * sb_head;
        const int64_t *ix = idx + r * i_sr + h * i_sh;
        for (int64_t j = 0; j < budget; j++)
            if (ix[j] != j) memmove(p + j * sb_entry, p + ix[j] * sb_entry, (size_t)row_bytes);
    }
    return 0;
}

#endif

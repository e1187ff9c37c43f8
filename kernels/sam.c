/* Suffix-automaton text matchers for SAM drafts, in C: `rlkit.rollout.sam.TextMatcher`
 * (the dynamic part) for a batch of sequences in one call per decode step.
 *
 *   rlkit_sam_new(latest)                    a matcher over an empty text; latest != 0: its
 *                                            drafts continue the match's most recent earlier
 *                                            occurrence, else its first
 *   rlkit_sam_free(m)
 *   rlkit_sam_extend_batch(ms, tok, ld, num, B)
 *                                            matcher b takes tokens tok[b * ld : b * ld + num[b]]
 *   rlkit_sam_draft_batch(ms, room, min_match, k, out, num, B)
 *                                            matcher b's draft: up to room[b] (<= k) tokens into
 *                                            out[b * k ...], their count into num[b]
 *   rlkit_sam_match(m)                       the cursor's matched length
 *
 * The same construction as the Python class (Blumer et al.: one state per class of
 * substrings with the same end positions, clones on a split), and the same cursor: the
 * longest suffix of the text that occurs earlier in it, matched before each new token is
 * added, so that the state's first end has a continuation; a draft is the tokens after that
 * first end (or, with latest, after its last end before the newest token: each new token's
 * position is written into every state on its suffix-link chain, as the Python class does).
 * Transitions live in one open-addressing hash table keyed by (state, token), and
 * each state keeps a list of its own edges for the clone's copy. The Python class spends
 * ~7 us a token in its dictionaries, which on a GPU host is time the device waits for: a
 * verify step syncs, then the host observes every row's new tokens and drafts again before
 * the next launch.
 *
 * Functions return 0, or 1 when an allocation failed (the matcher is then unusable:
 * callers drop it).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t *tokens;
    int64_t n_tokens, cap_tokens;
    /* states */
    int64_t *len, *link, *first_end, *head; /* head: first edge of the state's list, -1 */
    int64_t *last_end;                       /* kept only with latest */
    int64_t n_states, cap_states;
    /* edges: token, target, next edge of the same state */
    int64_t *e_tok, *e_to, *e_next;
    int64_t n_edges, cap_edges;
    /* hash: (state, token) -> edge, -1 empty; capacity a power of two */
    int64_t *h_state, *h_tok, *h_edge;
    int64_t cap_hash;
    int64_t last;
    /* the cursor; with latest, where its match last ended before the newest token */
    int64_t state, match;
    int64_t latest, end;
} sam_t;

/* Arrays of int64 that share one capacity, grown together to at least `need` (doubling).
 * On a failed realloc the ones already grown stay valid and the capacity unchanged. */
static int grow(int64_t **arrays[], int n, int64_t *cap, int64_t need) {
    if (need <= *cap) return 0;
    int64_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    for (int i = 0; i < n; i++) {
        int64_t *q = realloc(*arrays[i], (size_t)c * sizeof(int64_t));
        if (!q) return 1;
        *arrays[i] = q;
    }
    *cap = c;
    return 0;
}

static inline uint64_t hash_of(int64_t state, int64_t tok) {
    uint64_t x = (uint64_t)state * 0x9E3779B97F4A7C15ULL ^ (uint64_t)tok * 0xC2B2AE3D27D4EB4FULL;
    x ^= x >> 29;
    return x * 0xBF58476D1CE4E5B9ULL;
}

static int64_t find_edge(const sam_t *m, int64_t state, int64_t tok) {
    uint64_t mask = (uint64_t)m->cap_hash - 1;
    for (uint64_t i = hash_of(state, tok) & mask;; i = (i + 1) & mask) {
        if (m->h_edge[i] < 0) return -1;
        if (m->h_state[i] == state && m->h_tok[i] == tok) return m->h_edge[i];
    }
}

static void hash_put(sam_t *m, int64_t state, int64_t tok, int64_t edge) {
    uint64_t mask = (uint64_t)m->cap_hash - 1;
    uint64_t i = hash_of(state, tok) & mask;
    while (m->h_edge[i] >= 0) i = (i + 1) & mask;
    m->h_state[i] = state;
    m->h_tok[i] = tok;
    m->h_edge[i] = edge;
}

/* Room for one more edge: the edge arrays, and the table kept at most half full. */
static int reserve_edge(sam_t *m) {
    int64_t **edges[] = {&m->e_tok, &m->e_to, &m->e_next};
    if (grow(edges, 3, &m->cap_edges, m->n_edges + 1)) return 1;
    if (2 * (m->n_edges + 1) <= m->cap_hash) return 0;
    int64_t nc = m->cap_hash ? 2 * m->cap_hash : 256;
    int64_t *hs = malloc((size_t)nc * sizeof(int64_t));
    int64_t *ht = malloc((size_t)nc * sizeof(int64_t));
    int64_t *he = malloc((size_t)nc * sizeof(int64_t));
    if (!hs || !ht || !he) {
        free(hs), free(ht), free(he);
        return 1;
    }
    for (int64_t i = 0; i < nc; i++) he[i] = -1;
    free(m->h_state), free(m->h_tok), free(m->h_edge);
    m->h_state = hs, m->h_tok = ht, m->h_edge = he, m->cap_hash = nc;
    for (int64_t s = 0; s < m->n_states; s++)
        for (int64_t e = m->head[s]; e >= 0; e = m->e_next[e]) hash_put(m, s, m->e_tok[e], e);
    return 0;
}

static int64_t get(const sam_t *m, int64_t state, int64_t tok) {
    int64_t e = find_edge(m, state, tok);
    return e < 0 ? -1 : m->e_to[e];
}

/* state --tok--> target, a new edge or a moved one. */
static int set(sam_t *m, int64_t state, int64_t tok, int64_t target) {
    int64_t e = find_edge(m, state, tok);
    if (e >= 0) {
        m->e_to[e] = target;
        return 0;
    }
    if (reserve_edge(m)) return 1;
    e = m->n_edges++;
    m->e_tok[e] = tok;
    m->e_to[e] = target;
    m->e_next[e] = m->head[state];
    m->head[state] = e;
    hash_put(m, state, tok, e);
    return 0;
}

static int64_t new_state(sam_t *m, int64_t len, int64_t first_end, int64_t link) {
    int64_t **states[] = {&m->len, &m->link, &m->first_end, &m->head, &m->last_end};
    if (grow(states, 5, &m->cap_states, m->n_states + 1)) return -1;
    int64_t s = m->n_states++;
    m->len[s] = len;
    m->link[s] = link;
    m->first_end[s] = first_end;
    m->last_end[s] = first_end;
    m->head[s] = -1;
    return s;
}

void rlkit_sam_free(void *p) {
    sam_t *m = p;
    if (!m) return;
    free(m->tokens), free(m->len), free(m->link), free(m->first_end), free(m->head);
    free(m->last_end);
    free(m->e_tok), free(m->e_to), free(m->e_next);
    free(m->h_state), free(m->h_tok), free(m->h_edge);
    free(m);
}

void *rlkit_sam_new(int64_t latest) {
    sam_t *m = calloc(1, sizeof(sam_t));
    if (!m) return NULL;
    m->latest = latest != 0;
    m->end = -1;
    if (new_state(m, 0, -1, -1) < 0 || reserve_edge(m)) {
        rlkit_sam_free(m);
        return NULL;
    }
    return m;
}

/* The automaton takes one more token (the standard construction, with clones). */
static int sam_extend(sam_t *m, int64_t tok) {
    int64_t **text[] = {&m->tokens};
    if (grow(text, 1, &m->cap_tokens, m->n_tokens + 1)) return 1;
    int64_t end = m->n_tokens;
    int64_t cur = new_state(m, m->len[m->last] + 1, end, 0);
    if (cur < 0) return 1;
    m->tokens[m->n_tokens++] = tok;
    int64_t p = m->last;
    while (p != -1 && get(m, p, tok) < 0) {
        if (set(m, p, tok, cur)) return 1;
        p = m->link[p];
    }
    if (p != -1) {
        int64_t q = get(m, p, tok);
        if (m->len[p] + 1 == m->len[q]) {
            m->link[cur] = q;
        } else {
            /* The clone keeps q's first end: its strings are suffixes of q's, same ends. */
            int64_t clone = new_state(m, m->len[p] + 1, m->first_end[q], m->link[q]);
            if (clone < 0) return 1;
            for (int64_t e = m->head[q]; e >= 0; e = m->e_next[e])
                if (set(m, clone, m->e_tok[e], m->e_to[e])) return 1;
            while (p != -1 && get(m, p, tok) == q) {
                if (set(m, p, tok, clone)) return 1;
                p = m->link[p];
            }
            m->link[q] = m->link[cur] = clone;
        }
    }
    m->last = cur;
    if (m->latest) /* the new end is every suffix's: the states on cur's suffix-link chain */
        for (int64_t s = cur; s > 0; s = m->link[s]) m->last_end[s] = end;
    return 0;
}

static int matcher_extend(sam_t *m, const int64_t *tok, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        int64_t t = tok[i];
        /* advance the cursor: matched against the text before t */
        int64_t state = m->state, length = m->match;
        while (state != 0 && get(m, state, t) < 0) {
            state = m->link[state];
            length = m->len[state];
        }
        int64_t nxt = get(m, state, t);
        if (nxt >= 0) {
            state = nxt;
            length += 1;
        } else {
            state = length = 0;
        }
        /* before t joins: the state's last end is the latest earlier one */
        if (m->latest) m->end = length ? m->last_end[state] : -1;
        if (sam_extend(m, t)) return 1;
        /* normalise: a clone made by this token may now hold the matched string */
        while (state > 0 && m->len[m->link[state]] >= length) state = m->link[state];
        m->state = state;
        m->match = length;
    }
    return 0;
}

int rlkit_sam_extend_batch(void **ms, const int64_t *tok, int64_t ld, const int64_t *num,
                           int64_t B) {
    for (int64_t b = 0; b < B; b++)
        if (matcher_extend(ms[b], tok + b * ld, num[b])) return 1;
    return 0;
}

int rlkit_sam_draft_batch(void **ms, const int64_t *room, int64_t min_match, int64_t k,
                          int64_t *out, int64_t *num, int64_t B) {
    for (int64_t b = 0; b < B; b++) {
        const sam_t *m = ms[b];
        int64_t n = room[b] < k ? room[b] : k, got = 0;
        if (n > 0 && m->match >= min_match && m->state > 0) {
            int64_t end = m->latest ? m->end : m->first_end[m->state];
            for (int64_t j = end + 1; j < m->n_tokens && got < n; j++) out[b * k + got++] = m->tokens[j];
        }
        num[b] = got;
    }
    return 0;
}

int64_t rlkit_sam_match(const void *m) { return ((const sam_t *)m)->match; }

/* ratelimit: --rate-limit, a token bucket per user on this node over every send (messages,
 * edits, deletes; any new kind of send goes through rate_admit_cmd too), shared by all of
 * the user's WebSocket connections here and by its REST sends. Pings and reads are free.
 *
 * The arithmetic (rate_bucket_*) is pure: it takes the time as an argument, so the unit
 * tests drive it with a made-up clock. The table is bounded (RATE_MAX_USERS): a bucket that
 * has refilled to the brim says nothing a fresh one would not, so such "idle" entries are
 * what is dropped when the table is full. If every entry is still refilling, a new user is
 * let through untracked rather than refused (failing open: a limit meant against floods
 * must not lock out users merely because the node is busy), and the table is swept again
 * only after RATE_RESWEEP_MS so that a crowd of new users does not make every send O(n).
 */
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "chat_internal.h"

/* A refusal says "retry after N ms"; waiting exactly that long must succeed, whatever the
 * rounding of the refill. */
#define RATE_EPSILON 1e-9

void rate_bucket_init(rate_bucket_t *b, double burst, uint64_t now_ms) {
    b->tokens = burst;
    b->at_ms = now_ms;
}

/* The tokens the bucket holds at now_ms (never more than burst). A clock that went back
 * (it should not: the loop's clock is monotonic) counts as no time passed. */
static double rate__level(const rate_bucket_t *b, double per_s, double burst, uint64_t now_ms) {
    double t = b->tokens;
    if (now_ms > b->at_ms) t += (double)(now_ms - b->at_ms) * per_s / 1000.0;
    return t > burst ? burst : t;
}

uint64_t rate_bucket_take(rate_bucket_t *b, double per_s, double burst, uint64_t now_ms) {
    double t = rate__level(b, per_s, burst, now_ms);
    if (now_ms > b->at_ms) b->at_ms = now_ms;
    b->tokens = t;
    if (t + RATE_EPSILON >= 1.0) {
        b->tokens = t - 1.0 < 0 ? 0 : t - 1.0;
        return 0;
    }
    /* A refusal takes nothing: the wait is for the one token missing, in whole ms rounded
     * up, but not up past a float's noise (0.99999 ms more is 1, not 2) as long as that
     * wait passes the test above. */
    double ms = ceil((1.0 - t) * 1000.0 / per_s - 1e-6);
    if (ms < 1) ms = 1;
    if (t + ms * per_s / 1000.0 + RATE_EPSILON < 1.0) ms += 1;
    return (uint64_t)ms;
}

bool rate_bucket_idle(const rate_bucket_t *b, double per_s, double burst, uint64_t now_ms) {
    return rate__level(b, per_s, burst, now_ms) + RATE_EPSILON >= burst;
}

/* ---- the table of users --------------------------------------------------------------- */

#define RATE_HEADS 16384u /* a power of two; about 4 entries per chain when full */
#define RATE_RESWEEP_MS 100

typedef struct rate_entry {
    struct rate_entry *next;
    rate_bucket_t b;
    uint32_t hash;
    char user[]; /* NUL-terminated */
} rate_entry_t;

struct rate_table {
    double per_s, burst;
    size_t max_users, n;
    uint64_t resweep_at; /* a sweep freed nothing: no new one before this */
    rate_entry_t *heads[RATE_HEADS];
};

rate_table_t *rate_table_new(double per_s, double burst, size_t max_users) {
    if (!(per_s > 0) || !(burst >= 1) || !max_users) return NULL;
    rate_table_t *t = calloc(1, sizeof(*t));
    if (!t) return NULL;
    t->per_s = per_s;
    t->burst = burst;
    t->max_users = max_users;
    return t;
}

void rate_table_free(rate_table_t *t) {
    if (!t) return;
    for (size_t i = 0; i < RATE_HEADS; i++)
        for (rate_entry_t *e = t->heads[i], *next; e; e = next) {
            next = e->next;
            free(e);
        }
    free(t);
}

size_t rate_table_count(const rate_table_t *t) { return t ? t->n : 0; }

static uint32_t rate__hash(const char *s) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

/* Drop every entry that has refilled to the brim. Returns how many went. */
static size_t rate__sweep(rate_table_t *t, uint64_t now_ms) {
    size_t dropped = 0;
    for (size_t i = 0; i < RATE_HEADS; i++) {
        rate_entry_t **pp = &t->heads[i];
        while (*pp) {
            rate_entry_t *e = *pp;
            if (rate_bucket_idle(&e->b, t->per_s, t->burst, now_ms)) {
                *pp = e->next;
                free(e);
                dropped++;
            } else {
                pp = &e->next;
            }
        }
    }
    t->n -= dropped;
    return dropped;
}

uint64_t rate_table_take(rate_table_t *t, const char *user, uint64_t now_ms) {
    uint32_t h = rate__hash(user);
    rate_entry_t **head = &t->heads[h & (RATE_HEADS - 1)];
    for (rate_entry_t *e = *head; e; e = e->next)
        if (e->hash == h && strcmp(e->user, user) == 0)
            return rate_bucket_take(&e->b, t->per_s, t->burst, now_ms);
    if (t->n >= t->max_users) {
        if (now_ms < t->resweep_at || rate__sweep(t, now_ms) == 0) {
            if (now_ms >= t->resweep_at) t->resweep_at = now_ms + RATE_RESWEEP_MS;
            return 0; /* full of users still refilling: untracked (see the top) */
        }
    }
    size_t len = strlen(user);
    rate_entry_t *e = malloc(sizeof(*e) + len + 1);
    if (!e) return 0; /* out of memory: untracked rather than refused */
    memcpy(e->user, user, len + 1);
    e->hash = h;
    rate_bucket_init(&e->b, t->burst, now_ms);
    e->next = *head;
    *head = e;
    t->n++;
    return rate_bucket_take(&e->b, t->per_s, t->burst, now_ms);
}

/* ---- the server's checks -------------------------------------------------------------- */

/* --rate-burst, or its default: twice the rate, at least one send. */
static double rate__burst(const chat_server_t *s) {
    if (s->cfg.rate_burst >= 1) return s->cfg.rate_burst;
    return 2 * s->cfg.rate_limit < 1 ? 1 : 2 * s->cfg.rate_limit;
}

/* 0, or the ms the user must wait (the refusal counted). The table is made on first use,
 * so a node without --rate-limit holds none. */
static uint64_t rate__admit(chat_server_t *s, const char *user) {
    if (!(s->cfg.rate_limit > 0)) return 0;
    if (!s->rate) {
        s->rate = rate_table_new(s->cfg.rate_limit, rate__burst(s), RATE_MAX_USERS);
        if (!s->rate) return 0; /* out of memory: not limited, the next send tries again */
    }
    uint64_t wait = rate_table_take(s->rate, user, uv_now(s->loop));
    if (wait) s->m.rate_limited++;
    return wait;
}

static void rate__detail(const chat_server_t *s, uint64_t wait, char *buf, size_t n) {
    snprintf(buf, n,
             "too many sends: at most %g a second, bursts of %g; retry after %" PRIu64 " ms",
             s->cfg.rate_limit, rate__burst(s), wait);
}

uint64_t rate_admit_cmd(chat_server_t *s, const char *user, const proto_cmd_t *cmd, sbuf_t *event) {
    uint64_t wait = rate__admit(s, user);
    if (!wait) return 0;
    char detail[160];
    rate__detail(s, wait, detail, sizeof detail);
    proto_put_error(event, "rate_limited", detail, cmd->client_id,
                    cmd->kind == PROTO_MESSAGE ? 0 : cmd->message_id);
    /* the error event plus the one member only this code has: reopen its closing brace */
    if (!event->oom && event->len && event->p[event->len - 1] == '}') {
        event->len--;
        sbuf_printf(event, ",\"retry_after_ms\":%" PRIu64 "}", wait);
    }
    return wait;
}

uint64_t rate_admit_rest(chat_server_t *s, const char *user, bool keep_alive, buf_t **resp) {
    uint64_t wait = rate__admit(s, user);
    if (!wait) return 0;
    char detail[160], head[64];
    rate__detail(s, wait, detail, sizeof detail);
    sbuf_t body = {0};
    sbuf_puts(&body, "{\"error\":\"rate_limited\",\"detail\":");
    sbuf_json_str(&body, detail, strlen(detail));
    sbuf_printf(&body, ",\"retry_after_ms\":%" PRIu64 "}", wait);
    /* Retry-After is in whole seconds (RFC 9110): rounded up, so it is never too early */
    snprintf(head, sizeof head, "Retry-After: %" PRIu64 "\r\n", (wait + 999) / 1000);
    *resp = body.oom
                ? http_error_new(429, "rate_limited", "too many sends", keep_alive)
                : http_response_new(429, "application/json", body.p, body.len, keep_alive, head);
    sbuf_free(&body);
    return wait;
}

/* search_scan: search without an index, by reading history pages newest first.
 *
 * Works on any store (the default with Cassandra). Matching: every word and phrase must
 * appear in the text as a substring, ASCII case ignored (bytes of multibyte UTF-8 sequences
 * are never ASCII, so they compare exactly and a match cannot start or end inside a
 * character); an -exclusion must not appear. Deleted messages never match.
 *
 * Bounded: one chat's scan stops at `limit` matches, after SEARCH_SCAN_MAX messages or after
 * SEARCH_SCAN_BYTES of text, whichever comes first, and the answer says where to go on
 * (next_before). The matching runs on the loop, so both bounds matter: a message may be up
 * to a megabyte (a REST body), and the bytes bound keeps one request's loop work to a few
 * milliseconds whatever the chat holds. There is no index to keep up on the write path.
 *
 * Several chats (GET /api/search): the chats are scanned one after the other, each with an
 * equal share of the bounds. Every chat's scan stops somewhere; the answer holds only the
 * matches newer than the newest such stopping point that is not a chat's end, so that
 * going on from there (next_before) misses nothing and repeats nothing. */
#include "search_internal.h"

#include <stdlib.h>
#include <string.h>

#define SEARCH_SCAN_MAX 5000
#define SEARCH_SCAN_BYTES (2u << 20)
/* Pages start at SEARCH_PAGE_MIN rows, then are sized to what is left of the byte budget at
 * the longest message seen so far, within [SEARCH_PAGE_MIN, SEARCH_PAGE_MAX]: fewer round
 * trips for short messages (each page is one CQL page on Cassandra: 500-row pages measured
 * 32 ms for 5,000 messages, 100-row pages 92 ms), and never more rows in memory than a
 * history page holds (201), whose exposure to long messages this shares. */
#define SEARCH_PAGE_MIN 50
#define SEARCH_PAGE_MAX 200
/* A chat's share of the bounds when several are searched is never below these. */
#define SEARCH_SHARE_MIN_MSGS 500
#define SEARCH_SHARE_MIN_BYTES (128u << 10)

typedef struct scan_op {
    store_req_t sreq;
    search_t *s;
    search_req_t *req;
    /* the query's terms, ASCII-lowercased (NUL-separated) */
    char q[SEARCH_Q_MAX + SEARCH_TERMS_MAX + 1];
    size_t term_off[SEARCH_TERMS_MAX], term_len[SEARCH_TERMS_MAX];
    bool term_ex[SEARCH_TERMS_MAX];
    size_t n_terms;
    char *fold; /* a message's text, ASCII-lowercased; fold_cap bytes */
    size_t fold_cap;
    bool oom;
    /* the budget of each chat */
    size_t max_msgs, max_bytes;
    /* the chat being read */
    size_t chat;
    size_t found, scanned, scanned_bytes, longest;
    uint64_t last; /* the oldest message read so far: where the next page starts */
    /* across chats */
    uint64_t frontier; /* the newest point where a chat's scan stopped short of its end */
    bool cut;          /* some chat stopped short of its end */
    size_t total_scanned;
    search_hit_t *hits;
    size_t n_hits, cap_hits;
} scan_op_t;

static unsigned char ascii_lower(unsigned char c) {
    return c >= 'A' && c <= 'Z' ? (unsigned char)(c + 32) : c;
}

/* Whether the text (n bytes) holds every positive term and no exclusion. The text is
 * lowercased once, then glibc's memmem, linear in the text, finds each term. false on OOM:
 * the message is counted as scanned, not as a match (and the answer becomes an error). */
static bool scan__match(scan_op_t *op, const char *text, size_t n) {
    if (n == 0) return false; /* terms are never empty */
    if (n > op->fold_cap) {
        char *p = realloc(op->fold, n);
        if (!p) {
            op->oom = true;
            return false;
        }
        op->fold = p;
        op->fold_cap = n;
    }
    for (size_t i = 0; i < n; i++) op->fold[i] = (char)ascii_lower((unsigned char)text[i]);
    for (size_t t = 0; t < op->n_terms; t++) {
        bool in = memmem(op->fold, n, op->q + op->term_off[t], op->term_len[t]) != NULL;
        if (in == op->term_ex[t]) return false;
    }
    return true;
}

static bool scan__keep(scan_op_t *op, store_msg_t *m) {
    if (op->n_hits == op->cap_hits) {
        size_t ncap = op->cap_hits ? op->cap_hits * 2 : 16;
        search_hit_t *p = realloc(op->hits, ncap * sizeof *p);
        if (!p) return false;
        op->hits = p;
        op->cap_hits = ncap;
    }
    sbuf_t hl = {0};
    search_html_terms(&hl, op->req->query, m->message, strlen(m->message));
    sbuf_put(&hl, "", 1);
    if (hl.oom) {
        sbuf_free(&hl);
        return false;
    }
    search_hit_t *h = &op->hits[op->n_hits++];
    h->msg = *m; /* the strings move to the hit */
    memset(m, 0, sizeof *m);
    h->highlight = hl.p;
    return true;
}

static int hit_newest_first(const void *a, const void *b) {
    uint64_t x = ((const search_hit_t *)a)->msg.id, y = ((const search_hit_t *)b)->msg.id;
    return x < y ? 1 : x > y ? -1 : 0;
}

static void scan__finish(scan_op_t *op, int status) {
    search_req_t *req = op->req;
    if (status == 0 && op->oom) status = CHAT_ENOMEM;
    size_t keep = 0;
    if (status == 0) {
        /* Only what is newer than every unfinished chat's stopping point is complete. */
        for (size_t i = 0; i < op->n_hits; i++) {
            if (!op->cut || op->hits[i].msg.id >= op->frontier) op->hits[keep++] = op->hits[i];
            else {
                store_msg_clear(&op->hits[i].msg);
                free(op->hits[i].highlight);
            }
        }
        if (keep > 1) qsort(op->hits, keep, sizeof *op->hits, hit_newest_first);
        size_t limit = (size_t)req->limit;
        if (keep > limit) {
            for (size_t i = limit; i < keep; i++) {
                store_msg_clear(&op->hits[i].msg);
                free(op->hits[i].highlight);
            }
            keep = limit;
            req->more = true;
            req->next_before = op->hits[limit - 1].msg.id;
        } else if (op->cut) {
            req->more = true;
            req->next_before = op->frontier;
        }
        req->hits = op->hits;
        req->n_hits = keep;
        req->scanned = op->total_scanned;
    } else {
        for (size_t i = 0; i < op->n_hits; i++) {
            store_msg_clear(&op->hits[i].msg);
            free(op->hits[i].highlight);
        }
        free(op->hits);
    }
    req->status = status;
    free(op->fold);
    free(op);
    req->cb(req);
}

static int scan__submit(scan_op_t *op, uint64_t before);

/* The chat being read is done: stopped where it must, or at its end. On to the next one. */
static void scan__next_chat(scan_op_t *op, bool ended) {
    if (!ended && (!op->cut || op->last > op->frontier)) {
        op->frontier = op->last;
        op->cut = true;
    }
    op->total_scanned += op->scanned;
    search_req_t *req = op->req;
    bool go_on = !req->go_on || req->go_on(req->data);
    if (++op->chat == req->n_chats || !go_on) {
        scan__finish(op, 0);
        return;
    }
    op->found = op->scanned = op->scanned_bytes = op->longest = 0;
    op->last = 0;
    if (scan__submit(op, req->before) < 0) scan__finish(op, CHAT_EIO);
}

static void scan__page_done(store_req_t *sreq) {
    scan_op_t *op = sreq->data;
    search_req_t *req = op->req;
    if (sreq->status < 0) {
        int status = sreq->status;
        store_req_cleanup(sreq);
        scan__finish(op, status == CHAT_ENOMEM ? CHAT_ENOMEM : CHAT_EIO);
        return;
    }
    bool stop = false;
    size_t i = 0;
    while (i < sreq->n_msgs && !stop) {
        store_msg_t *m = &sreq->msgs[i++];
        op->scanned++;
        op->last = m->id;
        if (!m->message || m->deleted_at) continue;
        size_t n = strlen(m->message);
        op->scanned_bytes += n;
        if (n > op->longest) op->longest = n;
        if ((!req->from || strcmp(req->from, m->user_from) == 0) &&
            scan__match(op, m->message, n)) {
            if (!scan__keep(op, m)) op->oom = true;
            if (++op->found == (size_t)req->limit) stop = true;
        }
        if (op->scanned_bytes >= op->max_bytes) stop = true;
    }
    /* A short page is the end of the chat; a full one may have more behind it. */
    bool end = sreq->n_msgs < (size_t)sreq->limit;
    bool more = i < sreq->n_msgs || !end;
    store_req_cleanup(sreq);
    if (op->oom) {
        scan__finish(op, CHAT_ENOMEM);
        return;
    }
    /* Nobody to answer (the client left) or the server stopping: no more pages. */
    bool go_on =
        !stop && !end && op->scanned < op->max_msgs && (!req->go_on || req->go_on(req->data));
    if (!go_on) {
        scan__next_chat(op, !more);
        return;
    }
    if (scan__submit(op, op->last) < 0) scan__finish(op, CHAT_EIO);
}

static int scan__submit(scan_op_t *op, uint64_t before) {
    memset(&op->sreq, 0, sizeof(op->sreq));
    op->sreq.op = STORE_HISTORY;
    op->sreq.chat_id = op->req->chats[op->chat];
    op->sreq.id = before;
    size_t page = SEARCH_PAGE_MIN;
    if (op->scanned) {
        size_t longest = op->longest < 64 ? 64 : op->longest;
        page = (op->max_bytes - op->scanned_bytes) / longest; /* below the budget here */
        if (page < SEARCH_PAGE_MIN) page = SEARCH_PAGE_MIN;
        if (page > SEARCH_PAGE_MAX) page = SEARCH_PAGE_MAX;
    }
    size_t left = op->max_msgs - op->scanned;
    op->sreq.limit = (int)(left < page ? left : page);
    op->sreq.data = op;
    op->sreq.cb = scan__page_done;
    return store_submit(op->s->store, &op->sreq) < 0 ? -1 : 0;
}

static int scan_submit(search_t *s, search_req_t *req, const char **why) {
    if (!req->n_chats || req->n_chats > SEARCH_CHATS_MAX || req->limit < 1 ||
        req->limit > SEARCH_LIMIT_MAX) {
        *why = "bad search request";
        return CHAT_EINVAL;
    }
    scan_op_t *op = calloc(1, sizeof *op);
    if (!op) return CHAT_ENOMEM;
    op->s = s;
    op->req = req;
    req->hits = NULL;
    req->n_hits = 0;
    req->more = false;
    req->next_before = 0;
    req->scanned = 0;
    req->status = 0;
    const search_query_t *q = req->query;
    size_t w = 0;
    for (size_t t = 0; t < q->n_terms; t++) {
        op->term_off[t] = w;
        for (size_t i = 0; i < q->terms[t].len; i++)
            op->q[w++] = (char)ascii_lower((unsigned char)q->terms[t].text[i]);
        op->term_len[t] = q->terms[t].len;
        op->term_ex[t] = q->terms[t].exclude;
        op->q[w++] = '\0';
    }
    op->n_terms = q->n_terms;
    op->max_msgs = SEARCH_SCAN_MAX / req->n_chats;
    op->max_bytes = SEARCH_SCAN_BYTES / req->n_chats;
    if (req->n_chats > 1) {
        if (op->max_msgs < SEARCH_SHARE_MIN_MSGS) op->max_msgs = SEARCH_SHARE_MIN_MSGS;
        if (op->max_bytes < SEARCH_SHARE_MIN_BYTES) op->max_bytes = SEARCH_SHARE_MIN_BYTES;
    }
    if (scan__submit(op, req->before) < 0) {
        free(op);
        return CHAT_EIO;
    }
    return 0;
}

static void scan_close(search_t *s) { free(s); }

static const search_ops_t scan_ops = {
    .name = "scan",
    .submit = scan_submit,
    .close = scan_close,
};

int search_scan_open(search_t **out, uv_loop_t *loop, store_t *store, char *err, size_t errlen) {
    return search__new(out, &scan_ops, loop, store, err, errlen);
}

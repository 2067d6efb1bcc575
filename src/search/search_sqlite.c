/* search_sqlite: search through the FTS5 index inside the SQLite store.
 *
 * The index (messages_fts, schema version 2 in schema/sqlite.sql) is kept by triggers in the
 * store's own write transactions, so this backend has nothing to maintain: it turns a
 * parsed query into an FTS5 MATCH expression (every term quoted; chats and author as exact
 * column filters) and hands it to the store as a STORE_SEARCH read, which runs on one of
 * the store's reader threads, off the loop, like a history page. One read answers a page:
 * limit + 1 hits newest first, the extra one saying whether a next page exists.
 *
 * Matching is FTS5's: whole words (unicode61: letters and digits of any script), case and
 * diacritics folded ("cafe" finds "café", "KÖLN" finds "Köln"), phrases as consecutive
 * words, exclusions by NOT. */
#include "search_internal.h"

#include <stdlib.h>
#include <string.h>

typedef struct fts_op {
    store_req_t sreq;
    search_req_t *req;
    sbuf_t expr; /* the MATCH expression, NUL-terminated */
} fts_op_t;

static void fts__done(store_req_t *sreq) {
    fts_op_t *op = sreq->data;
    search_req_t *req = op->req;
    int status = sreq->status;
    if (status == 0) {
        size_t n = sreq->n_msgs > (size_t)req->limit ? (size_t)req->limit : sreq->n_msgs;
        search_hit_t *hits = n ? calloc(n, sizeof *hits) : NULL;
        if (n && !hits) status = CHAT_ENOMEM;
        for (size_t i = 0; status == 0 && i < n; i++) {
            store_msg_t *m = &sreq->msgs[i];
            const char *marked = sreq->marks && sreq->marks[i] ? sreq->marks[i] : m->message;
            sbuf_t hl = {0};
            if (marked)
                search_html_marked(&hl, marked, strlen(marked), m->message,
                                   m->message ? strlen(m->message) : 0);
            sbuf_put(&hl, "", 1);
            if (hl.oom) {
                sbuf_free(&hl);
                for (size_t j = 0; j < i; j++) {
                    store_msg_clear(&hits[j].msg);
                    free(hits[j].highlight);
                }
                free(hits);
                hits = NULL;
                status = CHAT_ENOMEM;
                break;
            }
            hits[i].msg = *m; /* the strings move to the hit */
            memset(m, 0, sizeof *m);
            hits[i].highlight = hl.p;
        }
        if (status == 0) {
            req->hits = hits;
            req->n_hits = n;
            req->scanned = n;
            req->more = sreq->n_msgs > n;
            req->next_before = req->more && n ? hits[n - 1].msg.id : 0;
        }
    }
    req->status = status == 0 ? 0 : status == CHAT_ENOMEM ? CHAT_ENOMEM : CHAT_EIO;
    store_req_cleanup(sreq);
    sbuf_free(&op->expr);
    free(op);
    req->cb(req);
}

static int fts_submit(search_t *s, search_req_t *req, const char **why) {
    if (!req->n_chats || req->n_chats > SEARCH_CHATS_MAX || req->limit < 1 ||
        req->limit > SEARCH_LIMIT_MAX) {
        *why = "bad search request";
        return CHAT_EINVAL;
    }
    fts_op_t *op = calloc(1, sizeof *op);
    if (!op) return CHAT_ENOMEM;
    int rc = search_fts_expr(&op->expr, req->query, req->chats, req->n_chats, req->from, why);
    sbuf_put(&op->expr, "", 1);
    if (rc == 0 && op->expr.oom) rc = CHAT_ENOMEM;
    if (rc < 0) {
        sbuf_free(&op->expr);
        free(op);
        return rc;
    }
    req->hits = NULL;
    req->n_hits = 0;
    req->more = false;
    req->next_before = 0;
    req->scanned = 0;
    req->status = 0;
    op->req = req;
    op->sreq.op = STORE_SEARCH;
    op->sreq.chat_id = req->chats[0]; /* for the store's logs */
    op->sreq.text = op->expr.p;
    op->sreq.id = req->before;
    op->sreq.limit = req->limit + 1;
    op->sreq.data = op;
    op->sreq.cb = fts__done;
    if (store_submit(s->store, &op->sreq) < 0) {
        sbuf_free(&op->expr);
        free(op);
        return CHAT_EIO;
    }
    return 0;
}

static void fts_close(search_t *s) { free(s); }

static const search_ops_t fts_ops = {
    .name = "sqlite",
    .submit = fts_submit,
    .close = fts_close,
};

int search_sqlite_open(search_t **out, uv_loop_t *loop, store_t *store, char *err, size_t errlen) {
    return search__new(out, &fts_ops, loop, store, err, errlen);
}

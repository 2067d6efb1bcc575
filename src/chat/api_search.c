/* api_search: GET /api/chats/{chat_id}/search (one chat) and GET /api/search (across the
 * chats a token may read). Both parse the query here, so bad syntax is a 400 before any
 * store work; the search layer (search.h: FTS5, a bounded scan or OpenSearch, by
 * --search) finds the hits. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"

#define SEARCH_DEFAULT 20 /* hits per page when the request does not say */

typedef struct search_wait {
    search_req_t req;
    http_peer_t *hp; /* referenced (peer.refs) until the answer */
    bool keep_alive;
    bool across; /* /api/search: the answer names its chats, not one chat_id */
    search_query_t q;
    const char *chats[SEARCH_CHATS_MAX];
    char chat_ids[SEARCH_CHATS_MAX][129];
    char from[129];
} search_wait_t;

/* Between two store reads of a long search: stop when nobody waits for the answer. */
static bool search__client_waiting(void *data) {
    search_wait_t *w = data;
    conn_t *c = w->hp->http.conn;
    return c && !conn_is_closing(c) && !w->hp->peer.srv->stopping;
}

static void search__done(search_req_t *req) {
    search_wait_t *w = req->data;
    http_peer_t *hp = w->hp;
    chat_server_t *s = hp->peer.srv;
    if (req->status == CHAT_ENOMEM) {
        http_conn_error(&hp->http, 500, "internal", "out of memory", false);
    } else if (req->status < 0) {
        if (s->search->down_code)
            http_conn_error(&hp->http, 503, s->search->down_code,
                            "the search engine did not answer; try again later", w->keep_alive);
        else {
            s->m.store_errors++;
            http_conn_error(&hp->http, 503, "store_unavailable", chat_strerror(req->status),
                            w->keep_alive);
        }
    } else {
        sbuf_t sb = {0};
        if (w->across) {
            sbuf_puts(&sb, "{\"chats\":[");
            for (size_t i = 0; i < req->n_chats; i++) {
                if (i) sbuf_puts(&sb, ",");
                sbuf_json_str(&sb, req->chats[i], strlen(req->chats[i]));
            }
            sbuf_puts(&sb, "]");
        } else {
            sbuf_puts(&sb, "{\"chat_id\":");
            sbuf_json_str(&sb, req->chats[0], strlen(req->chats[0]));
        }
        sbuf_puts(&sb, ",\"messages\":[");
        /* As a history page: past API_PAGE_BYTES of JSON (at least one hit) the rest is
         * for the next request, from the last hit sent. */
        for (size_t i = 0; i < req->n_hits; i++) {
            if (i && sb.len >= API_PAGE_BYTES) {
                req->more = true;
                req->next_before = req->hits[i - 1].msg.id;
                break;
            }
            if (i) sbuf_puts(&sb, ",");
            proto_put_msg(&sb, NULL, &req->hits[i].msg);
            /* the history's object, with the highlight before its closing brace */
            if (!sb.oom && sb.len && sb.p[sb.len - 1] == '}') {
                const char *h = req->hits[i].highlight;
                sb.len--;
                sbuf_puts(&sb, ",\"highlight\":");
                sbuf_json_str(&sb, h, strlen(h));
                sbuf_puts(&sb, "}");
            }
        }
        if (req->more) sbuf_printf(&sb, "],\"next_before\":\"%" PRIu64 "\"", req->next_before);
        else sbuf_puts(&sb, "],\"next_before\":null");
        sbuf_printf(&sb, ",\"scanned\":%zu}", req->scanned);
        http_conn_json(&hp->http, 200, &sb, w->keep_alive);
        sbuf_free(&sb);
    }
    search_req_cleanup(req);
    free(w);
    api_done(hp);
}

/* q, limit and before, shared by both routes, into w. false: answered (400). */
static bool search__params(http_peer_t *hp, const http_request_t *req, search_wait_t *w) {
    bool ka = req->keep_alive;
    char q[SEARCH_Q_MAX + 1], v[32];
    const char *why;
    int qn = http_query_param(req, "q", q, sizeof q);
    if (qn == CHAT_ENOTFOUND) {
        http_conn_error(&hp->http, 400, "bad_request", "q (the words to look for) is required", ka);
        return false;
    }
    if (qn < 0 || !utf8_valid((const uint8_t *)q, (size_t)qn)) {
        http_conn_error(&hp->http, 400, "bad_request",
                        qn == CHAT_ETOOBIG ? "q must be at most 256 bytes"
                                           : "q must be percent-encoded UTF-8",
                        ka);
        return false;
    }
    if (search_query_parse(&w->q, q, (size_t)qn, &why) < 0) {
        http_conn_error(&hp->http, 400, "bad_query", why, ka);
        return false;
    }
    w->req.limit = SEARCH_DEFAULT;
    int n = http_query_param(req, "limit", v, sizeof v);
    uint64_t l = 0, before = 0;
    if (n != CHAT_ENOTFOUND) {
        if (n <= 0 || id_parse(v, (size_t)n, &l) < 0 || l < 1 || l > SEARCH_LIMIT_MAX) {
            http_conn_error(&hp->http, 400, "bad_request", "limit must be an integer from 1 to 100",
                            ka);
            return false;
        }
        w->req.limit = (int)l;
    }
    n = http_query_param(req, "before", v, sizeof v);
    if (n != CHAT_ENOTFOUND && (n <= 0 || id_parse(v, (size_t)n, &before) < 0 || !before)) {
        http_conn_error(&hp->http, 400, "bad_request", "before must be a message id", ka);
        return false;
    }
    w->req.before = before;
    return true;
}

/* Submit w's search; on failure answer and free w. */
static void search__start(http_peer_t *hp, search_wait_t *w) {
    chat_server_t *s = hp->peer.srv;
    w->hp = hp;
    w->req.query = &w->q;
    w->req.chats = w->chats;
    w->req.go_on = search__client_waiting;
    w->req.data = w;
    w->req.cb = search__done;
    const char *why = NULL;
    int rc = search_submit(s->search, &w->req, &why);
    if (rc < 0) {
        bool ka = w->keep_alive;
        free(w);
        http_conn_t *hc = &hp->http;
        if (rc == CHAT_EINVAL) http_conn_error(hc, 400, "bad_query", why, ka);
        else if (rc == CHAT_ENOMEM) http_conn_error(hc, 500, "internal", "out of memory", false);
        else
            http_conn_error(hc, 503, "store_unavailable", "the store is not accepting requests",
                            ka);
        return;
    }
    api_wait(hp);
}

/* GET /api/chats/{chat_id}/search?q=&before=&limit= */
void api_search_chat(http_peer_t *hp, const http_request_t *req, const char *chat_id,
                     const jwt_claims_t *cl) {
    /* who asks does not change what a search finds */
    search_wait_t *w = calloc(1, sizeof(*w));
    if (!w) {
        http_conn_error(&hp->http, 500, "internal", "out of memory", false);
        return;
    }
    w->keep_alive = req->keep_alive;
    if (!search__params(hp, req, w)) {
        free(w);
        return;
    }
    snprintf(w->chat_ids[0], sizeof w->chat_ids[0], "%s", chat_id);
    w->chats[0] = w->chat_ids[0];
    w->req.n_chats = 1;
    search__start(hp, w);
}

/* Add one chat id to w's list (repeats are dropped). NULL, or the reason for a 400. */
static const char *search__add_chat(search_wait_t *w, const char *id, size_t n) {
    if (n == 0 || n > 128 || !chat_id_valid(id, n)) return "chats: " CHAT_ID_RULE;
    for (size_t i = 0; i < w->req.n_chats; i++)
        if (strlen(w->chats[i]) == n && memcmp(w->chats[i], id, n) == 0) return NULL;
    if (w->req.n_chats == SEARCH_CHATS_MAX) return "chats: at most 32 chats per search";
    char *dst = w->chat_ids[w->req.n_chats];
    memcpy(dst, id, n);
    dst[n] = '\0';
    w->chats[w->req.n_chats++] = dst;
    return NULL;
}

/* GET /api/search?q=&chats=a,b&from=USER&before=&limit=: across chats, newest first, only
 * chats the token may read. A token with a chats claim searches those by default; one
 * without (any chat) must name them. */
void api_search(http_peer_t *hp, const http_request_t *req, const char *unused,
                const jwt_claims_t *cl) {
    bool ka = req->keep_alive;
    search_wait_t *w = calloc(1, sizeof(*w));
    char *list = malloc(SEARCH_CHATS_MAX * 130 + 1);
    const char *bad = NULL;
    int status = 400;
    if (!w || !list) {
        free(w);
        free(list);
        http_conn_error(&hp->http, 500, "internal", "out of memory", false);
        return;
    }
    w->keep_alive = ka;
    w->across = true;
    if (!search__params(hp, req, w)) goto answered;
    int n = http_query_param(req, "chats", list, SEARCH_CHATS_MAX * 130 + 1);
    if (n == CHAT_ENOTFOUND) {
        if (!cl->chats) {
            bad = "chats is required: this token may read any chat, so name the chats to "
                  "search (chats=a,b)";
        }
        for (size_t i = 0; !bad && cl->chats && cl->chats[i]; i++)
            bad = search__add_chat(w, cl->chats[i], strlen(cl->chats[i]));
        if (bad == NULL && w->req.n_chats == 0) bad = "this token allows no chat";
    } else if (n <= 0) {
        bad = n == CHAT_ETOOBIG ? "chats: at most 32 chats per search"
                                : "chats must be chat ids separated by commas";
    } else {
        const char *p = list, *end = list + n;
        while (!bad && p <= end) {
            const char *comma = memchr(p, ',', (size_t)(end - p));
            const char *e = comma ? comma : end;
            bad = search__add_chat(w, p, (size_t)(e - p));
            p = e + 1;
        }
        for (size_t i = 0; !bad && i < w->req.n_chats; i++) {
            if (!jwt_allows_chat(cl, w->chats[i])) {
                bad = "this token does not allow one of these chats";
                status = 403;
            }
        }
    }
    if (!bad) {
        int fn = http_query_param(req, "from", w->from, sizeof w->from);
        if (fn != CHAT_ENOTFOUND) {
            bool ok = fn > 0 && utf8_valid((const uint8_t *)w->from, (size_t)fn);
            for (int i = 0; ok && i < fn; i++)
                if ((unsigned char)w->from[i] < 0x20 || w->from[i] == 0x7f) ok = false;
            if (!ok) bad = "from must be a user id: 1 to 128 bytes without control characters";
            else w->req.from = w->from;
        }
    }
    if (bad) {
        http_conn_error(&hp->http, status, status == 403 ? "forbidden" : "bad_request", bad, ka);
        goto answered;
    }
    free(list);
    search__start(hp, w);
    return;
answered:
    free(list);
    free(w);
}

/* routes: the HTTP side of a connection. Requests are read with http_reader_t and routed:
 * the WebSocket upgrade, the REST API, health, metrics and the static web client.
 *
 * One request is answered at a time per connection, in order (HTTP/1.1 pipelining): while
 * one waits for the store, bytes that arrive are kept aside and parsed after its answer.
 *
 * Output is bounded per connection, as for WebSockets. No request is parsed while more than
 * half of --max-outbound-bytes of answers waits for the client (reading stops until the
 * queue drains to a quarter), and every answer is bounded (a history page stops at
 * HISTORY_PAGE_BYTES), so a client that pipelines requests and never reads holds about
 * half the limit plus one answer. An answer is always queued whole, so a page larger than
 * the limit still reaches a client that reads; but an answer that would take the queue past
 * --max-outbound-bytes while earlier answers still wait unread cuts the connection (a
 * reset, as a slow WebSocket consumer gets).
 *
 * Deadlines: a request head must arrive within --header-timeout of its first byte, and a
 * body must keep coming at 1 KiB/s on average after a further --header-timeout of grace;
 * otherwise 408 and close (Slowloris). Idleness counts bytes written as well as bytes
 * read, so a slow but progressing download is never cut.
 * Every error is a status with a JSON body {"error": code, "detail": ...}.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "chat/command.h"

#define HTTP_PENDING_MAX (1u << 20) /* bytes kept while a request waits for the store */
#define HISTORY_DEFAULT 50
#define HISTORY_MAX 200
/* A history page stops adding messages past this much JSON (it holds at least one): with
 * --max-message-bytes messages a full page would otherwise be 200 of them, up to six times
 * their size once JSON-escaped. The page says where to go on (next_before) as usual. */
#define HISTORY_PAGE_BYTES (1u << 20)
#define BODY_MIN_RATE 1024 /* bytes per second a request body must keep up on average */
#define HTTP_MAX_CURSORS 32
#define SEARCH_DEFAULT 20 /* hits per page when the request does not say */

static void http__drive(http_peer_t *hp, const uint8_t *data, size_t len);

/* The request that waited for the store was answered: go on with the bytes that arrived
 * meanwhile (pipelined requests). */
static void http__resume(http_peer_t *hp) {
    hp->busy = false;
    sbuf_t pending = hp->pending;
    memset(&hp->pending, 0, sizeof(hp->pending));
    if (hp->peer.conn && !conn_is_closing(hp->peer.conn)) {
        http_reader_consume(&hp->reader);
        http__drive(hp, (const uint8_t *)pending.p, pending.len);
    }
    sbuf_free(&pending);
}

/* ---- answering ------------------------------------------------------------------------ */

/* Queue a response; on a connection that is not kept alive, close after it. Responses are
 * forced past the outbound limit: they are bounded by the request limits and the page size,
 * and the client is waiting for them. */
static void http__send(http_peer_t *hp, buf_t *resp, bool keep_alive) {
    conn_t *c = hp->peer.conn;
    chat_server_t *s = hp->peer.srv;
    s->m.http_requests++;
    if (!c || conn_is_closing(c)) {
        buf_unref(resp);
        return;
    }
    if (resp && hp->head) {
        /* HEAD: the GET answer's head, Content-Length included, without its body. */
        const char *end = memmem(resp->data, resp->len, "\r\n\r\n", 4);
        if (end) resp->len = (size_t)(end + 4 - (const char *)resp->data);
    }
    hp->head = false;
    size_t q = conn_queued(c);
    if (resp && q && q + resp->len > c->max_outbound) {
        /* Earlier answers still wait unread: this client pipelines and does not read. */
        char peer[80];
        conn_peer(c, peer, sizeof peer);
        log_warn("slow_consumer peer=%s queued=%zu (http)", peer, q);
        buf_unref(resp);
        conn_abort(c);
        return;
    }
    if (resp) conn_send_force(c, resp);
    buf_unref(resp);
    if (!resp || !keep_alive || s->stopping) conn_close(c);
}

static void http__error(http_peer_t *hp, int status, const char *code, const char *detail,
                        bool keep_alive) {
    http__send(hp, http_error_new(status, code, detail, keep_alive), keep_alive);
}

static void http__json(http_peer_t *hp, int status, const sbuf_t *body, bool keep_alive) {
    if (body->oom) {
        http__error(hp, 500, "internal", "out of memory", false);
        return;
    }
    http__send(hp,
               http_response_new(status, "application/json", body->p, body->len, keep_alive,
                                 NULL),
               keep_alive);
}

/* 405 with the Allow header; allow is a literal like "GET, POST". */
static void http__not_allowed(http_peer_t *hp, const char *allow, bool keep_alive) {
    char extra[64], body[128];
    snprintf(extra, sizeof extra, "Allow: %s\r\n", allow);
    int n = snprintf(body, sizeof body,
                     "{\"error\":\"method_not_allowed\",\"detail\":\"allowed: %s\"}", allow);
    http__send(hp,
               http_response_new(405, "application/json", body, (size_t)n, keep_alive, extra),
               keep_alive);
}

/* ---- auth ----------------------------------------------------------------------------- */

/* 0 with *cl filled (free with jwt_claims_free), or the HTTP status to answer (401/403)
 * with *why set. chat_id NULL: no chat to check. */
static int http__auth(chat_server_t *s, const http_request_t *req, const char *chat_id,
                      jwt_claims_t *cl, const char **why) {
    char qtok[8193];
    const char *tok = NULL;
    size_t tlen = 0;
    size_t alen;
    const char *auth = http_header(req, "Authorization", &alen);
    if (auth && alen > 7 && strncasecmp(auth, "Bearer ", 7) == 0) {
        tok = auth + 7;
        tlen = alen - 7;
        while (tlen && tok[0] == ' ') tok++, tlen--;
    } else {
        int n = http_query_param(req, "token", qtok, sizeof qtok);
        if (n > 0) {
            tok = qtok;
            tlen = (size_t)n;
        }
    }
    if (!tok) {
        *why = "missing token: pass ?token= or Authorization: Bearer";
        return 401;
    }
    int64_t now = (int64_t)time(NULL);
    int rc = s->cfg.jwks ? jwks_verify(s->cfg.jwks, tok, tlen, now, cl)
                         : jwt_verify(tok, tlen, s->cfg.jwt_secret, now, cl);
    if (rc == CHAT_EEXPIRED) {
        *why = "token expired";
        return 401;
    }
    if (rc == CHAT_ENOTFOUND) { /* jwks_verify has asked for the provider's keys again */
        *why = "unknown key id (kid): the keys are being refreshed, retry shortly";
        return 401;
    }
    if (rc < 0) {
        *why = "invalid token";
        return 401;
    }
    if (chat_id && !jwt_allows_chat(cl, chat_id)) {
        jwt_claims_free(cl);
        *why = "this token does not allow this chat";
        return 403;
    }
    return 0;
}

/* ---- WebSocket upgrade ---------------------------------------------------------------- */

static void http__upgrade(http_peer_t *hp, const http_request_t *req, const char *chat_id) {
    chat_server_t *s = hp->peer.srv;
    bool ka = req->keep_alive;
    if (req->method != HTTP_GET) {
        http__not_allowed(hp, "GET", ka);
        return;
    }
    if (s->stopping) {
        http__error(hp, 503, "shutting_down", "the server is shutting down", false);
        return;
    }
    if (!http_header_has_token(req, "Upgrade", "websocket")) {
        http__error(hp, 400, "bad_handshake", "expected Upgrade: websocket", ka);
        return;
    }
    if (!http_header_has_token(req, "Connection", "upgrade")) {
        http__error(hp, 400, "bad_handshake", "expected Connection: upgrade", ka);
        return;
    }
    size_t vlen;
    const char *ver = http_header(req, "Sec-WebSocket-Version", &vlen);
    if (!ver || vlen != 2 || memcmp(ver, "13", 2) != 0) {
        const char body[] = "{\"error\":\"unsupported_version\",\"detail\":"
                            "\"only WebSocket version 13 is supported\"}";
        http__send(hp,
                   http_response_new(426, "application/json", body, sizeof body - 1, ka,
                                     "Sec-WebSocket-Version: 13\r\n"),
                   ka);
        return;
    }
    size_t klen;
    const char *key = http_header(req, "Sec-WebSocket-Key", &klen);
    char accept[29];
    if (!key || ws_accept_key(key, klen, accept) < 0) {
        http__error(hp, 400, "bad_handshake",
                    "Sec-WebSocket-Key must be the base64 of 16 bytes", ka);
        return;
    }
    /* since: one message id, or a comma-separated list of them, one per origin node */
    uint64_t since[HTTP_MAX_CURSORS];
    size_t n_since = 0;
    char sv[HTTP_MAX_CURSORS * 21 + 1];
    int sn = http_query_param(req, "since", sv, sizeof sv);
    if (sn != CHAT_ENOTFOUND) {
        const char *p = sv, *end = sv + (sn > 0 ? sn : 0);
        bool ok = sn > 0;
        while (ok && p < end) {
            const char *comma = memchr(p, ',', (size_t)(end - p));
            const char *e = comma ? comma : end;
            ok = n_since < HTTP_MAX_CURSORS && id_parse(p, (size_t)(e - p), &since[n_since]) == 0;
            n_since++;
            p = comma ? comma + 1 : end;
            if (comma && p == end) ok = false;
        }
        if (!ok) {
            http__error(hp, 400, "bad_request",
                        "since must be a message id, or up to 32 of them separated by commas",
                        ka);
            return;
        }
    }
    /* presence=1: presence:join/leave and typing from the start (else after presence:get) */
    char pv[8];
    int pn = http_query_param(req, "presence", pv, sizeof pv);
    bool presence = pn > 0 && (strcmp(pv, "1") == 0 || strcmp(pv, "true") == 0);
    if (pn != CHAT_ENOTFOUND && !presence && strcmp(pv, "0") != 0 && strcmp(pv, "false") != 0) {
        http__error(hp, 400, "bad_request", "presence must be 1 or 0", ka);
        return;
    }
    jwt_claims_t cl;
    const char *why;
    int st = http__auth(s, req, chat_id, &cl, &why);
    if (st) {
        http__error(hp, st, st == 401 ? "unauthorized" : "forbidden", why, ka);
        return;
    }
    /* permessage-deflate: the first acceptable offer, across every Extensions header */
    char ext[WS_DEFLATE_RESPONSE_MAX];
    bool deflate = false;
    for (size_t i = 0; s->cfg.compression && !deflate && i < req->n_headers; i++) {
        const http_header_t *h = &req->headers[i];
        if (h->name_len == 24 && strncasecmp(h->name, "Sec-WebSocket-Extensions", 24) == 0)
            deflate = ws_deflate_negotiate(h->value, h->value_len, ext);
    }
    char head[160 + WS_DEFLATE_RESPONSE_MAX];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s%s%s\r\n",
                     accept, deflate ? "Sec-WebSocket-Extensions: " : "", deflate ? ext : "",
                     deflate ? "\r\n" : "");
    conn_t *c = hp->peer.conn;
    s->m.http_requests++;
    conn_send_copy(c, head, (size_t)n);
    size_t rest_len;
    const char *rest = http_reader_rest(&hp->reader, &rest_len);
    /* The connection changes hands: the HTTP peer lets go of it (it stays allocated, and
     * rest valid, until http__drive's reference is dropped). */
    chat_peer_unlink(&hp->peer);
    chat_session_start(s, c, chat_id, cl.sub, cl.exp, since, n_since, deflate, presence,
                       (const uint8_t *)rest, rest_len);
    char peer[80];
    conn_peer(c, peer, sizeof peer);
    log_debug("ws_open peer=%s user=%s chat=%s", peer, LOG_STR(cl.sub), chat_id);
    jwt_claims_free(&cl);
}

/* ---- REST ----------------------------------------------------------------------------- */

static void http__history_done(store_req_t *req) {
    op_t *op = req->data;
    http_peer_t *hp = (http_peer_t *)op->origin;
    chat_server_t *s = op->srv;
    chat_record_latency(s, op->t0);
    if (req->status < 0) {
        s->m.store_errors++;
        http__error(hp, 503, "store_unavailable", chat_strerror(req->status), op->keep_alive);
    } else {
        int want = req->limit - 1; /* one more was asked for, to know if a page follows */
        size_t n = req->n_msgs > (size_t)want ? (size_t)want : req->n_msgs;
        sbuf_t sb = {0};
        sbuf_puts(&sb, "{\"chat_id\":");
        sbuf_json_str(&sb, op->chat_id, strlen(op->chat_id));
        sbuf_puts(&sb, ",\"messages\":[");
        size_t i = 0;
        for (; i < n && (i == 0 || sb.len < HISTORY_PAGE_BYTES); i++) {
            if (i) sbuf_puts(&sb, ",");
            proto_put_msg(&sb, NULL, &req->msgs[i]);
        }
        if (i < n) n = i; /* the page is full in bytes: the rest is on the next one */
        if (req->n_msgs > n && n)
            sbuf_printf(&sb, "],\"next_before\":\"%" PRIu64 "\"}", req->msgs[n - 1].id);
        else
            sbuf_puts(&sb, "],\"next_before\":null}");
        http__json(hp, 200, &sb, op->keep_alive);
        sbuf_free(&sb);
    }
    store_req_cleanup(req);
    free(op);
    http__resume(hp);
    chat_peer_unref(&hp->peer);
}

static int http__parse_limit(const http_request_t *req, int *limit, uint64_t *before,
                             const char **why) {
    char v[32];
    int n = http_query_param(req, "limit", v, sizeof v);
    *limit = HISTORY_DEFAULT;
    if (n != CHAT_ENOTFOUND) {
        uint64_t l;
        if (n <= 0 || id_parse(v, (size_t)n, &l) < 0 || l < 1 || l > HISTORY_MAX) {
            *why = "limit must be an integer from 1 to 200";
            return -1;
        }
        *limit = (int)l;
    }
    *before = 0;
    n = http_query_param(req, "before", v, sizeof v);
    if (n != CHAT_ENOTFOUND && (n <= 0 || id_parse(v, (size_t)n, before) < 0 || !*before)) {
        *why = "before must be a message id";
        return -1;
    }
    return 0;
}

static void chat_rest_complete(op_t *op, const sbuf_t *ev);

static void http__messages(http_peer_t *hp, const http_request_t *req, const char *chat_id) {
    chat_server_t *s = hp->peer.srv;
    bool ka = req->keep_alive;
    if (req->method != HTTP_GET && req->method != HTTP_POST) {
        http__not_allowed(hp, "GET, HEAD, POST", ka);
        return;
    }
    jwt_claims_t cl;
    const char *why;
    int st = http__auth(s, req, chat_id, &cl, &why);
    if (st) {
        http__error(hp, st, st == 401 ? "unauthorized" : "forbidden", why, ka);
        return;
    }
    if (req->method == HTTP_GET) {
        int limit;
        uint64_t before;
        if (http__parse_limit(req, &limit, &before, &why) < 0) {
            http__error(hp, 400, "bad_request", why, ka);
            goto out;
        }
        op_t *op = calloc(1, sizeof(*op));
        if (!op) {
            http__error(hp, 500, "internal", "out of memory", false);
            goto out;
        }
        op->srv = s;
        op->origin = &hp->peer;
        op->keep_alive = ka;
        snprintf(op->chat_id, sizeof op->chat_id, "%s", chat_id);
        op->req.op = STORE_HISTORY;
        op->req.chat_id = op->chat_id;
        op->req.id = before;
        op->req.limit = limit + 1;
        op->req.data = op;
        op->req.cb = http__history_done;
        op->t0 = uv_hrtime();
        if (store_submit(s->store, &op->req) < 0) {
            free(op);
            http__error(hp, 503, "store_unavailable", "the store is not accepting requests", ka);
            goto out;
        }
        hp->peer.refs++;
        hp->busy = true;
        goto out;
    }
    /* POST: the same command as a WebSocket message:message, for bots and scripts */
    size_t tlen;
    const char *ct = http_header(req, "Content-Type", &tlen);
    if (!ct || tlen < 16 || strncasecmp(ct, "application/json", 16) != 0 ||
        (tlen > 16 && ct[16] != ';' && ct[16] != ' ')) {
        http__error(hp, 415, "unsupported_media_type", "send Content-Type: application/json",
                    ka);
        goto out;
    }
    /* One limit for a message whatever the door: the WebSocket limit is on the frame's
     * payload, the command's JSON; here the same JSON is the body. */
    if (req->body_len > s->cfg.max_message_bytes) {
        char detail[96];
        snprintf(detail, sizeof detail, "a message is at most %zu bytes of JSON",
                 s->cfg.max_message_bytes);
        http__error(hp, 413, "message_too_large", detail, ka);
        goto out;
    }
    proto_cmd_t cmd;
    int rc = proto_decode((const uint8_t *)(req->body ? req->body : ""), req->body_len,
                          (1u << PROTO_MESSAGE) | PROTO_IMPLICIT_MESSAGE, &cmd);
    if (rc == CHAT_EINVAL) {
        http__error(hp, 400, "bad_request", "the body must be a JSON object", ka);
        goto out;
    }
    if (rc == CHAT_EPROTO) {
        http__error(hp, 400, "bad_request", cmd.error, ka);
        proto_cmd_free(&cmd);
        goto out;
    }
    buf_t *limited = NULL;
    if (rate_admit_rest(s, cl.sub, ka, &limited)) { /* over --rate-limit: 429, nothing stored */
        proto_cmd_free(&cmd);
        http__send(hp, limited, ka);
        goto out;
    }
    if (chat_submit(s, &hp->peer, chat_rest_complete, ka, 0, chat_id, cl.sub, &cmd) < 0) {
        proto_cmd_free(&cmd);
        http__error(hp, 503, "store_unavailable", "the store is not accepting requests", ka);
        goto out;
    }
    hp->busy = true;
out:
    jwt_claims_free(&cl);
}

/* The prologue of a GET-only route: 405 for another method, 401 or 403 without a token that
 * allows chat_id (NULL: any chat). true: go on, cl filled and the caller's to free. false:
 * answered, cl untouched. */
static bool http__get_allowed(http_peer_t *hp, const http_request_t *req, const char *chat_id,
                              jwt_claims_t *cl) {
    bool ka = req->keep_alive;
    if (req->method != HTTP_GET) {
        http__not_allowed(hp, "GET, HEAD", ka);
        return false;
    }
    const char *why;
    int st = http__auth(hp->peer.srv, req, chat_id, cl, &why);
    if (st) {
        http__error(hp, st, st == 401 ? "unauthorized" : "forbidden", why, ka);
        return false;
    }
    return true;
}

/* ---- read positions (read.c) ---------------------------------------------------------- */

static void http__read_done(store_req_t *req) {
    op_t *op = req->data;
    http_peer_t *hp = (http_peer_t *)op->origin;
    chat_server_t *s = op->srv;
    chat_record_latency(s, op->t0);
    if (req->status < 0) {
        s->m.store_errors++;
        http__error(hp, 503, "store_unavailable", chat_strerror(req->status), op->keep_alive);
    } else {
        sbuf_t sb = {0};
        sbuf_puts(&sb, "{\"chat_id\":");
        sbuf_json_str(&sb, op->chat_id, strlen(op->chat_id));
        if (req->read_id) sbuf_printf(&sb, ",\"message_id\":\"%" PRIu64 "\"", req->read_id);
        else sbuf_puts(&sb, ",\"message_id\":null");
        sbuf_printf(&sb, ",\"unread\":%" PRIu32 ",\"unread_capped\":%s}", req->unread,
                    req->unread_capped ? "true" : "false");
        http__json(hp, 200, &sb, op->keep_alive);
        sbuf_free(&sb);
    }
    store_req_cleanup(req);
    free(op);
    http__resume(hp);
    chat_peer_unref(&hp->peer);
}

/* GET /api/chats/{chat_id}/read: the caller's position and what is unread after it. */
static void http__read(http_peer_t *hp, const http_request_t *req, const char *chat_id) {
    chat_server_t *s = hp->peer.srv;
    jwt_claims_t cl;
    if (!http__get_allowed(hp, req, chat_id, &cl)) return;
    bool ka = req->keep_alive;
    op_t *op = calloc(1, sizeof(*op));
    if (!op) {
        http__error(hp, 500, "internal", "out of memory", false);
        jwt_claims_free(&cl);
        return;
    }
    op->srv = s;
    op->origin = &hp->peer;
    op->keep_alive = ka;
    snprintf(op->chat_id, sizeof op->chat_id, "%s", chat_id);
    snprintf(op->user, sizeof op->user, "%s", cl.sub);
    jwt_claims_free(&cl);
    op->req.op = STORE_READ_GET;
    op->req.chat_id = op->chat_id;
    op->req.user = op->user;
    op->req.data = op;
    op->req.cb = http__read_done;
    op->t0 = uv_hrtime();
    if (store_submit(s->store, &op->req) < 0) {
        free(op);
        http__error(hp, 503, "store_unavailable", "the store is not accepting requests", ka);
        return;
    }
    hp->peer.refs++;
    hp->busy = true;
}

/* ---- search -------------------------------------------------------------------------- */

/* Both search routes parse the query here, so bad syntax is a 400 before any store work;
 * the search layer (search.h: FTS5 or a bounded scan, by --search) finds the hits. */
typedef struct search_wait {
    search_req_t req;
    http_peer_t *hp; /* referenced (peer.refs) until the answer */
    bool keep_alive;
    bool across;     /* /api/search: the answer names its chats, not one chat_id */
    search_query_t q;
    const char *chats[SEARCH_CHATS_MAX];
    char chat_ids[SEARCH_CHATS_MAX][129];
    char from[129];
} search_wait_t;

/* Between two store reads of a long search: stop when nobody waits for the answer. */
static bool search__client_waiting(void *data) {
    search_wait_t *w = data;
    conn_t *c = w->hp->peer.conn;
    return c && !conn_is_closing(c) && !w->hp->peer.srv->stopping;
}

static void search__done(search_req_t *req) {
    search_wait_t *w = req->data;
    http_peer_t *hp = w->hp;
    chat_server_t *s = hp->peer.srv;
    if (req->status == CHAT_ENOMEM) {
        http__error(hp, 500, "internal", "out of memory", false);
    } else if (req->status < 0) {
        if (s->search->down_code)
            http__error(hp, 503, s->search->down_code,
                        "the search engine did not answer; try again later", w->keep_alive);
        else {
            s->m.store_errors++;
            http__error(hp, 503, "store_unavailable", chat_strerror(req->status),
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
        /* As a history page: past HISTORY_PAGE_BYTES of JSON (at least one hit) the rest is
         * for the next request, from the last hit sent. */
        for (size_t i = 0; i < req->n_hits; i++) {
            if (i && sb.len >= HISTORY_PAGE_BYTES) {
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
        if (req->more)
            sbuf_printf(&sb, "],\"next_before\":\"%" PRIu64 "\"", req->next_before);
        else
            sbuf_puts(&sb, "],\"next_before\":null");
        sbuf_printf(&sb, ",\"scanned\":%zu}", req->scanned);
        http__json(hp, 200, &sb, w->keep_alive);
        sbuf_free(&sb);
    }
    search_req_cleanup(req);
    free(w);
    http__resume(hp);
    chat_peer_unref(&hp->peer);
}

/* q, limit and before, shared by both routes, into w. false: answered (400). */
static bool search__params(http_peer_t *hp, const http_request_t *req, search_wait_t *w) {
    bool ka = req->keep_alive;
    char q[SEARCH_Q_MAX + 1], v[32];
    const char *why;
    int qn = http_query_param(req, "q", q, sizeof q);
    if (qn == CHAT_ENOTFOUND) {
        http__error(hp, 400, "bad_request", "q (the words to look for) is required", ka);
        return false;
    }
    if (qn < 0 || !utf8_valid((const uint8_t *)q, (size_t)qn)) {
        http__error(hp, 400, "bad_request",
                    qn == CHAT_ETOOBIG ? "q must be at most 256 bytes"
                                       : "q must be percent-encoded UTF-8", ka);
        return false;
    }
    if (search_query_parse(&w->q, q, (size_t)qn, &why) < 0) {
        http__error(hp, 400, "bad_query", why, ka);
        return false;
    }
    w->req.limit = SEARCH_DEFAULT;
    int n = http_query_param(req, "limit", v, sizeof v);
    uint64_t l = 0, before = 0;
    if (n != CHAT_ENOTFOUND) {
        if (n <= 0 || id_parse(v, (size_t)n, &l) < 0 || l < 1 || l > SEARCH_LIMIT_MAX) {
            http__error(hp, 400, "bad_request", "limit must be an integer from 1 to 100", ka);
            return false;
        }
        w->req.limit = (int)l;
    }
    n = http_query_param(req, "before", v, sizeof v);
    if (n != CHAT_ENOTFOUND && (n <= 0 || id_parse(v, (size_t)n, &before) < 0 || !before)) {
        http__error(hp, 400, "bad_request", "before must be a message id", ka);
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
        if (rc == CHAT_EINVAL) http__error(hp, 400, "bad_query", why, ka);
        else if (rc == CHAT_ENOMEM) http__error(hp, 500, "internal", "out of memory", false);
        else http__error(hp, 503, "store_unavailable", "the store is not accepting requests", ka);
        return;
    }
    hp->peer.refs++;
    hp->busy = true;
}

/* GET /api/chats/{chat_id}/search?q=&before=&limit= */
static void http__search(http_peer_t *hp, const http_request_t *req, const char *chat_id) {
    jwt_claims_t cl;
    if (!http__get_allowed(hp, req, chat_id, &cl)) return;
    jwt_claims_free(&cl); /* who asks does not change what a search finds */
    search_wait_t *w = calloc(1, sizeof(*w));
    if (!w) {
        http__error(hp, 500, "internal", "out of memory", false);
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
static void http__search_all(http_peer_t *hp, const http_request_t *req) {
    bool ka = req->keep_alive;
    jwt_claims_t cl;
    if (!http__get_allowed(hp, req, NULL, &cl)) return;
    search_wait_t *w = calloc(1, sizeof(*w));
    char *list = malloc(SEARCH_CHATS_MAX * 130 + 1);
    const char *bad = NULL;
    int status = 400;
    if (!w || !list) {
        free(w);
        free(list);
        jwt_claims_free(&cl);
        http__error(hp, 500, "internal", "out of memory", false);
        return;
    }
    w->keep_alive = ka;
    w->across = true;
    if (!search__params(hp, req, w)) goto answered;
    int n = http_query_param(req, "chats", list, SEARCH_CHATS_MAX * 130 + 1);
    if (n == CHAT_ENOTFOUND) {
        if (!cl.chats) {
            bad = "chats is required: this token may read any chat, so name the chats to "
                  "search (chats=a,b)";
        }
        for (size_t i = 0; !bad && cl.chats && cl.chats[i]; i++)
            bad = search__add_chat(w, cl.chats[i], strlen(cl.chats[i]));
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
            if (!jwt_allows_chat(&cl, w->chats[i])) {
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
        http__error(hp, status, status == 403 ? "forbidden" : "bad_request", bad, ka);
        goto answered;
    }
    free(list);
    jwt_claims_free(&cl);
    search__start(hp, w);
    return;
answered:
    free(list);
    free(w);
    jwt_claims_free(&cl);
}

/* ---- discovery: /api/nodes and /api/connect ----------------------------------------- */

typedef struct nodes_wait {
    http_peer_t *hp;
    bool keep_alive;
    bool connect;       /* /api/connect: pick one; else list them all */
    char chat_id[129];
} nodes_wait_t;

static void http__put_node(sbuf_t *sb, const bus_node_t *n) {
    char started[25], seen[25];
    time_format_ms(n->started_at, started);
    time_format_ms(n->seen_at, seen);
    sbuf_printf(sb, "{\"id\":\"%s\",\"url\":", n->id);
    sbuf_json_str(sb, n->url, strlen(n->url));
    sbuf_printf(sb, ",\"connections\":%" PRIu64 ",\"started_at\":\"%s\",\"seen_at\":\"%s\","
                    "\"draining\":%s",
                n->connections, started, seen, n->draining ? "true" : "false");
    /* the id inside its message ids (null from a node that does not report it) */
    if (n->node_id >= 0)
        sbuf_printf(sb, ",\"node_id\":%d}", n->node_id);
    else
        sbuf_puts(sb, ",\"node_id\":null}");
}

static void http__nodes_done(void *ud, int status, const bus_node_t *nodes, size_t n) {
    nodes_wait_t *w = ud;
    http_peer_t *hp = w->hp;
    chat_server_t *s = hp->peer.srv;
    sbuf_t sb = {0};
    if (!w->connect) {
        if (status < 0) {
            http__error(hp, 503, "bus_unavailable", "the node registry cannot be read now",
                        w->keep_alive);
        } else {
            sbuf_puts(&sb, "{\"nodes\":[");
            for (size_t i = 0; i < n; i++) {
                if (i) sbuf_puts(&sb, ",");
                http__put_node(&sb, &nodes[i]);
            }
            sbuf_puts(&sb, "]}");
            http__json(hp, 200, &sb, w->keep_alive);
        }
    } else {
        /* The least-loaded live node that is not draining; ourselves if the registry is
         * out of reach (a client should still get somewhere). */
        const bus_node_t *best = status == 0 ? chat_cluster_pick(s, nodes, n) : NULL;
        if (!best && !s->stopping) best = &s->self;
        if (!best) {
            http__error(hp, 503, "no_nodes", "no node is accepting connections", w->keep_alive);
        } else {
            sbuf_puts(&sb, "{\"chat_id\":");
            sbuf_json_str(&sb, w->chat_id, strlen(w->chat_id));
            sbuf_printf(&sb, ",\"node\":\"%s\",\"url\":", best->id);
            sbuf_json_str(&sb, best->url, strlen(best->url));
            sbuf_puts(&sb, ",\"ws_url\":");
            char full[512];
            int fl = snprintf(full, sizeof full, "%s/ws/chat/%s", best->url, w->chat_id);
            sbuf_json_str(&sb, full, (size_t)fl < sizeof full ? (size_t)fl : sizeof full - 1);
            sbuf_puts(&sb, "}");
            http__json(hp, 200, &sb, w->keep_alive);
        }
    }
    sbuf_free(&sb);
    free(w);
    http__resume(hp);
    chat_peer_unref(&hp->peer);
}

static void http__nodes(http_peer_t *hp, const http_request_t *req, bool connect) {
    chat_server_t *s = hp->peer.srv;
    bool ka = req->keep_alive;
    jwt_claims_t cl;
    if (!http__get_allowed(hp, req, NULL, &cl)) return;
    nodes_wait_t *w = calloc(1, sizeof(*w));
    if (!w) {
        jwt_claims_free(&cl);
        http__error(hp, 500, "internal", "out of memory", false);
        return;
    }
    w->hp = hp;
    w->keep_alive = ka;
    w->connect = connect;
    if (connect) {
        int n = http_query_param(req, "chat_id", w->chat_id, sizeof w->chat_id);
        const char *bad = n == CHAT_ENOTFOUND ? "chat_id is required"
                          : n <= 0 || !chat_id_valid(w->chat_id, (size_t)n)
                              ? CHAT_ID_RULE
                              : NULL;
        if (!bad && !jwt_allows_chat(&cl, w->chat_id)) {
            jwt_claims_free(&cl);
            free(w);
            http__error(hp, 403, "forbidden", "this token does not allow this chat", ka);
            return;
        }
        if (bad) {
            jwt_claims_free(&cl);
            free(w);
            http__error(hp, 400, "bad_request", bad, ka);
            return;
        }
    }
    jwt_claims_free(&cl);
    if (bus_list_nodes(s->bus, http__nodes_done, w) < 0) {
        free(w);
        http__error(hp, 503, "bus_unavailable", "the node registry cannot be read now", ka);
        return;
    }
    /* busy until the registry answers (peer kept alive by the extra reference) */
    hp->peer.refs++;
    hp->busy = true;
}

/* ---- presence ------------------------------------------------------------------------- */

typedef struct presence_wait {
    http_peer_t *hp; /* referenced until the answer */
    bool keep_alive;
    bool asking;     /* inside chat_presence_rest: an answer now is not a resume */
    bool answered;
} presence_wait_t;

static void http__presence_done(void *ud, const sbuf_t *body) {
    presence_wait_t *w = ud;
    http_peer_t *hp = w->hp;
    if (body)
        http__json(hp, 200, body, w->keep_alive);
    else
        http__error(hp, 503, "bus_unavailable", "presence cannot be read now", w->keep_alive);
    if (w->asking) {
        w->answered = true; /* http__presence finishes it */
        return;
    }
    free(w);
    http__resume(hp);
    chat_peer_unref(&hp->peer);
}

/* GET /api/chats/{chat_id}/presence: the users online in the chat, on any node. */
static void http__presence(http_peer_t *hp, const http_request_t *req, const char *chat_id) {
    jwt_claims_t cl;
    if (!http__get_allowed(hp, req, chat_id, &cl)) return;
    jwt_claims_free(&cl);
    bool ka = req->keep_alive;
    presence_wait_t *w = calloc(1, sizeof(*w));
    if (!w) {
        http__error(hp, 500, "internal", "out of memory", false);
        return;
    }
    w->hp = hp;
    w->keep_alive = ka;
    w->asking = true;
    int rc = chat_presence_rest(hp->peer.srv, chat_id, http__presence_done, w);
    w->asking = false;
    if (rc < 0 || w->answered) {
        if (rc < 0) http__error(hp, 503, "bus_unavailable", "presence cannot be read now", ka);
        free(w);
        return;
    }
    /* busy until the bus answers (peer kept alive by the extra reference) */
    hp->peer.refs++;
    hp->busy = true;
}

/* Development only (--dev): a token for any user name, so a person can try the web page
 * without minting tokens by hand. Without --dev the route does not exist. */
static void http__dev_token(http_peer_t *hp, const http_request_t *req) {
    chat_server_t *s = hp->peer.srv;
    bool ka = req->keep_alive;
    if (req->method != HTTP_POST) {
        http__not_allowed(hp, "POST", ka);
        return;
    }
    json_error_t jerr;
    json_t *body = req->body ? json_loadb(req->body, req->body_len, 0, &jerr) : NULL;
    const char *user = json_string_value(json_object_get(body, "user"));
    size_t ulen = user ? strlen(user) : 0;
    bool ok = ulen >= 1 && ulen <= 64;
    for (size_t i = 0; ok && i < ulen; i++)
        if ((unsigned char)user[i] < 0x20 || user[i] == 0x7f) ok = false;
    /* an optional short life, so that a developer (and the browser test) can watch the page
     * refresh its token before exp without waiting a day */
    json_t *jttl = json_object_get(body, "ttl");
    int64_t ttl = jttl ? json_integer_value(jttl) : 86400;
    if (ok && jttl && (!json_is_integer(jttl) || ttl < 1 || ttl > 86400)) {
        json_decref(body);
        http__error(hp, 400, "bad_request", "ttl must be whole seconds from 1 to 86400", ka);
        return;
    }
    if (!ok) {
        json_decref(body);
        http__error(hp, 400, "bad_request",
                    "body must be {\"user\": name}, 1 to 64 bytes without control characters",
                    ka);
        return;
    }
    char *tok = jwt_sign(user, (int64_t)time(NULL), ttl, NULL, s->cfg.jwt_secret);
    sbuf_t sb = {0};
    if (tok) {
        sbuf_puts(&sb, "{\"user\":");
        sbuf_json_str(&sb, user, ulen);
        sbuf_printf(&sb, ",\"token\":\"%s\"}", tok);
    }
    json_decref(body);
    free(tok);
    if (!tok) http__error(hp, 500, "internal", "cannot sign a token", ka);
    else http__json(hp, 200, &sb, ka);
    sbuf_free(&sb);
}

static void chat_rest_complete(op_t *op, const sbuf_t *ev) {
    http_peer_t *hp = (http_peer_t *)op->origin;
    store_req_t *req = &op->req;
    if (req->status == 0)
        http__json(hp, req->duplicate ? 200 : 201, ev, op->keep_alive);
    else if (req->status == CHAT_ENOTFOUND)
        http__error(hp, 404, "not_found", "no such message in this chat", op->keep_alive);
    else if (req->status == CHAT_EPERM)
        http__error(hp, 403, "not_author", "only the author may change a message",
                    op->keep_alive);
    else if (req->status == CHAT_EBUSY) /* the Kafka outbox is full (src/stream/) */
        http__error(hp, 503, "unavailable",
                    "the event stream is behind (outbox full): not stored, retry later",
                    op->keep_alive);
    else
        http__error(hp, 503, "store_unavailable",
                    "the message could not be stored; it was not delivered", op->keep_alive);
    http__resume(hp);
}

/* ---- routing -------------------------------------------------------------------------- */

/* If path is prefix + one segment + suffix (suffix may be "" or "/" when slash_ok), decode
 * the segment into out. Returns 1 on a match, 0 if the shape differs, -1 if the segment
 * is not a valid chat id. */
static int http__match(const char *path, size_t n, const char *prefix, const char *suffix,
                       bool slash_ok, char *out, size_t outcap) {
    size_t pl = strlen(prefix), sl = strlen(suffix);
    if (n <= pl || memcmp(path, prefix, pl) != 0) return 0;
    const char *seg = path + pl;
    size_t rest = n - pl;
    const char *slash = memchr(seg, '/', rest);
    size_t seglen = slash ? (size_t)(slash - seg) : rest;
    const char *tail = seg + seglen;
    size_t tail_len = rest - seglen;
    bool ok = (tail_len == sl && memcmp(tail, suffix, sl) == 0) ||
              (slash_ok && tail_len == sl + 1 && memcmp(tail, suffix, sl) == 0 &&
               tail[sl] == '/');
    if (!ok) return 0;
    int dl = http_pct_decode(seg, seglen, out, outcap, false);
    if (dl <= 0 || !chat_id_valid(out, (size_t)dl)) return -1;
    return 1;
}

static void http__route(http_peer_t *hp, const http_request_t *in) {
    chat_server_t *s = hp->peer.srv;
    /* HEAD is GET without the body (RFC 7231 4.3.2), except on the WebSocket path, where a
     * GET would upgrade: there it stays HEAD and gets its 405. Either way the answer carries
     * no body (http__send drops it), or the connection would fall out of step. */
    http_request_t head_as_get;
    const http_request_t *req = in;
    if (in->method == HTTP_HEAD) {
        hp->head = true;
        if (!(in->path_len >= 9 && memcmp(in->path, "/ws/chat/", 9) == 0)) {
            head_as_get = *in;
            head_as_get.method = HTTP_GET;
            req = &head_as_get;
        }
    }
    bool ka = req->keep_alive;
    const char *p = req->path;
    size_t n = req->path_len;
    char chat_id[129]; /* a valid chat id is at most 128 bytes */

    if (hp->peer.conn->over_limit) {
        /* Accepted over --max-connections(-per-ip): answered, never upgraded, then closed. */
        http__error(hp, 503, "too_many_connections",
                    hp->peer.conn->over_limit == CONN_OVER_PER_IP
                        ? "too many connections from this address; try again later"
                        : "the server has too many connections; try again later",
                    false);
        return;
    }

    /* The routes that name a chat: a bad chat id is the same 400 on each. */
    static const struct {
        const char *prefix, *suffix;
        bool slash_ok;
        void (*fn)(http_peer_t *, const http_request_t *, const char *);
    } chat_routes[] = {
        {"/ws/chat/", "", true, http__upgrade},
        {"/api/chats/", "/messages", false, http__messages},
        {"/api/chats/", "/search", false, http__search},
        {"/api/chats/", "/presence", false, http__presence},
        {"/api/chats/", "/read", false, http__read},
    };
    for (size_t i = 0; i < sizeof chat_routes / sizeof chat_routes[0]; i++) {
        int m = http__match(p, n, chat_routes[i].prefix, chat_routes[i].suffix,
                            chat_routes[i].slash_ok, chat_id, sizeof chat_id);
        if (!m) continue;
        if (m < 0) http__error(hp, 400, "bad_chat_id", CHAT_ID_RULE, ka);
        else chat_routes[i].fn(hp, req, chat_id);
        return;
    }
    if ((n == 11 && memcmp(p, "/api/search", 11) == 0) ||
        (n == 12 && memcmp(p, "/api/search/", 12) == 0)) {
        http__search_all(hp, req);
        return;
    }
    if (n == 10 && memcmp(p, "/api/nodes", 10) == 0) {
        http__nodes(hp, req, false);
        return;
    }
    if (n == 12 && memcmp(p, "/api/connect", 12) == 0) {
        http__nodes(hp, req, true);
        return;
    }
    if (s->cfg.dev && n == 14 && memcmp(p, "/api/dev/token", 14) == 0) {
        http__dev_token(hp, req);
        return;
    }
    bool get = req->method == HTTP_GET;
    if (n == 8 && memcmp(p, "/healthz", 8) == 0) {
        if (!get) goto not_allowed;
        /* a store that cannot write makes this node useless for sending: say so, so that
         * a load balancer or an operator sees it (it turns ok again once writes work) */
        char why[256];
        if (!s->stopping && store_health(s->store, why, sizeof why) < 0) {
            sbuf_t sb = {0};
            sbuf_printf(&sb, "{\"status\":\"unavailable\",\"error\":\"store_unavailable\","
                             "\"detail\":");
            sbuf_json_str(&sb, why, strlen(why));
            sbuf_printf(&sb, "}");
            http__json(hp, 503, &sb, ka);
            sbuf_free(&sb);
            return;
        }
        static const char ok[] = "{\"status\":\"ok\"}";
        http__send(hp, http_response_new(s->stopping ? 503 : 200, "application/json", ok,
                                         sizeof ok - 1, ka, NULL),
                   ka);
        return;
    }
    if (n == 8 && memcmp(p, "/metrics", 8) == 0) {
        if (!get) goto not_allowed;
        sbuf_t sb = {0};
        chat_metrics_render(s, &sb);
        http__send(hp, http_response_new(200, "text/plain; version=0.0.4", sb.p, sb.len, ka,
                                         NULL),
                   ka);
        sbuf_free(&sb);
        return;
    }
    const static_file_t *f = (n >= 4 && memcmp(p, "/api", 4) == 0) ? NULL
                                                                    : chat_static_find(s, p, n);
    if (f) {
        if (!get) goto not_allowed;
        http__send(hp, http_response_new(200, f->type, f->body->data, f->body->len, ka,
                                         "Cache-Control: no-cache\r\n"),
                   ka);
        return;
    }
    http__error(hp, 404, "not_found", "no such resource", ka);
    return;
not_allowed:
    http__not_allowed(hp, "GET, HEAD", ka);
}

/* ---- the connection ------------------------------------------------------------------- */

/* Too many answers wait unread: stop reading and parsing until they drain. */
static bool http__backlogged(http_peer_t *hp) {
    conn_t *c = hp->peer.conn;
    size_t high = hp->peer.srv->cfg.max_outbound_bytes / 2;
    if (conn_queued(c) <= high) return false;
    hp->out_paused = true;
    conn_pause_read(c);
    conn_notify_drain(c, high / 2);
    return true;
}

static void http__drive(http_peer_t *hp, const uint8_t *data, size_t len) {
    http_request_t req;
    hp->peer.refs++;
    int rc = http_reader_feed(&hp->reader, (const char *)data, len, &req);
    while (rc == 1) {
        hp->req_started = 0;
        if (http__backlogged(hp)) break; /* the request stays in the reader */
        http__route(hp, &req);
        if (!hp->peer.conn || hp->peer.kind != PEER_HTTP) break; /* upgraded or gone */
        if (hp->busy || conn_is_closing(hp->peer.conn)) break;
        http_reader_consume(&hp->reader);
        rc = http_reader_feed(&hp->reader, NULL, 0, &req);
    }
    bool in_body;
    size_t body_len;
    if (rc == 0 && hp->peer.conn && !hp->req_started &&
        http_reader_partial(&hp->reader, &in_body, &body_len))
        hp->req_started = uv_now(hp->peer.srv->loop);
    size_t clen;
    const char *cont = rc == 0 && hp->peer.conn && !conn_is_closing(hp->peer.conn)
                           ? http_reader_continue(&hp->reader, &clen)
                           : NULL;
    if (cont) {
        buf_t *b = buf_from(cont, clen);
        if (b) conn_send_force(hp->peer.conn, b);
        buf_unref(b);
    }
    if (rc < 0 && hp->peer.conn && !conn_is_closing(hp->peer.conn)) {
        int st = hp->reader.error_status ? hp->reader.error_status : 400;
        http__error(hp, st,
                    st == 431   ? "headers_too_large"
                    : st == 413 ? "body_too_large"
                    : st >= 500 ? "internal"
                                : "bad_request",
                    st == 431   ? "the request head is too large"
                    : st == 413 ? "the request body is too large"
                    : st >= 500 ? "out of memory"
                                : "malformed HTTP request",
                    false);
    }
    chat_peer_unref(&hp->peer);
}

static void http__on_open(conn_t *c) {
    chat_server_t *s = c->server->handler_data;
    http_peer_t *hp = calloc(1, sizeof(*hp));
    if (!hp) {
        conn_abort(c);
        return;
    }
    chat_peer_link(s, &hp->peer, PEER_HTTP, c);
    http_reader_init(&hp->reader);
    hp->reader.max_body_bytes = s->cfg.max_body_bytes;
    conn_set_handler(c, &chat_http_handler, hp);
}

static void http__on_read(conn_t *c, uint8_t *data, size_t len) {
    http_peer_t *hp = c->ctx;
    hp->peer.last_rx = uv_now(hp->peer.srv->loop);
    if (hp->busy || hp->out_paused) {
        sbuf_put(&hp->pending, data, len);
        if (hp->pending.oom || hp->pending.len > HTTP_PENDING_MAX) conn_abort(c);
        return;
    }
    http__drive(hp, data, len);
}

/* The answers drained: read again, starting with the request that waited in the reader. */
static void http__on_drain(conn_t *c) {
    http_peer_t *hp = c->ctx;
    if (!hp->out_paused) return;
    hp->out_paused = false;
    conn_resume_read(c);
    if (hp->busy) return; /* its answer goes on with the rest (http__resume) */
    sbuf_t pending = hp->pending;
    memset(&hp->pending, 0, sizeof(hp->pending));
    http__drive(hp, (const uint8_t *)pending.p, pending.len);
    sbuf_free(&pending);
}

static void http__on_close(conn_t *c) {
    http_peer_t *hp = c->ctx;
    chat_peer_unlink(&hp->peer);
}

void chat_http_sweep(http_peer_t *hp, uint64_t now, uint64_t idle_ms) {
    conn_t *c = hp->peer.conn;
    if (hp->busy) return;
    bool in_body;
    size_t body_len;
    if (hp->req_started && http_reader_partial(&hp->reader, &in_body, &body_len)) {
        uint64_t allowed = hp->peer.srv->cfg.header_timeout_ms;
        if (in_body) allowed += allowed + (uint64_t)body_len * 1000 / BODY_MIN_RATE;
        if (now - hp->req_started > allowed) {
            char peer[80];
            conn_peer(c, peer, sizeof peer);
            log_info("request_timeout peer=%s in_body=%d", peer, (int)in_body);
            http__error(hp, 408, "request_timeout",
                        in_body ? "the request body arrives too slowly"
                                : "the request head did not arrive in time",
                        false);
            return;
        }
    }
    uint64_t active = hp->peer.last_rx > c->last_tx ? hp->peer.last_rx : c->last_tx;
    if (now - active >= idle_ms) conn_close(c);
}

const conn_handler_t chat_http_handler = {
    .on_open = http__on_open,
    .on_read = http__on_read,
    .on_close = http__on_close,
    .on_drain = http__on_drain,
};

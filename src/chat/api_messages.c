/* api_messages: /api/chats/{chat_id}/messages. GET: a page of history, newest first
 * (?limit=, ?before=). POST: send a message, the same command as a WebSocket
 * message:message, for bots and scripts; answered once stored (api__sent). */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "api.h"

#define HISTORY_DEFAULT 50
#define HISTORY_MAX 200

static void api__history_done(store_req_t *req) {
    op_t *op = req->data;
    http_peer_t *hp = (http_peer_t *)op->origin;
    if (!api_store_failed(op, req)) {
        int want = req->limit - 1; /* one more was asked for, to know if a page follows */
        size_t n = req->n_msgs > (size_t)want ? (size_t)want : req->n_msgs;
        sbuf_t sb = {0};
        sbuf_puts(&sb, "{\"chat_id\":");
        sbuf_json_str(&sb, op->chat_id, strlen(op->chat_id));
        sbuf_puts(&sb, ",\"messages\":[");
        size_t i = 0;
        for (; i < n && (i == 0 || sb.len < API_PAGE_BYTES); i++) {
            if (i) sbuf_puts(&sb, ",");
            proto_put_msg(&sb, NULL, &req->msgs[i]);
        }
        if (i < n) n = i; /* the page is full in bytes: the rest is on the next one */
        if (req->n_msgs > n && n)
            sbuf_printf(&sb, "],\"next_before\":\"%" PRIu64 "\"}", req->msgs[n - 1].id);
        else sbuf_puts(&sb, "],\"next_before\":null}");
        http_conn_json(&hp->http, 200, &sb, op->keep_alive);
        sbuf_free(&sb);
    }
    store_req_cleanup(req);
    free(op);
    api_done(hp);
}

static int api__parse_limit(const http_request_t *req, int *limit, uint64_t *before,
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

static void api__history(http_peer_t *hp, const http_request_t *req, const char *chat_id) {
    chat_server_t *s = hp->peer.srv;
    http_conn_t *hc = &hp->http;
    bool ka = req->keep_alive;
    int limit;
    uint64_t before;
    const char *why;
    if (api__parse_limit(req, &limit, &before, &why) < 0) {
        http_conn_error(hc, 400, "bad_request", why, ka);
        return;
    }
    op_t *op = calloc(1, sizeof(*op));
    if (!op) {
        http_conn_error(hc, 500, "internal", "out of memory", false);
        return;
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
    op->req.cb = api__history_done;
    op->t0 = uv_hrtime();
    if (store_submit(s->store, &op->req) < 0) {
        free(op);
        http_conn_error(hc, 503, "store_unavailable", "the store is not accepting requests", ka);
        return;
    }
    api_wait(hp);
}

static void api__sent(op_t *op, const sbuf_t *ev);

static void api__send(http_peer_t *hp, const http_request_t *req, const char *chat_id,
                      const jwt_claims_t *cl) {
    chat_server_t *s = hp->peer.srv;
    http_conn_t *hc = &hp->http;
    bool ka = req->keep_alive;
    size_t tlen;
    const char *ct = http_header(req, "Content-Type", &tlen);
    if (!ct || tlen < 16 || strncasecmp(ct, "application/json", 16) != 0 ||
        (tlen > 16 && ct[16] != ';' && ct[16] != ' ')) {
        http_conn_error(hc, 415, "unsupported_media_type", "send Content-Type: application/json",
                        ka);
        return;
    }
    /* One limit for a message whatever the door: the WebSocket limit is on the frame's
     * payload, the command's JSON; here the same JSON is the body. */
    if (req->body_len > s->cfg.max_message_bytes) {
        char detail[96];
        snprintf(detail, sizeof detail, "a message is at most %zu bytes of JSON",
                 s->cfg.max_message_bytes);
        http_conn_error(hc, 413, "message_too_large", detail, ka);
        return;
    }
    proto_cmd_t cmd;
    int rc = proto_decode((const uint8_t *)(req->body ? req->body : ""), req->body_len,
                          (1u << PROTO_MESSAGE) | PROTO_IMPLICIT_MESSAGE, &cmd);
    if (rc == CHAT_EINVAL) {
        http_conn_error(hc, 400, "bad_request", "the body must be a JSON object", ka);
        return;
    }
    if (rc == CHAT_EPROTO) {
        http_conn_error(hc, 400, "bad_request", cmd.error, ka);
        proto_cmd_free(&cmd);
        return;
    }
    buf_t *limited = NULL;
    if (rate_admit_rest(s, cl->sub, ka, &limited)) { /* over --rate-limit: 429, nothing stored */
        proto_cmd_free(&cmd);
        http_conn_respond(hc, limited, ka);
        return;
    }
    if (chat_submit(s, &hp->peer, api__sent, ka, 0, chat_id, cl->sub, &cmd) < 0) {
        proto_cmd_free(&cmd);
        http_conn_error(hc, 503, "store_unavailable", "the store is not accepting requests", ka);
        return;
    }
    /* the op holds the peer until api__sent has run */
    http_conn_wait(hc);
}

void api_messages(http_peer_t *hp, const http_request_t *req, const char *chat_id,
                  const jwt_claims_t *cl) {
    if (req->method == HTTP_GET) api__history(hp, req, chat_id);
    else api__send(hp, req, chat_id, cl);
}

/* chat_submit's reply: the stored event (201, or 200 for a retry), or why not. */
static void api__sent(op_t *op, const sbuf_t *ev) {
    http_peer_t *hp = (http_peer_t *)op->origin;
    http_conn_t *hc = &hp->http;
    store_req_t *req = &op->req;
    bool ka = op->keep_alive;
    if (req->status == 0) http_conn_json(hc, req->duplicate ? 200 : 201, ev, ka);
    else if (req->status == CHAT_ENOTFOUND)
        http_conn_error(hc, 404, "not_found", "no such message in this chat", ka);
    else if (req->status == CHAT_EPERM)
        http_conn_error(hc, 403, "not_author", "only the author may change a message", ka);
    else if (req->status == CHAT_EBUSY) /* the Kafka outbox is full (src/stream/) */
        http_conn_error(hc, 503, "unavailable",
                        "the event stream is behind (outbox full): not stored, retry later", ka);
    else
        http_conn_error(hc, 503, "store_unavailable",
                        "the message could not be stored; it was not delivered", ka);
    http_conn_resume(hc);
}

/* api_read: GET /api/chats/{chat_id}/read, the caller's read position in the chat and how
 * many messages after it are unread (the positions themselves: read.c). */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"

static void api__read_done(store_req_t *req) {
    op_t *op = req->data;
    http_peer_t *hp = (http_peer_t *)op->origin;
    if (!api_store_failed(op, req)) {
        sbuf_t sb = {0};
        sbuf_puts(&sb, "{\"chat_id\":");
        sbuf_json_str(&sb, op->chat_id, strlen(op->chat_id));
        if (req->read_id) sbuf_printf(&sb, ",\"message_id\":\"%" PRIu64 "\"", req->read_id);
        else sbuf_puts(&sb, ",\"message_id\":null");
        sbuf_printf(&sb, ",\"unread\":%" PRIu32 ",\"unread_capped\":%s}", req->unread,
                    req->unread_capped ? "true" : "false");
        http_conn_json(&hp->http, 200, &sb, op->keep_alive);
        sbuf_free(&sb);
    }
    store_req_cleanup(req);
    free(op);
    api_done(hp);
}

void api_read(http_peer_t *hp, const http_request_t *req, const char *chat_id,
              const jwt_claims_t *cl) {
    chat_server_t *s = hp->peer.srv;
    bool ka = req->keep_alive;
    op_t *op = calloc(1, sizeof(*op));
    if (!op) {
        http_conn_error(&hp->http, 500, "internal", "out of memory", false);
        return;
    }
    op->srv = s;
    op->origin = &hp->peer;
    op->keep_alive = ka;
    snprintf(op->chat_id, sizeof op->chat_id, "%s", chat_id);
    snprintf(op->user, sizeof op->user, "%s", cl->sub);
    op->req.op = STORE_READ_GET;
    op->req.chat_id = op->chat_id;
    op->req.user = op->user;
    op->req.data = op;
    op->req.cb = api__read_done;
    op->t0 = uv_hrtime();
    if (store_submit(s->store, &op->req) < 0) {
        free(op);
        http_conn_error(&hp->http, 503, "store_unavailable", "the store is not accepting requests",
                        ka);
        return;
    }
    api_wait(hp);
}

/* api_status: what is not the chat API: GET /healthz (for load balancers: 503 while the
 * store cannot write or the node drains), GET /metrics (Prometheus text, server.c renders
 * it), and the files of the web client for any other path outside /api. */
#include <string.h>

#include "api.h"

void api_healthz(http_peer_t *hp, const http_request_t *req, const char *unused,
                 const jwt_claims_t *no_token) {
    chat_server_t *s = hp->peer.srv;
    bool ka = req->keep_alive;
    /* a store that cannot write makes this node useless for sending: say so, so that a load
     * balancer or an operator sees it (it turns ok again once writes work) */
    char why[256];
    if (!s->stopping && store_health(s->store, why, sizeof why) < 0) {
        sbuf_t sb = {0};
        sbuf_printf(&sb, "{\"status\":\"unavailable\",\"error\":\"store_unavailable\","
                         "\"detail\":");
        sbuf_json_str(&sb, why, strlen(why));
        sbuf_printf(&sb, "}");
        http_conn_json(&hp->http, 503, &sb, ka);
        sbuf_free(&sb);
        return;
    }
    static const char ok[] = "{\"status\":\"ok\"}";
    http_conn_respond(
        &hp->http,
        http_response_new(s->stopping ? 503 : 200, "application/json", ok, sizeof ok - 1, ka, NULL),
        ka);
}

void api_metrics(http_peer_t *hp, const http_request_t *req, const char *unused,
                 const jwt_claims_t *no_token) {
    bool ka = req->keep_alive;
    sbuf_t sb = {0};
    chat_metrics_render(hp->peer.srv, &sb);
    http_conn_respond(
        &hp->http, http_response_new(200, "text/plain; version=0.0.4", sb.p, sb.len, ka, NULL), ka);
    sbuf_free(&sb);
}

void api_static(http_peer_t *hp, const http_request_t *req, const char *unused,
                const jwt_claims_t *no_token) {
    bool ka = req->keep_alive;
    const char *p = req->path;
    size_t n = req->path_len;
    const static_file_t *f =
        (n >= 4 && memcmp(p, "/api", 4) == 0) ? NULL : chat_static_find(hp->peer.srv, p, n);
    if (!f) {
        http_conn_error(&hp->http, 404, "not_found", "no such resource", ka);
        return;
    }
    if (req->method != HTTP_GET) {
        http_conn_not_allowed(&hp->http, "GET, HEAD", ka);
        return;
    }
    http_conn_respond(&hp->http,
                      http_response_new(200, f->type, f->body->data, f->body->len, ka,
                                        "Cache-Control: no-cache\r\n"),
                      ka);
}

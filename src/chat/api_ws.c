/* api_ws: GET /ws/chat/{chat_id}, the WebSocket upgrade: the handshake's checks, ?since=
 * and ?presence=, the token (api_auth), permessage-deflate, the 101; then the connection
 * leaves HTTP for a session (session.c). */
#include <string.h>
#include <strings.h>

#include "api.h"

#define WS_MAX_CURSORS 32

/* ?since=: one message id, or a comma-separated list of them, one per origin node.
 * Returns the number of cursors, or -1 if malformed. */
static int api__since(const http_request_t *req, uint64_t since[WS_MAX_CURSORS]) {
    char sv[WS_MAX_CURSORS * 21 + 1];
    int sn = http_query_param(req, "since", sv, sizeof sv);
    if (sn == CHAT_ENOTFOUND) return 0;
    size_t n_since = 0;
    const char *p = sv, *end = sv + (sn > 0 ? sn : 0);
    bool ok = sn > 0;
    while (ok && p < end) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *e = comma ? comma : end;
        ok = n_since < WS_MAX_CURSORS && id_parse(p, (size_t)(e - p), &since[n_since]) == 0;
        n_since++;
        p = comma ? comma + 1 : end;
        if (comma && p == end) ok = false;
    }
    return ok ? (int)n_since : -1;
}

void api_ws_upgrade(http_peer_t *hp, const http_request_t *req, const char *chat_id,
                    const jwt_claims_t *unused) {
    chat_server_t *s = hp->peer.srv;
    http_conn_t *hc = &hp->http;
    bool ka = req->keep_alive;
    if (s->stopping) {
        http_conn_error(hc, 503, "shutting_down", "the server is shutting down", false);
        return;
    }
    if (!http_header_has_token(req, "Upgrade", "websocket")) {
        http_conn_error(hc, 400, "bad_handshake", "expected Upgrade: websocket", ka);
        return;
    }
    if (!http_header_has_token(req, "Connection", "upgrade")) {
        http_conn_error(hc, 400, "bad_handshake", "expected Connection: upgrade", ka);
        return;
    }
    size_t vlen;
    const char *ver = http_header(req, "Sec-WebSocket-Version", &vlen);
    if (!ver || vlen != 2 || memcmp(ver, "13", 2) != 0) {
        const char body[] = "{\"error\":\"unsupported_version\",\"detail\":"
                            "\"only WebSocket version 13 is supported\"}";
        http_conn_respond(hc,
                          http_response_new(426, "application/json", body, sizeof body - 1, ka,
                                            "Sec-WebSocket-Version: 13\r\n"),
                          ka);
        return;
    }
    size_t klen;
    const char *key = http_header(req, "Sec-WebSocket-Key", &klen);
    char accept[29];
    if (!key || ws_accept_key(key, klen, accept) < 0) {
        http_conn_error(hc, 400, "bad_handshake",
                        "Sec-WebSocket-Key must be the base64 of 16 bytes", ka);
        return;
    }
    uint64_t since[WS_MAX_CURSORS];
    int n_since = api__since(req, since);
    if (n_since < 0) {
        http_conn_error(hc, 400, "bad_request",
                        "since must be a message id, or up to 32 of them separated by commas", ka);
        return;
    }
    /* presence=1: presence:join/leave and typing from the start (else after presence:get) */
    char pv[8];
    int pn = http_query_param(req, "presence", pv, sizeof pv);
    bool presence = pn > 0 && (strcmp(pv, "1") == 0 || strcmp(pv, "true") == 0);
    if (pn != CHAT_ENOTFOUND && !presence && strcmp(pv, "0") != 0 && strcmp(pv, "false") != 0) {
        http_conn_error(hc, 400, "bad_request", "presence must be 1 or 0", ka);
        return;
    }
    /* the token last, as the checks above need none */
    jwt_claims_t cl;
    if (!api_auth(hp, req, chat_id, &cl)) return;
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
    s->m.http_requests++;
    conn_send_copy(hc->conn, head, (size_t)n);
    /* The connection changes hands: the HTTP peer lets go of it (it stays allocated, and
     * rest valid, until the driver's hold on it is released). */
    const uint8_t *rest;
    size_t rest_len;
    conn_t *c = http_conn_detach(hc, &rest, &rest_len);
    chat_peer_unlink(&hp->peer);
    chat_session_start(s, c, chat_id, cl.sub, cl.exp, since, (size_t)n_since, deflate, presence,
                       rest, rest_len);
    char peer[80];
    conn_peer(c, peer, sizeof peer);
    log_debug("ws_open peer=%s user=%s chat=%s", peer, LOG_STR(cl.sub), chat_id);
    jwt_claims_free(&cl);
}

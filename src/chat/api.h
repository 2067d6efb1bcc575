/* api: what the endpoint files (api_*.c) share with the route table (routes.c).
 *
 * routes.c reads each request off the HTTP driver (http/server.h), finds its route in one
 * table, checks the method and, for routes that ask for it, the token; the handler named
 * there does the rest and answers through &hp->http (now, or later after api_wait). Not
 * part of the chat layer's contract.
 */
#ifndef CHAT_API_H
#define CHAT_API_H

#include "chat/command.h"

/* A route's handler. chat_id: the decoded, valid chat id of a {chat_id} route, else NULL.
 * cl: the checked token of a route with ROUTE_AUTH (borrowed: freed when the handler
 * returns, so copy what outlives it), else NULL. req->method is HTTP_GET for a HEAD. */
typedef void (*api_fn)(http_peer_t *hp, const http_request_t *req, const char *chat_id,
                       const jwt_claims_t *cl);

/* The answer comes later (a store, search or bus callback): hp is referenced until
 * api_done, and requests that follow wait. */
static inline void api_wait(http_peer_t *hp) {
    hp->peer.refs++;
    http_conn_wait(&hp->http);
}
/* The later answer was sent: go on with the requests that wait, drop api_wait's reference
 * (which may free hp). */
static inline void api_done(http_peer_t *hp) {
    http_conn_resume(&hp->http);
    chat_peer_unref(&hp->peer);
}

/* A store read for an HTTP request (op->origin) came back: its latency recorded, and a
 * failure counted and answered (503 store_unavailable). true: answered, nothing more to
 * send. */
static inline bool api_store_failed(op_t *op, const store_req_t *req) {
    chat_record_latency(op->srv, op->t0);
    if (req->status >= 0) return false;
    op->srv->m.store_errors++;
    http_conn_error(&((http_peer_t *)op->origin)->http, 503, "store_unavailable",
                    chat_strerror(req->status), op->keep_alive);
    return true;
}

/* api_auth.c: the one token check of REST and WebSocket. true: *cl filled (the caller
 * frees it with jwt_claims_free). false: answered 401 or 403, cl untouched. chat_id NULL:
 * no chat to check. */
bool api_auth(http_peer_t *hp, const http_request_t *req, const char *chat_id, jwt_claims_t *cl);

/* A history or search page stops adding messages past this much JSON (it holds at least
 * one): with --max-message-bytes messages a full page would otherwise be 200 of them, up
 * to six times their size once JSON-escaped. The page says where to go on (next_before). */
#define API_PAGE_BYTES (1u << 20)

/* the handlers, one file each */
void api_ws_upgrade(http_peer_t *, const http_request_t *, const char *, const jwt_claims_t *);
void api_messages(http_peer_t *, const http_request_t *, const char *, const jwt_claims_t *);
void api_read(http_peer_t *, const http_request_t *, const char *, const jwt_claims_t *);
void api_presence(http_peer_t *, const http_request_t *, const char *, const jwt_claims_t *);
void api_search_chat(http_peer_t *, const http_request_t *, const char *, const jwt_claims_t *);
void api_search(http_peer_t *, const http_request_t *, const char *, const jwt_claims_t *);
void api_nodes(http_peer_t *, const http_request_t *, const char *, const jwt_claims_t *);
void api_connect(http_peer_t *, const http_request_t *, const char *, const jwt_claims_t *);
void api_dev_token(http_peer_t *, const http_request_t *, const char *, const jwt_claims_t *);
void api_healthz(http_peer_t *, const http_request_t *, const char *, const jwt_claims_t *);
void api_metrics(http_peer_t *, const http_request_t *, const char *, const jwt_claims_t *);
/* The fallback of every path no route names: a file of the web client, or 404. */
void api_static(http_peer_t *, const http_request_t *, const char *, const jwt_claims_t *);

#endif

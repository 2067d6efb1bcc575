/* routes: the HTTP side of a chat server. Each accepted connection gets an HTTP driver
 * (http/server.h: pipelining, 100-continue, HEAD, output bounds, deadlines), whose
 * requests are looked up in the one route table below and handed to the endpoint files
 * (api_*.c): the WebSocket upgrade, the REST API, health, metrics and the web client.
 *
 * A route names its path (a fixed one, or prefix + {chat_id} + suffix), the methods it
 * takes, and whether it needs a token; the dispatcher answers what every route answers
 * alike (400 bad_chat_id, 405 with Allow, 401/403) before the handler runs, in that order.
 * HEAD is GET without the body (RFC 7231 4.3.2), except where a GET would upgrade.
 * Every error is a status with a JSON body {"error": code, "detail": ...}.
 */
#include <stdlib.h>
#include <string.h>

#include "api.h"

enum {
    ROUTE_CHAT = 1 << 0,    /* prefix + one {chat_id} segment + suffix */
    ROUTE_SLASH = 1 << 1,   /* a trailing '/' names the same resource */
    ROUTE_NO_HEAD = 1 << 2, /* HEAD stays HEAD (a 405): a GET here upgrades */
    ROUTE_AUTH = 1 << 3,    /* a token (for the route's chat, if any) before the handler */
    ROUTE_DEV = 1 << 4,     /* exists with --dev only */
};

#define M(m) (1u << HTTP_##m)

typedef struct api_route {
    const char *prefix; /* the whole path, or what comes before {chat_id} */
    const char *suffix; /* after {chat_id} (ROUTE_CHAT) */
    unsigned flags;
    unsigned methods;  /* (1 << enum http_method); a HEAD counts as GET */
    const char *allow; /* the Allow header of a 405 */
    api_fn fn;
} api_route_t;

static const api_route_t api_routes[] = {
    {"/ws/chat/", "", ROUTE_CHAT | ROUTE_SLASH | ROUTE_NO_HEAD, M(GET), "GET", api_ws_upgrade},
    {"/api/chats/", "/messages", ROUTE_CHAT | ROUTE_AUTH, M(GET) | M(POST), "GET, HEAD, POST",
     api_messages},
    {"/api/chats/", "/search", ROUTE_CHAT | ROUTE_AUTH, M(GET), "GET, HEAD", api_search_chat},
    {"/api/chats/", "/presence", ROUTE_CHAT | ROUTE_AUTH, M(GET), "GET, HEAD", api_presence},
    {"/api/chats/", "/read", ROUTE_CHAT | ROUTE_AUTH, M(GET), "GET, HEAD", api_read},
    {"/api/search", "", ROUTE_SLASH | ROUTE_AUTH, M(GET), "GET, HEAD", api_search},
    {"/api/nodes", "", ROUTE_AUTH, M(GET), "GET, HEAD", api_nodes},
    {"/api/connect", "", ROUTE_AUTH, M(GET), "GET, HEAD", api_connect},
    {"/api/dev/token", "", ROUTE_DEV, M(POST), "POST", api_dev_token},
    {"/healthz", "", 0, M(GET), "GET, HEAD", api_healthz},
    {"/metrics", "", 0, M(GET), "GET, HEAD", api_metrics},
};

/* Whether path is the route's: 1 on a match (a {chat_id} decoded into out), 0 if not, -1
 * if it has the route's shape with a segment that is not a valid chat id. */
static int api__match(const api_route_t *rt, const char *path, size_t n, char *out, size_t outcap) {
    size_t pl = strlen(rt->prefix), sl = strlen(rt->suffix);
    bool slash_ok = rt->flags & ROUTE_SLASH;
    if (!(rt->flags & ROUTE_CHAT))
        return memcmp(path, rt->prefix, n < pl ? n : pl) == 0 &&
               (n == pl || (slash_ok && n == pl + 1 && path[pl] == '/'));
    if (n <= pl || memcmp(path, rt->prefix, pl) != 0) return 0;
    const char *seg = path + pl;
    size_t rest = n - pl;
    const char *slash = memchr(seg, '/', rest);
    size_t seglen = slash ? (size_t)(slash - seg) : rest;
    const char *tail = seg + seglen;
    size_t tail_len = rest - seglen;
    bool ok =
        (tail_len == sl && memcmp(tail, rt->suffix, sl) == 0) ||
        (slash_ok && tail_len == sl + 1 && memcmp(tail, rt->suffix, sl) == 0 && tail[sl] == '/');
    if (!ok) return 0;
    int dl = http_pct_decode(seg, seglen, out, outcap, false);
    if (dl <= 0 || !chat_id_valid(out, (size_t)dl)) return -1;
    return 1;
}

/* The driver's on_request: find the route, answer what all routes answer alike, run it. */
static void api__dispatch(http_conn_t *hc, const http_request_t *in) {
    http_peer_t *hp = hc->data;
    chat_server_t *s = hp->peer.srv;
    bool ka = in->keep_alive;
    if (conn_over_limit(hc->conn)) {
        /* Accepted over --max-connections(-per-ip): answered, never upgraded, then closed. */
        http_conn_error(hc, 503, "too_many_connections",
                        conn_over_limit(hc->conn) == CONN_OVER_PER_IP
                            ? "too many connections from this address; try again later"
                            : "the server has too many connections; try again later",
                        false);
        return;
    }
    char chat_id[129]; /* a valid chat id is at most 128 bytes */
    const api_route_t *rt = NULL;
    for (size_t i = 0; !rt && i < sizeof api_routes / sizeof api_routes[0]; i++) {
        if ((api_routes[i].flags & ROUTE_DEV) && !s->cfg.dev) continue;
        int m = api__match(&api_routes[i], in->path, in->path_len, chat_id, sizeof chat_id);
        if (m < 0) {
            http_conn_error(hc, 400, "bad_chat_id", CHAT_ID_RULE, ka);
            return;
        }
        if (m) rt = &api_routes[i];
    }
    http_request_t head_as_get;
    const http_request_t *req = in;
    if (in->method == HTTP_HEAD && !(rt && (rt->flags & ROUTE_NO_HEAD))) {
        head_as_get = *in;
        head_as_get.method = HTTP_GET;
        req = &head_as_get;
    }
    if (!rt) {
        api_static(hp, req, NULL, NULL);
        return;
    }
    if (req->method < 0 || req->method >= 32 || !(rt->methods & (1u << req->method))) {
        http_conn_not_allowed(hc, rt->allow, ka);
        return;
    }
    const char *cid = rt->flags & ROUTE_CHAT ? chat_id : NULL;
    if (!(rt->flags & ROUTE_AUTH)) {
        rt->fn(hp, req, cid, NULL);
        return;
    }
    jwt_claims_t cl;
    if (!api_auth(hp, req, cid, &cl)) return;
    rt->fn(hp, req, cid, &cl);
    jwt_claims_free(&cl);
}

/* ---- the connection ------------------------------------------------------------------- */

static void api__hold(http_conn_t *hc) { ((http_peer_t *)hc->data)->peer.refs++; }

static void api__release(http_conn_t *hc) { chat_peer_unref(&((http_peer_t *)hc->data)->peer); }

static void api__closed(http_conn_t *hc) { chat_peer_unlink(&((http_peer_t *)hc->data)->peer); }

static const http_conn_ops_t api_conn_ops = {
    .on_request = api__dispatch,
    .hold = api__hold,
    .release = api__release,
    .on_close = api__closed,
};

static void api__on_open(conn_t *c) {
    chat_server_t *s = conn_server_data(c);
    http_peer_t *hp = calloc(1, sizeof(*hp));
    if (!hp) {
        conn_abort(c);
        return;
    }
    chat_peer_link(s, &hp->peer, PEER_HTTP, c);
    http_conn_cfg_t cfg = {
        .loop = s->loop,
        .max_body_bytes = s->cfg.max_body_bytes,
        .max_outbound_bytes = s->cfg.max_outbound_bytes,
        .header_timeout_ms = s->cfg.header_timeout_ms,
        .answered = &s->m.http_requests,
        .draining = &s->stopping,
    };
    http_conn_start(&hp->http, c, &api_conn_ops, &cfg, hp);
}

void chat_http_sweep(http_peer_t *hp, uint64_t now, uint64_t idle_ms) {
    http_conn_sweep(&hp->http, now, idle_ms);
}

/* Only on_open: the connection then belongs to its HTTP driver (http_conn_start). */
const conn_handler_t chat_http_handler = {
    .on_open = api__on_open,
};

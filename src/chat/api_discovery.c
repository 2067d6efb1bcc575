/* api_discovery: GET /api/nodes (the live nodes of the cluster, from the bus's registry)
 * and GET /api/connect?chat_id= (the node a client should open its WebSocket on: the
 * least-loaded one that is not draining, chat_cluster_pick). */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"

typedef struct nodes_wait {
    http_peer_t *hp;
    bool keep_alive;
    bool connect; /* /api/connect: pick one; else list them all */
    char chat_id[129];
} nodes_wait_t;

static void api__put_node(sbuf_t *sb, const bus_node_t *n) {
    char started[25], seen[25];
    time_format_ms(n->started_at, started);
    time_format_ms(n->seen_at, seen);
    sbuf_printf(sb, "{\"id\":\"%s\",\"url\":", n->id);
    sbuf_json_str(sb, n->url, strlen(n->url));
    sbuf_printf(sb,
                ",\"connections\":%" PRIu64 ",\"started_at\":\"%s\",\"seen_at\":\"%s\","
                "\"draining\":%s",
                n->connections, started, seen, n->draining ? "true" : "false");
    /* the id inside its message ids (null from a node that does not report it) */
    if (n->node_id >= 0) sbuf_printf(sb, ",\"node_id\":%d}", n->node_id);
    else sbuf_puts(sb, ",\"node_id\":null}");
}

static void api__nodes_done(void *ud, int status, const bus_node_t *nodes, size_t n) {
    nodes_wait_t *w = ud;
    http_peer_t *hp = w->hp;
    chat_server_t *s = hp->peer.srv;
    sbuf_t sb = {0};
    if (!w->connect) {
        if (status < 0) {
            http_conn_error(&hp->http, 503, "bus_unavailable",
                            "the node registry cannot be read now", w->keep_alive);
        } else {
            sbuf_puts(&sb, "{\"nodes\":[");
            for (size_t i = 0; i < n; i++) {
                if (i) sbuf_puts(&sb, ",");
                api__put_node(&sb, &nodes[i]);
            }
            sbuf_puts(&sb, "]}");
            http_conn_json(&hp->http, 200, &sb, w->keep_alive);
        }
    } else {
        /* The least-loaded live node that is not draining; ourselves if the registry is
         * out of reach (a client should still get somewhere). */
        const bus_node_t *best = status == 0 ? chat_cluster_pick(s, nodes, n) : NULL;
        if (!best && !s->stopping) best = &s->self;
        if (!best) {
            http_conn_error(&hp->http, 503, "no_nodes", "no node is accepting connections",
                            w->keep_alive);
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
            http_conn_json(&hp->http, 200, &sb, w->keep_alive);
        }
    }
    sbuf_free(&sb);
    free(w);
    api_done(hp);
}

static void api__nodes(http_peer_t *hp, const http_request_t *req, const jwt_claims_t *cl,
                       bool connect) {
    chat_server_t *s = hp->peer.srv;
    bool ka = req->keep_alive;
    nodes_wait_t *w = calloc(1, sizeof(*w));
    if (!w) {
        http_conn_error(&hp->http, 500, "internal", "out of memory", false);
        return;
    }
    w->hp = hp;
    w->keep_alive = ka;
    w->connect = connect;
    if (connect) {
        int n = http_query_param(req, "chat_id", w->chat_id, sizeof w->chat_id);
        const char *bad = n == CHAT_ENOTFOUND                               ? "chat_id is required"
                          : n <= 0 || !chat_id_valid(w->chat_id, (size_t)n) ? CHAT_ID_RULE
                                                                            : NULL;
        if (!bad && !jwt_allows_chat(cl, w->chat_id)) {
            free(w);
            http_conn_error(&hp->http, 403, "forbidden", "this token does not allow this chat", ka);
            return;
        }
        if (bad) {
            free(w);
            http_conn_error(&hp->http, 400, "bad_request", bad, ka);
            return;
        }
    }
    if (bus_list_nodes(s->bus, api__nodes_done, w) < 0) {
        free(w);
        http_conn_error(&hp->http, 503, "bus_unavailable", "the node registry cannot be read now",
                        ka);
        return;
    }
    api_wait(hp); /* until the registry answers */
}

void api_nodes(http_peer_t *hp, const http_request_t *req, const char *unused,
               const jwt_claims_t *cl) {
    api__nodes(hp, req, cl, false);
}

void api_connect(http_peer_t *hp, const http_request_t *req, const char *unused,
                 const jwt_claims_t *cl) {
    api__nodes(hp, req, cl, true);
}

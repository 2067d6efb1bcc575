/* peer: the server's list of open connections (HTTP and WebSocket alike), each refcounted:
 * one reference for the connection and one per store request in flight, so a completion
 * that runs after its connection closed still finds its peer. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat_internal.h"

/* ---- peers ---------------------------------------------------------------------------- */

void chat_peer_link(chat_server_t *s, peer_t *p, int kind, conn_t *c) {
    p->kind = kind;
    p->srv = s;
    p->conn = c;
    p->refs = 1;
    p->last_rx = uv_now(s->loop);
    queue_insert_head(&s->peers, &p->link);
    s->n_peers++;
}

peer_t *chat_peer_first(chat_server_t *s) {
    return queue_empty(&s->peers) ? NULL : queue_data(queue_head(&s->peers), peer_t, link);
}

peer_t *chat_peer_next(chat_server_t *s, peer_t *p) {
    return p->link.next == &s->peers ? NULL : queue_data(p->link.next, peer_t, link);
}

void chat_peer_unlink(peer_t *p) {
    chat_server_t *s = p->srv;
    queue_remove(&p->link);
    p->conn = NULL;
    s->n_peers--;
    chat_peer_unref(p);
    if (s->on_peer_gone) s->on_peer_gone(s); /* server.c: a shutdown waits for the last */
}

void chat_peer_unref(peer_t *p) {
    if (--p->refs > 0) return;
    if (p->kind == PEER_WS) {
        ws_parser_free(&((session_t *)p)->parser);
    } else {
        http_conn_free(&((http_peer_t *)p)->http);
    }
    free(p);
}

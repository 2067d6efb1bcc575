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
    p->prev = NULL;
    p->next = s->peers;
    if (s->peers) s->peers->prev = p;
    s->peers = p;
    s->n_peers++;
}

void chat_peer_unlink(peer_t *p) {
    chat_server_t *s = p->srv;
    if (p->prev) p->prev->next = p->next;
    else s->peers = p->next;
    if (p->next) p->next->prev = p->prev;
    p->prev = p->next = NULL;
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

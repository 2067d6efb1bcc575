/* conn_internal: what a connection is. Only conn.c reads or changes these fields; every
 * other layer sees conn_t as opaque (core.h) and goes through its functions. The struct is
 * here, not in conn.c, so that a test can size it (tests/functional/test_accept_oom.py fails
 * exactly the allocation of one connection). */
#ifndef CHAT_CORE_CONN_INTERNAL_H
#define CHAT_CORE_CONN_INTERNAL_H

#include "core.h"

struct conn {
    uv_tcp_t tcp;
    conn_server_t *server;
    const conn_handler_t *handler;
    void *ctx; /* the handler's state */
    /* output queue: refcounted segments, written by one sendmsg per loop turn */
    struct conn_seg *q;
    uint32_t q_head, q_len, q_cap;
    size_t q_bytes;           /* bytes queued, not yet written */
    size_t max_outbound;      /* conn_send fails with CHAT_EBUSY past this */
    uv_write_t *wreq;         /* allocated only while a write waits for the kernel buffer */
    uint32_t w_segs;          /* segments covered by wreq */
    queue_t dirty_link;       /* on the server's list of connections to flush */
    queue_t linger_link;      /* on the server's list of half-closed connections */
    uint64_t linger_deadline; /* uv_now() after which a half-closed conn is dropped */
    size_t drain_below;       /* on_drain fires once q_bytes <= this (CF_DRAIN armed) */
    uint64_t last_tx;         /* uv_now() of the last write that moved bytes to the kernel */
    struct conn_ip *ip;       /* its address's count, when connections per address are limited */
    struct conn_tls *tls;     /* the TLS state, NULL on a plain connection */
    uint8_t over_limit;       /* CONN_OVER_*: accepted beyond a limit; the handler refuses it */
    uint16_t flags;
    uint64_t id; /* for logs */
};

#endif

/* cluster: what a node does as one of many. It leases its node id on the bus before it
 * mints any message id, registers itself on the bus every second (service discovery), drops
 * out on drain, and keeps its members whole across a bus outage: when the bus comes back,
 * every room reads from the store what was stored since shortly before the outage and
 * delivers what it had not seen. The same read-back runs when another node drops out of
 * the registry: killed between a commit and its publish, it leaves stored messages no
 * other node received.
 *
 * The one idea: the store is the truth and the bus is a fast path. Duplicates between the
 * two are removed by the room's filter: exact for the ids of the last ROOM_RECENT_MS, by
 * per-origin marks (room_mark_t) for older ones: every node stores and publishes its own
 * messages in id order, so for each origin node an old id at or below the newest one seen
 * was seen already. An edit or delete has no id of its own: the current state of every
 * edited or deleted message the catch-up reads back is delivered again as message:edit or
 * message:delete (idempotent for clients); changes to older messages are not re-read.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat_internal.h"

#define HEARTBEAT_MS 1000
#define NODE_TTL_MS 5000
/* Read back from this long before the outage: publishes in flight when it began. */
#define CATCHUP_MARGIN_MS 5000
#define CATCHUP_PAGES 20

static void cluster__heartbeat(uv_timer_t *t);

/* ---- catch-up after a bus outage ------------------------------------------------------- */

typedef struct catchup {
    store_req_t req;
    chat_server_t *srv;
    uint64_t gen;
    int pages;
    char chat_id[129];
} catchup_t;

static void cluster__catchup_submit(catchup_t *cu, uint64_t after);

/* Close every member of r (they resume with since= and read what the room could not). */
static void cluster__close_members(room_t *r, uint16_t code, const char *reason) {
    room_member_t *next;
    for (room_member_t *m = room_first(r); m; m = next) {
        next = room_member_next(r, m);
        chat_session_close(chat_session_of(m), code, reason);
    }
}

static room_t *cluster__room(catchup_t *cu) {
    room_t *r = room_find(&cu->srv->rooms, cu->chat_id);
    return r && r->gen == cu->gen ? r : NULL;
}

static void cluster__catchup_done(store_req_t *req) {
    catchup_t *cu = req->data;
    chat_server_t *s = cu->srv;
    room_t *r = cluster__room(cu);
    if (!r) goto done; /* the room emptied meanwhile: nobody to catch up */
    if (req->status < 0) {
        s->m.store_errors++;
        log_error("catchup_failed chat=%s error=%s: members resume", cu->chat_id,
                  chat_strerror(req->status));
        /* What the bus missed cannot be read now: rather than let the members miss it
         * silently, close them (1011) so that they resume with since= and their own replay
         * reads it, or fails and tells them again. */
        cluster__close_members(r, WS_CLOSE_INTERNAL, "missed messages could not be read; resume");
    } else {
        uint64_t last = req->id;
        /* Delivered straight to members (the room is still holding live events). */
        for (size_t i = 0; i < req->n_msgs; i++) {
            const store_msg_t *m = &req->msgs[i];
            last = m->id;
            const char *event;
            bool is_new = room_admit(r, true, m->id);
            if (is_new) {
                event = m->deleted_at ? "message:delete" : "message:message";
            } else if (m->deleted_at) {
                /* Seen, and changed since: every message read back is recent, so its change
                 * may have been missed. Not compared with from_ms, which is this node's clock
                 * while the change's time is the editing node's. Clients take a repeated edit
                 * or delete as a no-op. */
                event = "message:delete";
            } else if (m->edited_at) {
                event = "message:edit";
            } else {
                continue;
            }
            sbuf_t ev = {0};
            proto_put_msg(&ev, event, m);
            buf_t *frame = ev.oom ? NULL : ws_frame_new(WS_OP_TEXT, ev.p, ev.len);
            sbuf_free(&ev);
            if (!frame) continue;
            room_deliver_frame(&s->rooms, r, frame, is_new, m->id, NULL, NULL);
            buf_unref(frame);
        }
        /* Held events were dropped (room_held_overflow): read on, past the page cap,
         * until a read that began after the last drop comes back short. */
        bool dropped = r->held_dropped;
        r->held_dropped = false;
        if ((req->n_msgs == (size_t)req->limit && ++cu->pages < CATCHUP_PAGES) || dropped) {
            store_req_cleanup(req);
            cluster__catchup_submit(cu, last);
            return;
        }
        if (req->n_msgs) log_info("catchup chat=%s delivered_up_to=%" PRIu64, cu->chat_id, last);
        if (req->n_msgs == (size_t)req->limit) {
            /* the page cap: more was missed than a catch-up delivers; the members resume
             * (and page the REST API if their replay is too large) rather than miss it */
            log_warn("catchup_cap chat=%s: members resume", cu->chat_id);
            cluster__close_members(r, WS_CLOSE_TRY_AGAIN, "too much missed; resume");
        }
    }
    /* Then what arrived live meanwhile, through the same filter. */
    room_release_held(&s->rooms, r);
done:
    store_req_cleanup(req);
    free(cu);
}

static void cluster__catchup_submit(catchup_t *cu, uint64_t after) {
    chat_server_t *s = cu->srv;
    memset(&cu->req, 0, sizeof(cu->req));
    cu->req.op = STORE_AFTER;
    cu->req.chat_id = cu->chat_id;
    cu->req.id = after;
    cu->req.limit = (int)s->cfg.replay_limit;
    cu->req.data = cu;
    cu->req.cb = cluster__catchup_done;
    if (store_submit(s->store, &cu->req) < 0) {
        room_t *r = cluster__room(cu);
        log_error("catchup_not_submitted chat=%s", cu->chat_id);
        if (r) {
            /* deliver what was held rather than hold it forever */
            cu->req.status = CHAT_EIO;
            cu->req.limit = 1;
            cluster__catchup_done(&cu->req);
            return;
        }
        free(cu);
    }
}

static void cluster__catchup_all(chat_server_t *s, int64_t from_ms) {
    uint64_t after = from_ms > ID_EPOCH_MS ? (uint64_t)(from_ms - ID_EPOCH_MS) << 22 : 0;
    size_t n = 0;
    for (room_t *r = room_next(&s->rooms, NULL); r; r = room_next(&s->rooms, r)) {
        if (r->catching_up) continue; /* one catch-up per room at a time */
        catchup_t *cu = calloc(1, sizeof(*cu));
        if (!cu) continue;
        cu->srv = s;
        cu->gen = r->gen;
        snprintf(cu->chat_id, sizeof cu->chat_id, "%s", r->chat_id);
        r->catching_up = true;
        cluster__catchup_submit(cu, after);
        n++;
    }
    log_info("bus_catchup rooms=%zu since_ms=%" PRId64, n, from_ms);
}

void chat_cluster_bus_state(chat_server_t *s, bool up) {
    if (!up) {
        if (s->bus_up || !s->bus_down_ms) s->bus_down_ms = time_now_ms();
        s->bus_up = false;
        s->known_valid = false; /* Redis may restart empty: the next listing is a baseline */
        log_warn("bus_down: events from other nodes wait for the reconnect");
        return;
    }
    bool was_down = s->bus_down_ms != 0;
    s->bus_up = true;
    log_info("bus_up");
    /* (not while the node id lease is still being asked for: nothing to register yet) */
    if (!s->stopping && s->heartbeat.data) cluster__heartbeat(&s->heartbeat); /* be listed */
    if (was_down && !s->stopping) cluster__catchup_all(s, s->bus_down_ms - CATCHUP_MARGIN_MS);
    if (!s->stopping) chat_presence_bus_up(s);
}

/* ---- balancing ------------------------------------------------------------------------ */

static struct handout *cluster__handout(chat_server_t *s, const bus_node_t *n) {
    for (size_t i = 0; i < s->n_handouts; i++)
        if (strcmp(s->handouts[i].id, n->id) == 0) {
            struct handout *h = &s->handouts[i];
            if (h->seen_at != n->seen_at) { /* a fresh heartbeat counts them already */
                h->seen_at = n->seen_at;
                h->n = 0;
            }
            return h;
        }
    size_t slot = s->n_handouts < sizeof s->handouts / sizeof s->handouts[0]
                      ? s->n_handouts++
                      : (size_t)rand() % s->n_handouts; /* forget one: best effort */
    struct handout *h = &s->handouts[slot];
    snprintf(h->id, sizeof h->id, "%s", n->id);
    h->seen_at = n->seen_at;
    h->n = 0;
    return h;
}

const bus_node_t *chat_cluster_pick(chat_server_t *s, const bus_node_t *nodes, size_t n) {
    const bus_node_t *best = NULL;
    struct handout *best_h = NULL;
    uint64_t best_load = 0;
    unsigned ties = 0;
    for (size_t i = 0; i < n; i++) {
        if (nodes[i].draining) continue;
        struct handout *h = cluster__handout(s, &nodes[i]);
        uint64_t load = nodes[i].connections + h->n;
        if (!best || load < best_load) {
            best = &nodes[i];
            best_h = h;
            best_load = load;
            ties = 1;
        } else if (load == best_load && (unsigned)rand() % ++ties == 0) {
            best = &nodes[i]; /* reservoir choice: every tied node equally likely */
            best_h = h;
        }
    }
    if (best_h) best_h->n++;
    return best;
}

/* ---- the node id lease ----------------------------------------------------------------- */
/* Two nodes with one node id mint colliding message ids, and the per-origin marks then drop
 * one node's messages as "seen": members silently miss them. So with a Redis bus no node
 * mints an id before it holds its node id's lease, and one that loses it stops. */

static void cluster__lease_cb(void *ud, int status, unsigned node_id, const char *detail) {
    chat_server_t *s = ud;
    if (s->lease_status == 1) { /* the answer chat_cluster_lease waits for */
        s->lease_status = status;
        s->node_id = node_id;
        snprintf(s->lease_detail, sizeof s->lease_detail, "%s", detail ? detail : "");
        return;
    }
    if (s->stopping) return;
    /* Lost: another node mints with our id now. Going on would lose messages silently;
     * draining sends our clients (1012) to nodes whose ids are their own. */
    log_error("node_id_lease_lost node_id=%u detail=\"%s\": draining and exiting", s->node_id,
              detail ? detail : "");
    s->cfg.on_fatal(s->cfg.fatal_arg, detail); /* server.c: drains, unless configured */
}

int chat_cluster_lease(chat_server_t *s, char *err, size_t errlen) {
    s->node_id = s->cfg.node_id;
    if (!s->bus->ops->lease) { /* the local bus: one node, nothing to collide with */
        id_gen_init(&s->ids, s->node_id);
        return 0;
    }
    int want = s->cfg.node_id_auto ? -1 : (int)s->cfg.node_id;
    s->lease_status = 1;
    int rc = bus_lease(s->bus, want, NODE_TTL_MS, cluster__lease_cb, s);
    if (rc < 0) {
        snprintf(err, errlen, "cannot ask the bus for a node id lease");
        return rc;
    }
    if (want < 0) log_info("node_id_lease want=auto: waiting for the bus");
    else log_info("node_id_lease want=%d: waiting for the bus", want);
    /* Nothing listens yet and nothing else runs: the loop serves the bus alone until it
     * answers (if Redis is down, that is when it comes back; a signal ends the process). */
    while (s->lease_status == 1) uv_run(s->loop, UV_RUN_ONCE);
    if (s->lease_status < 0) {
        if (s->lease_status == CHAT_EBUSY)
            snprintf(err, errlen,
                     "node id %d is %s; give each node its own --node-id, or leave it out to "
                     "get a free one",
                     want, s->lease_detail);
        else snprintf(err, errlen, "no node id: %s", s->lease_detail);
        return s->lease_status;
    }
    log_info("node_id_lease node_id=%u%s", s->node_id, want < 0 ? " (auto)" : "");
    id_gen_init(&s->ids, s->node_id);
    return 0;
}

unsigned chat_server_node_id(const chat_server_t *s) { return s->node_id; }

/* ---- discovery ------------------------------------------------------------------------- */

/* A node that drops out of the listing (killed, or drained) may have stored messages it
 * never published: a kill -9 between the commit and the write to Redis, after the sender's
 * acknowledgement went out, leaves members on other nodes without them and nobody to
 * retry. Every room reads back from shortly before the node's last heartbeat; the room's
 * filter passes only what it had not seen. */
static void cluster__nodes_listed(void *ud, int status, const bus_node_t *nodes, size_t n) {
    chat_server_t *s = ud;
    s->listing = false;
    if (status < 0 || s->stopping || !s->bus_up) {
        s->known_valid = false; /* a gap in what we know: no conclusion from it */
        return;
    }
    int64_t gone_seen = 0;
    if (s->known_valid)
        for (size_t k = 0; k < s->n_known; k++) {
            bool present = false;
            for (size_t i = 0; i < n && !present; i++)
                present = strcmp(nodes[i].id, s->known[k].id) == 0;
            if (present) continue;
            log_info("node_gone id=%s last_seen_ms=%" PRId64 ": rooms read back what it stored",
                     s->known[k].id, s->known[k].seen_at);
            if (!gone_seen || s->known[k].seen_at < gone_seen) gone_seen = s->known[k].seen_at;
        }
    s->n_known = 0;
    for (size_t i = 0; i < n && s->n_known < sizeof s->known / sizeof s->known[0]; i++) {
        if (strcmp(nodes[i].id, s->self.id) == 0) continue;
        snprintf(s->known[s->n_known].id, sizeof s->known[0].id, "%s", nodes[i].id);
        s->known[s->n_known++].seen_at = nodes[i].seen_at;
    }
    s->known_valid = true;
    chat_presence_nodes_live(s, nodes, n, s->listing_at);
    if (gone_seen && s->rooms.n) cluster__catchup_all(s, gone_seen - CATCHUP_MARGIN_MS);
}

static void cluster__heartbeat(uv_timer_t *t) {
    chat_server_t *s = t->data;
    s->self.connections = s->n_sessions;
    int rc = bus_heartbeat(s->bus, &s->self, NODE_TTL_MS);
    if (rc < 0) log_debug("heartbeat_failed error=%s", chat_strerror(rc));
    if (s->bus_up && !s->listing && !s->stopping && s->bus->ops->has_peers) {
        s->listing_at = uv_now(s->loop);
        if (bus_list_nodes(s->bus, cluster__nodes_listed, s) == 0) s->listing = true;
        else s->known_valid = false;
    }
}

void chat_cluster_start(chat_server_t *s) {
    memset(&s->self, 0, sizeof(s->self));
    snprintf(s->self.id, sizeof s->self.id, "%s", s->bus->instance);
    s->self.node_id = (int)s->node_id;
    if (s->cfg.public_url && *s->cfg.public_url) {
        snprintf(s->self.url, sizeof s->self.url, "%s", s->cfg.public_url);
    } else {
        const char *h = s->cfg.host;
        bool any = !h || !strcmp(h, "0.0.0.0") || !strcmp(h, "::");
        /* with TLS, clients are sent to wss:// (the same port speaks only TLS) */
        snprintf(s->self.url, sizeof s->self.url,
                 strchr(any ? "" : h, ':') ? "%s://[%s]:%d" : "%s://%s:%d",
                 s->cfg.tls ? "wss" : "ws", any ? "127.0.0.1" : h, s->cs.port);
    }
    s->self.started_at = time_now_ms();
    uv_timer_init(s->loop, &s->heartbeat);
    s->heartbeat.data = s;
    cluster__heartbeat(&s->heartbeat);
    uv_timer_start(&s->heartbeat, cluster__heartbeat, HEARTBEAT_MS, HEARTBEAT_MS);
}

void chat_cluster_stop(chat_server_t *s) {
    uv_timer_stop(&s->heartbeat);
    s->self.draining = true;
    if (bus_deregister(s->bus, s->self.id) < 0) log_warn("deregister_failed");
}

/* presence: who is online in a chat, and who is typing, across the nodes.
 *
 * Each node keeps, per chat it has members in (or a user in grace), the users present: with
 * how many connections this node holds for them, and through which other nodes they are
 * connected. A user is present while any node holds a connection (or a grace period runs
 * after the last one closed here). This node's own part goes to the bus as entries
 * (bus_presence_set: Redis keeps them, valid while the node lives) and as presence:join /
 * presence:leave payloads on the chat's channel; the other nodes' part comes back the same
 * way, plus a snapshot (bus_presence_list) when a room starts, when the bus comes back,
 * and the leave of every user of a node that dropped out of the registry (a kill -9).
 *
 * The one idea: nothing here is durable or acknowledged. Presence and typing are frames
 * built and sent to the members that asked for them (session.presence), never stored; a
 * lost event is mended by the next snapshot or the node's departure, never retried.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "chat_internal.h"

/* A typing event from one user in one chat goes out at most once per this long. */
#define TYPING_EVERY_MS 2000
/* Each node rewrites its entries on the bus this often (the Redis hash's expiry is 60 s), and
 * reads every chat's snapshot again: a node taken for dead for a while (its heartbeat late,
 * its users' leaves sent) is back for everyone within two periods. */
#define PRESENCE_REFRESH_MS 20000

typedef struct pres_node {
    char id[33];  /* the instance the user is connected through */
    uint32_t gen; /* the chat's sync_gen when this was last confirmed */
    uint64_t at;  /* uv_now() when this was last confirmed */
} pres_node_t;

typedef struct pres_user {
    struct pres_user *next;
    uint32_t hash;
    uint32_t local;       /* this node's connections of the user in the chat */
    uint64_t grace_until; /* local == 0 but still present until this uv_now(); 0: none */
    uint64_t typing_at;   /* uv_now() of the last typing forwarded from here; 0: none */
    pres_node_t *nodes;   /* the other nodes the user is connected through */
    uint16_t n_nodes;
    char name[];
} pres_user_t;

typedef struct pres_chat {
    struct pres_chat *next;
    uint32_t hash;
    pres_user_t **b;
    size_t nb, n;      /* buckets (a power of two), users present */
    uint32_t sync_gen; /* bumped by each snapshot asked for */
    bool syncing;      /* a snapshot is in flight */
    bool synced;       /* the other nodes' part is known (a snapshot came, or none exists) */
    char id[];
} pres_chat_t;

struct pres_table {
    pres_chat_t **b;
    size_t nb, n;
    size_t n_grace;        /* users in grace, across chats: the sweep has work */
    uint32_t gens;         /* snapshots asked for: each one's sync_gen, unique on this node */
    uint64_t refreshed_at; /* uv_now() of the last rewrite of our entries */
};

/* ---- the tables --------------------------------------------------------------------------- */

static pres_chat_t *pres__chat(chat_server_t *s, const char *chat_id) {
    struct pres_table *t = s->presence;
    if (!t || !t->nb) return NULL;
    uint32_t h = chat_hash(chat_id);
    for (pres_chat_t *c = t->b[h & (t->nb - 1)]; c; c = c->next)
        if (c->hash == h && strcmp(c->id, chat_id) == 0) return c;
    return NULL;
}

static pres_user_t *pres__user(const pres_chat_t *c, const char *user) {
    if (!c->nb) return NULL;
    uint32_t h = chat_hash(user);
    for (pres_user_t *u = c->b[h & (c->nb - 1)]; u; u = u->next)
        if (u->hash == h && strcmp(u->name, user) == 0) return u;
    return NULL;
}

/* Double a chained table of n entries in *b (nb buckets); next and hash are the first two
 * members of both entry types. */
typedef struct pres_link {
    struct pres_link *next;
    uint32_t hash;
} pres_link_t;

static int pres__grow(void ***b, size_t *nb) {
    size_t ncap = *nb ? *nb * 2 : 16;
    pres_link_t **nt = calloc(ncap, sizeof *nt);
    if (!nt) return CHAT_ENOMEM;
    for (size_t i = 0; i < *nb; i++)
        for (pres_link_t *e = (*b)[i], *next; e; e = next) {
            next = e->next;
            e->next = nt[e->hash & (ncap - 1)];
            nt[e->hash & (ncap - 1)] = e;
        }
    free(*b);
    *b = (void **)nt;
    *nb = ncap;
    return 0;
}

static pres_chat_t *pres__chat_add(chat_server_t *s, const char *chat_id) {
    struct pres_table *t = s->presence;
    if (!t && !(t = s->presence = calloc(1, sizeof *t))) return NULL;
    if (t->n + 1 > t->nb && pres__grow((void ***)&t->b, &t->nb) < 0) return NULL;
    size_t len = strlen(chat_id);
    pres_chat_t *c = calloc(1, sizeof *c + len + 1);
    if (!c) return NULL;
    memcpy(c->id, chat_id, len + 1);
    c->hash = chat_hash(chat_id);
    c->next = t->b[c->hash & (t->nb - 1)];
    t->b[c->hash & (t->nb - 1)] = c;
    t->n++;
    return c;
}

static pres_user_t *pres__user_add(pres_chat_t *c, const char *user) {
    if (c->n + 1 > c->nb && pres__grow((void ***)&c->b, &c->nb) < 0) return NULL;
    size_t len = strlen(user);
    pres_user_t *u = calloc(1, sizeof *u + len + 1);
    if (!u) return NULL;
    memcpy(u->name, user, len + 1);
    u->hash = chat_hash(user);
    u->next = c->b[u->hash & (c->nb - 1)];
    c->b[u->hash & (c->nb - 1)] = u;
    c->n++;
    return u;
}

static void pres__user_del(pres_chat_t *c, pres_user_t *u) {
    pres_user_t **pp = &c->b[u->hash & (c->nb - 1)];
    while (*pp != u) pp = &(*pp)->next;
    *pp = u->next;
    c->n--;
    free(u->nodes);
    free(u);
}

static void pres__chat_del(chat_server_t *s, pres_chat_t *c) {
    struct pres_table *t = s->presence;
    pres_chat_t **pp = &t->b[c->hash & (t->nb - 1)];
    while (*pp != c) pp = &(*pp)->next;
    *pp = c->next;
    t->n--;
    for (size_t i = 0; i < c->nb; i++)
        for (pres_user_t *u = c->b[i], *next; u; u = next) {
            next = u->next;
            if (u->grace_until) t->n_grace--;
            free(u->nodes);
            free(u);
        }
    free(c->b);
    free(c);
}

static bool pres__present(const pres_user_t *u) { return u->local || u->grace_until || u->n_nodes; }

static int pres__node_find(const pres_user_t *u, const char *node) {
    for (uint16_t i = 0; i < u->n_nodes; i++)
        if (strcmp(u->nodes[i].id, node) == 0) return i;
    return -1;
}

/* ---- frames -------------------------------------------------------------------------------- */

/* Send ev to the members of chat_id on this node that asked for presence events, but not
 * to skip_user's connections (NULL: to all). */
static bool pres__wants(const room_member_t *rm, const void *skip_user) {
    const session_t *m = chat_session_of((room_member_t *)rm);
    return m->presence && !(skip_user && strcmp(m->user, skip_user) == 0);
}

static void pres__deliver(chat_server_t *s, const char *chat_id, const sbuf_t *ev,
                          const char *skip_user) {
    room_t *r = room_find(&s->rooms, chat_id);
    if (!r || ev->oom) return;
    buf_t *frame = ws_frame_new(WS_OP_TEXT, ev->p, ev->len);
    if (!frame) return;
    room_deliver_frame(&s->rooms, r, frame, false, 0, pres__wants, skip_user);
    buf_unref(frame);
}

/* {"event":"presence:join"|"presence:leave","chat_id":..,"user":..} and, for the bus, the
 * node it comes from. */
static void pres__put_change(sbuf_t *sb, bool join, const char *chat_id, const char *user,
                             const char *node) {
    sbuf_printf(sb, "{\"event\":\"presence:%s\",\"chat_id\":", join ? "join" : "leave");
    sbuf_json_str(sb, chat_id, strlen(chat_id));
    sbuf_puts(sb, ",\"user\":");
    sbuf_json_str(sb, user, strlen(user));
    if (node) sbuf_printf(sb, ",\"node\":\"%s\"", node);
    sbuf_puts(sb, "}");
}

/* The members see user arrive or go (unless the chat has too many users for it). */
static void pres__announce(chat_server_t *s, const pres_chat_t *c, bool join, const char *user) {
    if (c->n > s->cfg.presence_max_members) return;
    sbuf_t sb = {0};
    pres__put_change(&sb, join, c->id, user, NULL);
    pres__deliver(s, c->id, &sb, NULL);
    sbuf_free(&sb);
}

/* This node's part changed: tell the bus (the entry, then the other nodes). */
static void pres__publish(chat_server_t *s, const char *chat_id, const char *user, bool join) {
    if (bus_presence_set(s->bus, chat_id, user, join) < 0)
        log_debug("presence_set_failed chat=%s", chat_id);
    if (!s->bus->ops->has_peers) return;
    sbuf_t sb = {0};
    pres__put_change(&sb, join, chat_id, user, s->bus->instance);
    if (!sb.oom && bus_publish(s->bus, chat_id, sb.p, sb.len) < 0)
        log_debug("presence_publish_failed chat=%s", chat_id);
    sbuf_free(&sb);
}

static int pres__cmp(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* {"event":"presence","chat_id":..,"users":[..]} (event NULL: the REST form, without it),
 * the users sorted: c's (may be NULL) and n_more more (from a snapshot), without repeats. */
static void pres__put_list(sbuf_t *sb, const char *event, const char *chat_id, const pres_chat_t *c,
                           const char *const *more, size_t n_more) {
    size_t n = (c ? c->n : 0) + n_more, k = 0;
    const char **v = malloc((n ? n : 1) * sizeof *v);
    if (!v) {
        sb->oom = true;
        return;
    }
    for (size_t i = 0; c && i < c->nb; i++)
        for (pres_user_t *u = c->b[i]; u; u = u->next) v[k++] = u->name;
    for (size_t i = 0; i < n_more; i++) v[k++] = more[i];
    qsort(v, k, sizeof *v, pres__cmp);
    sbuf_puts(sb, "{");
    if (event) sbuf_printf(sb, "\"event\":\"%s\",", event);
    sbuf_puts(sb, "\"chat_id\":");
    sbuf_json_str(sb, chat_id, strlen(chat_id));
    sbuf_puts(sb, ",\"users\":[");
    for (size_t i = 0, out = 0; i < k; i++) {
        if (i && strcmp(v[i], v[i - 1]) == 0) continue;
        if (out++) sbuf_puts(sb, ",");
        sbuf_json_str(sb, v[i], strlen(v[i]));
    }
    sbuf_puts(sb, "]}");
    free(v);
}

static void pres__send_list(session_t *ss, const pres_chat_t *c) {
    sbuf_t sb = {0};
    pres__put_list(&sb, "presence", ss->member.room->chat_id, c, NULL, 0);
    if (!sb.oom) {
        buf_t *frame = ws_frame_new(WS_OP_TEXT, sb.p, sb.len);
        if (frame) room_deliver_one(&ss->peer.srv->rooms, &ss->member, frame);
        buf_unref(frame);
    }
    sbuf_free(&sb);
}

/* ---- the other nodes' part ----------------------------------------------------------------- */

/* user is connected through node (join) or no longer (leave). */
static void pres__remote(chat_server_t *s, pres_chat_t *c, const char *user, const char *node,
                         bool join) {
    pres_user_t *u = pres__user(c, user);
    if (join) {
        bool was = u != NULL;
        if (!u && !(u = pres__user_add(c, user))) return;
        int i = pres__node_find(u, node);
        if (i >= 0) {
            u->nodes[i].gen = c->sync_gen;
            u->nodes[i].at = uv_now(s->loop);
        } else {
            pres_node_t *nn = realloc(u->nodes, sizeof *nn * (u->n_nodes + 1u));
            if (!nn) {
                if (!was) pres__user_del(c, u);
                return;
            }
            u->nodes = nn;
            snprintf(nn[u->n_nodes].id, sizeof nn->id, "%s", node);
            nn[u->n_nodes].at = uv_now(s->loop);
            nn[u->n_nodes++].gen = c->sync_gen;
        }
        if (!was) pres__announce(s, c, true, user);
        return;
    }
    int i = u ? pres__node_find(u, node) : -1;
    if (i < 0) return;
    u->nodes[i] = u->nodes[--u->n_nodes];
    if (pres__present(u)) return;
    pres__announce(s, c, false, user);
    pres__user_del(c, u);
}

typedef struct pres_sync {
    chat_server_t *srv;
    uint32_t gen;
    char chat_id[129];
} pres_sync_t;

/* The snapshot answered: the other nodes' entries it holds are confirmed (joins for users
 * new to us); those confirmed before it was asked for and absent from it are gone (leaves).
 * Then the members that asked for the list get it. */
static void pres__synced(void *ud, int status, const bus_presence_t *p, size_t n) {
    pres_sync_t *q = ud;
    chat_server_t *s = q->srv;
    pres_chat_t *c = pres__chat(s, q->chat_id);
    if (!c || c->sync_gen != q->gen) goto out; /* gone, or a newer snapshot is coming */
    c->syncing = false;
    if (status < 0) {
        log_warn("presence_snapshot_failed chat=%s error=%s: other nodes' users may be missing",
                 q->chat_id, chat_strerror(status));
    } else {
        for (size_t i = 0; i < n; i++)
            if (strcmp(p[i].node, s->bus->instance) != 0)
                pres__remote(s, c, p[i].user, p[i].node, true);
        for (size_t i = 0; i < c->nb; i++)
            for (pres_user_t *u = c->b[i], *next; u; u = next) {
                next = u->next;
                for (uint16_t k = 0; k < u->n_nodes;)
                    if (u->nodes[k].gen < q->gen) u->nodes[k] = u->nodes[--u->n_nodes];
                    else k++;
                if (!pres__present(u)) {
                    pres__announce(s, c, false, u->name);
                    pres__user_del(c, u);
                }
            }
    }
    c->synced = true;
    room_t *r = room_find(&s->rooms, c->id);
    for (room_member_t *rm = r ? room_first(r) : NULL; rm; rm = room_member_next(r, rm)) {
        session_t *m = chat_session_of(rm);
        if (m->presence_asked) {
            m->presence_asked = false;
            pres__send_list(m, c);
        }
    }
out:
    free(q);
}

/* Ask the bus who is online in c through the other nodes. */
static void pres__sync(chat_server_t *s, pres_chat_t *c) {
    if (!s->bus->ops->presence_list) {
        c->synced = true; /* one node: our own table is the whole truth */
        return;
    }
    pres_sync_t *q = malloc(sizeof *q);
    if (!q) return;
    q->srv = s;
    q->gen = c->sync_gen = ++s->presence->gens;
    snprintf(q->chat_id, sizeof q->chat_id, "%s", c->id);
    c->syncing = true;
    if (s->bus->ops->presence_list(s->bus, c->id, pres__synced, q) < 0) {
        /* the bus is down: its return syncs again */
        c->syncing = false;
        free(q);
    }
}

void chat_presence_subscribed(chat_server_t *s, const char *chat_id) {
    pres_chat_t *c = pres__chat(s, chat_id);
    if (c && !c->synced && !c->syncing) pres__sync(s, c);
}

/* ---- this node's part ---------------------------------------------------------------------- */

void chat_presence_open(chat_server_t *s, session_t *ss) {
    const char *chat_id = ss->member.room->chat_id;
    pres_chat_t *c = pres__chat(s, chat_id);
    if (!c && !(c = pres__chat_add(s, chat_id))) return;
    pres_user_t *u = pres__user(c, ss->user);
    bool was = u != NULL;
    if (!u && !(u = pres__user_add(c, ss->user))) return;
    if (u->local++ || u->grace_until) {
        /* a second tab, or back within the grace period: nothing changes for anyone */
        if (u->grace_until) s->presence->n_grace--;
        u->grace_until = 0;
    } else {
        pres__publish(s, chat_id, ss->user, true);
        if (!was) pres__announce(s, c, true, ss->user);
    }
    /* the room's subscription may be active already (the local bus: at once) */
    if (!c->synced && !c->syncing && (ss->member.room->subscribed || !s->bus_up)) pres__sync(s, c);
}

/* The user is gone from this node: tell the bus, and the members if no other node has them. */
static void pres__local_gone(chat_server_t *s, pres_chat_t *c, pres_user_t *u) {
    pres__publish(s, c->id, u->name, false);
    if (u->n_nodes) return;
    pres__announce(s, c, false, u->name);
    pres__user_del(c, u);
}

/* Forget a chat this node no longer has members in once no user of ours is in grace: the
 * other nodes' part is not followed without a subscription. */
static void pres__chat_gc(chat_server_t *s, pres_chat_t *c, bool room_empty) {
    if (!room_empty) return;
    bool keep = false;
    for (size_t i = 0; i < c->nb; i++)
        for (pres_user_t *u = c->b[i], *next; u; u = next) {
            next = u->next;
            if (u->local || u->grace_until) {
                u->n_nodes = 0;
                keep = true;
            } else {
                pres__user_del(c, u);
            }
        }
    c->synced = c->syncing = false;
    c->sync_gen = ++s->presence->gens; /* a snapshot still in flight is for the old room */
    if (!keep) pres__chat_del(s, c);
}

void chat_presence_close(chat_server_t *s, session_t *ss) {
    pres_chat_t *c = ss->member.room ? pres__chat(s, ss->member.room->chat_id) : NULL;
    pres_user_t *u = c ? pres__user(c, ss->user) : NULL;
    if (!u || !u->local) return;
    bool room_empty = ss->member.room->n == 1; /* this session is its last member */
    if (--u->local == 0) {
        if (s->cfg.presence_grace_ms && !s->stopping) {
            u->grace_until = uv_now(s->loop) + s->cfg.presence_grace_ms;
            s->presence->n_grace++;
        } else {
            pres__local_gone(s, c, u);
        }
    }
    pres__chat_gc(s, c, room_empty);
}

void chat_presence_sweep(chat_server_t *s, uint64_t now) {
    struct pres_table *t = s->presence;
    if (!t) return;
    bool refresh = s->bus->ops->presence_set && now - t->refreshed_at >= PRESENCE_REFRESH_MS;
    if (!t->n_grace && !refresh) return;
    if (refresh) t->refreshed_at = now;
    for (size_t i = 0; i < t->nb; i++)
        for (pres_chat_t *c = t->b[i], *cnext; c; c = cnext) {
            cnext = c->next;
            for (size_t j = 0; j < c->nb; j++)
                for (pres_user_t *u = c->b[j], *next; u; u = next) {
                    next = u->next;
                    if (u->grace_until && now >= u->grace_until) {
                        u->grace_until = 0;
                        t->n_grace--;
                        pres__local_gone(s, c, u);
                    } else if (refresh && (u->local || u->grace_until)) {
                        bus_presence_set(s->bus, c->id, u->name, true);
                    }
                }
            room_t *r = room_find(&s->rooms, c->id);
            if (!c->n && !r) pres__chat_del(s, c);
            else if (refresh && r && r->subscribed && !c->syncing) pres__sync(s, c);
        }
}

/* ---- events from the bus, the registry, the bus's state ------------------------------------ */

bool chat_presence_bus(chat_server_t *s, const char *chat_id, const uint8_t *p, size_t n) {
    static const char pj[] = "{\"event\":\"presence:", ty[] = "{\"event\":\"typing\"";
    bool typing = n >= sizeof ty - 1 && memcmp(p, ty, sizeof ty - 1) == 0;
    if (!typing && !(n >= sizeof pj - 1 && memcmp(p, pj, sizeof pj - 1) == 0)) return false;
    pres_chat_t *c = pres__chat(s, chat_id);
    if (!c) return true;
    json_t *root = json_loadb((const char *)p, n, 0, NULL);
    const char *ev = json_string_value(json_object_get(root, "event"));
    const char *user = json_string_value(json_object_get(root, typing ? "user_from" : "user"));
    const char *node = json_string_value(json_object_get(root, "node"));
    if (!ev || !user || !*user) {
        log_warn("bus_bad_event chat=%s len=%zu", chat_id, n);
    } else if (typing) {
        sbuf_t sb = {.p = (char *)p, .len = n}; /* borrowed: the frame is the payload */
        pres__deliver(s, chat_id, &sb, user);
    } else if (node && strlen(node) == 32 && strcmp(node, s->bus->instance) != 0) {
        bool join = strcmp(ev, "presence:join") == 0;
        if (join || strcmp(ev, "presence:leave") == 0) pres__remote(s, c, user, node, join);
    }
    json_decref(root);
    return true;
}

/* Not only the nodes that vanished since the last listing: one may die before any listing
 * saw it, and its users must leave all the same. */
void chat_presence_nodes_live(chat_server_t *s, const bus_node_t *nodes, size_t n,
                              uint64_t asked_at) {
    struct pres_table *t = s->presence;
    for (size_t i = 0; t && i < t->nb; i++)
        for (pres_chat_t *c = t->b[i]; c; c = c->next)
            for (size_t j = 0; j < c->nb; j++)
                for (pres_user_t *u = c->b[j], *next; u; u = next) {
                    next = u->next;
                    for (uint16_t k = 0; k < u->n_nodes; k++) {
                        bool live = u->nodes[k].at >= asked_at;
                        for (size_t x = 0; x < n && !live; x++)
                            live = strcmp(nodes[x].id, u->nodes[k].id) == 0;
                        if (live) continue;
                        log_debug("presence_node_gone chat=%s user=%s node=%s", c->id,
                                  LOG_STR(u->name), u->nodes[k].id);
                        char node[33];
                        memcpy(node, u->nodes[k].id, sizeof node);
                        pres__remote(s, c, u->name, node, false); /* may free u */
                        break; /* u may be gone: its other nodes, at the next listing */
                    }
                }
}

void chat_presence_bus_up(chat_server_t *s) {
    struct pres_table *t = s->presence;
    for (size_t i = 0; t && i < t->nb; i++)
        for (pres_chat_t *c = t->b[i]; c; c = c->next) {
            /* Redis may have restarted empty, and the others may have taken us for dead */
            for (size_t j = 0; j < c->nb; j++)
                for (pres_user_t *u = c->b[j]; u; u = u->next)
                    if (u->local || u->grace_until) pres__publish(s, c->id, u->name, true);
            if (room_find(&s->rooms, c->id)) pres__sync(s, c);
        }
}

/* ---- the members' commands ----------------------------------------------------------------- */

void chat_presence_get(chat_server_t *s, session_t *ss) {
    ss->presence = true;
    pres_chat_t *c = pres__chat(s, ss->member.room->chat_id);
    if (c && !c->synced && s->bus_up) {
        ss->presence_asked = true; /* answered with the snapshot */
        if (!c->syncing && ss->member.room->subscribed) pres__sync(s, c);
        return;
    }
    pres__send_list(ss, c);
}

bool chat_presence_typing_due(chat_server_t *s, session_t *ss) {
    pres_chat_t *c = pres__chat(s, ss->member.room->chat_id);
    pres_user_t *u = c ? pres__user(c, ss->user) : NULL;
    uint64_t now = uv_now(s->loop);
    return !u || !u->typing_at || now - u->typing_at >= TYPING_EVERY_MS;
}

void chat_presence_typing(chat_server_t *s, session_t *ss) {
    const char *chat_id = ss->member.room->chat_id;
    pres_chat_t *c = pres__chat(s, chat_id);
    pres_user_t *u = c ? pres__user(c, ss->user) : NULL;
    if (u) u->typing_at = uv_now(s->loop);
    sbuf_t sb = {0};
    sbuf_puts(&sb, "{\"event\":\"typing\",\"chat_id\":");
    sbuf_json_str(&sb, chat_id, strlen(chat_id));
    sbuf_puts(&sb, ",\"user_from\":");
    sbuf_json_str(&sb, ss->user, strlen(ss->user));
    sbuf_puts(&sb, "}");
    pres__deliver(s, chat_id, &sb, ss->user);
    if (!sb.oom && s->bus->ops->has_peers && bus_publish(s->bus, chat_id, sb.p, sb.len) < 0)
        log_debug("typing_publish_failed chat=%s", chat_id);
    sbuf_free(&sb);
}

/* ---- GET /api/chats/{chat_id}/presence ------------------------------------------------------ */

typedef struct pres_rest {
    chat_server_t *srv;
    void (*done)(void *ud, const sbuf_t *body);
    void *ud;
    char chat_id[129];
} pres_rest_t;

static void pres__rest_listed(void *ud, int status, const bus_presence_t *p, size_t n) {
    pres_rest_t *q = ud;
    sbuf_t sb = {0};
    if (status == 0) {
        const char **names = malloc((n ? n : 1) * sizeof *names);
        if (names) {
            for (size_t i = 0; i < n; i++) names[i] = p[i].user;
            /* our own users in grace are not entries of other nodes: add our table */
            pres__put_list(&sb, NULL, q->chat_id, pres__chat(q->srv, q->chat_id), names, n);
        } else {
            sb.oom = true;
        }
        free(names);
    }
    q->done(q->ud, status == 0 ? &sb : NULL);
    sbuf_free(&sb);
    free(q);
}

int chat_presence_rest(chat_server_t *s, const char *chat_id,
                       void (*done)(void *ud, const sbuf_t *body), void *ud) {
    pres_chat_t *c = pres__chat(s, chat_id);
    if ((c && c->synced) || !s->bus->ops->presence_list) {
        sbuf_t sb = {0};
        pres__put_list(&sb, NULL, chat_id, c, NULL, 0);
        done(ud, &sb);
        sbuf_free(&sb);
        return 0;
    }
    pres_rest_t *q = calloc(1, sizeof *q);
    if (!q) return CHAT_ENOMEM;
    q->srv = s;
    q->done = done;
    q->ud = ud;
    snprintf(q->chat_id, sizeof q->chat_id, "%s", chat_id);
    int rc = s->bus->ops->presence_list(s->bus, chat_id, pres__rest_listed, q);
    if (rc < 0) free(q);
    return rc;
}

void chat_presence_free(chat_server_t *s) {
    struct pres_table *t = s->presence;
    if (!t) return;
    for (size_t i = 0; i < t->nb; i++)
        for (pres_chat_t *c = t->b[i], *next; c; c = next) {
            next = c->next;
            pres__chat_del(s, c);
        }
    free(t->b);
    free(t);
    s->presence = NULL;
}

/* chat: declarations shared by the files of the chat layer; not part of its contract. */
#ifndef CHAT_CHAT_INTERNAL_H
#define CHAT_CHAT_INTERNAL_H

#include <jansson.h>

#include "bus/bus.h"
#include "chat.h"
#include "chat/room.h"
#include "http/http.h"
#include "http/server.h"
#include "search/search.h"
#include "store/store.h"
#include "ws/ws.h"

/* ---- the JSON protocol (protocol.c) --------------------------------------------------- */
/* PROTO_PING: {"event":"ping"}, answered {"event":"pong"} to the sender alone: a client's
 * way to learn that its connection is still alive (a browser cannot send a WebSocket ping
 * frame nor see ours). Not stored, not delivered.
 * PROTO_TOKEN_REFRESH: {"event":"token:refresh","token":"..."}, a new token for an open
 * connection (session.c checks it and moves the connection's expiry). Not stored, not
 * delivered.
 * PROTO_READ: {"event":"read","message_id":"..."}, the user's read position in the chat
 * (read.c); message_id only as a decimal string.
 * PROTO_TYPING: {"event":"typing"}, the sender is typing: forwarded to the other members
 * (presence.c), never stored. PROTO_PRESENCE_GET: {"event":"presence:get"}, answered
 * {"event":"presence","users":[..]} to the sender alone. */
enum {
    PROTO_MESSAGE = 1,
    PROTO_EDIT,
    PROTO_DELETE,
    PROTO_PING,
    PROTO_TOKEN_REFRESH,
    PROTO_READ,
    PROTO_TYPING,
    PROTO_PRESENCE_GET
};
/* allow_events flag: an object without "event" is a message:message (the REST body); a bit
 * above every (1 << PROTO_*) */
#define PROTO_IMPLICIT_MESSAGE (1u << 16)
_Static_assert(PROTO_PRESENCE_GET < 16, "PROTO_IMPLICIT_MESSAGE must stay above the kinds");

#define PROTO_MAX_CLIENT_ID 128

typedef struct proto_cmd {
    int kind;
    json_t *root;        /* owns the strings below; released by proto_cmd_free */
    const char *message; /* PROTO_MESSAGE, PROTO_EDIT */
    size_t message_len;
    const char *client_id; /* optional; NULL if absent */
    uint64_t message_id;   /* PROTO_EDIT, PROTO_DELETE, PROTO_READ */
    const char *token;     /* PROTO_TOKEN_REFRESH: the token as sent, not yet checked */
    size_t token_len;
    const char *error; /* after CHAT_EPROTO: a static, readable reason */
} proto_cmd_t;

/* Decode one client text message (valid UTF-8 already). Returns
 *   0            *cmd is filled; free with proto_cmd_free
 *   CHAT_EINVAL  not JSON or not a JSON object (the connection closes with 1007)
 *   CHAT_EPROTO  a well-formed object that is not a valid command: cmd->error says why and
 *                cmd->client_id/message_id are set where they could be read (error event
 *                "bad_request"; the connection stays open). Free with proto_cmd_free.
 * allow_events: bitmask of (1 << PROTO_*) accepted; others are "unknown event". */
int proto_decode(const uint8_t *data, size_t len, unsigned allow_events, proto_cmd_t *cmd);
void proto_cmd_free(proto_cmd_t *cmd);

/* Append a stored message as a JSON object.
 * event != NULL: the live event ({"event":..,"chat_id":..,...}); the text is left out when
 * the message is deleted. event == NULL: the history form, with "deleted": true/false. */
void proto_put_msg(sbuf_t *sb, const char *event, const store_msg_t *m);
/* From an event proto_put_msg wrote (event != NULL), the message id and whether the event is
 * "message:message" (a new message), without parsing the JSON: the bus hot path. false when
 * p is not such an event. Reads p only. */
bool proto_peek(const uint8_t *p, size_t n, bool *is_new, uint64_t *id);
/* The event members receive for a stored change (op APPEND, EDIT or DELETE; m the message
 * after it), appended to sb: what the outbox keeps for Kafka (store_encode_fn). Pure, so
 * safe on the store's writer thread. */
void proto_put_event(sbuf_t *sb, store_op_t op, const store_msg_t *m);
/* Append the event of a read position: {"event":"read","chat_id":..,"message_id":..,
 * "user_from":..} (user_from: whose position; only that user's connections receive it). */
void proto_put_read(sbuf_t *sb, const char *chat_id, const char *user, uint64_t message_id);
/* Append an error event {"event":"error","code":..,"detail":..} with the optional
 * client_id / message_id (0 = none) it refers to. */
void proto_put_error(sbuf_t *sb, const char *code, const char *detail, const char *client_id,
                     uint64_t message_id);

/* ---- the server's state (every file of the chat layer reads it) ----------------------- */
enum { PEER_HTTP = 1, PEER_WS = 2 };

typedef struct peer peer_t;
struct peer {
    int kind;
    chat_server_t *srv;
    conn_t *conn;           /* NULL once the connection is gone */
    queue_t link;           /* in the server's list of open connections */
    uint64_t last_rx;       /* uv_now() of the last bytes received */
    uint64_t closing_since; /* uv_now() when we started closing, 0 if not */
    int refs;               /* 1 for the connection + 1 per store request in flight */
};

typedef struct session {
    peer_t peer;
    ws_parser_t parser;
    room_member_t member; /* its link in its room (member.room) */
    uint64_t ping_sent;   /* uv_now() of an unanswered keepalive ping, 0 if none */
    uint16_t close_code;  /* what we sent or echoed, for metrics; 0 = none yet */
    bool replaying;       /* ?since=: the backlog is being read; live events wait */
    bool replay_waiting;  /* ... once the room's bus subscription is active */
    /* the token's exp in epoch seconds, 0 = never expires; 32 bits fit the padding here
     * (a later exp, past 2106, is saturated) so a session is no bigger for it */
    uint32_t token_exp;
    held_queue_t held; /* live events while the replay goes first */
    /* ?since= cursors (one per origin node, or one id). After the replay they stay as a
     * filter: a message from a cursor's origin at or below it is one the client has. */
    uint64_t *cursors;
    uint16_t n_cursors;
    bool cursor_single; /* the one-id form: during the replay it stands for all */
    /* ids the backlog sent: the same message may still come live from another node (the
     * store can be ahead of the bus), and must not be sent twice. After a while they are
     * folded into the cursors (per origin, the newest), which filter from then on. */
    uint64_t *replayed;
    uint32_t n_replayed;
    uint64_t replayed_until; /* uv_now() after which replayed is folded */
    /* the backlog of a ?since= connection: read in pages, sent as the socket drains. Only
     * the ids of what will be sent are kept for all of it; the messages themselves for a
     * bounded number of bytes, read again from the store as the sending reaches them. */
    store_msg_t *backlog;   /* what will be sent, oldest first */
    uint8_t *backlog_state; /* per entry: 0 id only, 1 loaded, 2 no longer stored */
    size_t n_backlog, backlog_cap, backlog_next;
    size_t backlog_bytes; /* of the loaded messages */
    bool backlog_spilled; /* an entry past the byte bound holds its id only */
    bool backlog_reading; /* a read to load entries is in flight */
    uint64_t replay_from; /* the read window: messages after this id */
    int replay_pages;     /* pages read so far */
    buf_t *replay_frame;  /* the next frame, waiting for the queue to drain */
    /* the last message:message ids this connection carried live (sent or held), and how
     * many it carried: a retry whose original came on this connection after the retry
     * arrived (the original's node was slow) is not answered again, that copy was the
     * acknowledgement */
    uint64_t recent_new[16];
    uint32_t n_new;
    size_t inflight;     /* bytes of this member's commands the store has not answered */
    bool flow_paused;    /* not read until its own echoes drain (a fast sender) */
    uint64_t paused_at;  /* uv_now() when flow_paused was set */
    bool presence;       /* gets presence:join/leave and typing (it asked for them) */
    bool presence_asked; /* a presence:get waits for the chat's snapshot */
    char user[129];
} session_t;

/* An HTTP connection: the peer (for the server's list and references) and its driver. */
typedef struct http_peer {
    peer_t peer;
    http_conn_t http;
} http_peer_t;

#define METRIC_LAT_BUCKETS 13
enum { CLOSE_CODE_SLOTS = 16 }; /* 1000..1015, and one slot for anything else */

/* A Prometheus histogram of seconds over the fixed bounds in server.c. */
typedef struct metric_hist {
    uint64_t buckets[METRIC_LAT_BUCKETS]; /* cumulative at scrape time, stored per bucket */
    uint64_t count;
    double sum;
} metric_hist_t;

typedef struct chat_metrics {
    uint64_t messages_in, messages_out, http_requests, store_errors;
    metric_hist_t store_lat; /* submit to callback */
    metric_hist_t loop_busy; /* each loop turn's work, its wait for events excluded */
    uint64_t closes[CLOSE_CODE_SLOTS + 1];
    uint64_t ws_opened;
    uint64_t rate_limited;   /* sends refused by --rate-limit */
    uint64_t ws_deflate;     /* connections that negotiated permessage-deflate */
    uint64_t deflate_frames; /* compressed encodings made (one per event at most) */
    uint64_t deflate_out;    /* compressed frames queued */
} chat_metrics_t;

typedef struct static_file {
    char *path;       /* URL path, e.g. "/index.html" */
    const char *type; /* Content-Type */
    buf_t *body;
} static_file_t;

struct chat_server {
    uv_loop_t *loop;
    chat_config_t cfg;
    conn_server_t cs;
    store_t *store;
    search_t *search;
    bus_t *bus;
    struct stream *stream; /* the Kafka relay, with --kafka */
    id_gen_t ids;
    room_table_t rooms;
    queue_t peers; /* peer_t.link: the open connections, newest first */
    size_t n_peers, n_sessions;
    uv_timer_t sweep;
    /* the loop's own load: a prepare handle runs once per turn, before the poll */
    uv_prepare_t turn;
    uint64_t turn_at, turn_idle; /* uv_hrtime and uv_metrics_idle_time at the last turn */
    bool idle_metrics;           /* the loop measures its idle time (UV_METRICS_IDLE_TIME) */
    static_file_t *files;
    size_t n_files;
    chat_metrics_t m;
    struct rate_table *rate;     /* --rate-limit's buckets (ratelimit.c); NULL until first used */
    ws_zip_t *zip;               /* --compression: the loop's one compressor and inflater */
    struct pres_table *presence; /* who is online per chat (presence.c); NULL until used */
    /* the cluster (cluster.c) */
    bool bus_up;
    int64_t bus_down_ms; /* when the bus went down, 0 if it never did */
    unsigned node_id;    /* the id in our message ids: configured, or leased on the bus */
    int lease_status;    /* 1 while the lease is asked for, then its answer */
    char lease_detail[256];
    uv_timer_t heartbeat;
    bus_node_t self;
    /* clients this node sent to each node by /api/connect since that node's last heartbeat
     * (its connection count does not show them yet) */
    struct handout {
        char id[33];
        int64_t seen_at;
        uint32_t n;
    } handouts[64];
    size_t n_handouts;
    /* the other nodes at the last listing: one that vanishes may have died between a commit
     * and its publish, so the rooms read back what it may have left unpublished */
    struct known_node {
        char id[33];
        int64_t seen_at;
    } known[64];
    size_t n_known;
    bool listing;        /* a listing is in flight */
    uint64_t listing_at; /* uv_now() when it was asked for */
    bool known_valid;    /* known[] is from a successful listing */
    /* shutdown */
    void (*on_peer_gone)(chat_server_t *s); /* server.c: a shutdown waits for the last */
    bool stopping;
    uint16_t stop_code;
    int stop_step;
    uv_timer_t stop_timer;
    void (*stop_done)(void *);
    void *stop_arg;
};

/* peer.c */
void chat_peer_link(chat_server_t *s, peer_t *p, int kind, conn_t *c);
void chat_peer_unlink(peer_t *p); /* the connection closed */
/* The open connections, newest first: the first, and the one after p (NULL past the last);
 * borrowed. Closing a connection never unlinks it at once, so a walk may close as it goes. */
peer_t *chat_peer_first(chat_server_t *s);
peer_t *chat_peer_next(chat_server_t *s, peer_t *p);
void chat_peer_unref(peer_t *p); /* frees at zero */
/* metrics.c */
void chat_hist_record(metric_hist_t *h, double secs);
void chat_record_close(chat_server_t *s, uint16_t code);
void chat_record_latency(chat_server_t *s, uint64_t t0);
void chat_metrics_render(chat_server_t *s, sbuf_t *sb);

/* static.c: the web client's files, read once at start (chat_static_load, up to two levels
 * below dir) and freed at shutdown; chat_static_find borrows one (NULL if none). */
void chat_static_load(chat_server_t *s, const char *dir, const char *prefix, int depth);
void chat_static_free(chat_server_t *s);
const static_file_t *chat_static_find(chat_server_t *s, const char *path, size_t n);

/* cluster.c */
/* Before anything can mint a message id: lease the node id on the bus (waiting for the bus
 * if it is down, by running the loop), then set up s->ids. 0, or an error with err set. */
int chat_cluster_lease(chat_server_t *s, char *err, size_t errlen);
void chat_cluster_start(chat_server_t *s);
/* Deregister and stop heartbeats (drain). */
void chat_cluster_stop(chat_server_t *s);
void chat_cluster_bus_state(chat_server_t *s, bool up);
/* /api/connect: the least-loaded live node that is not draining, counting the clients
 * already sent there since its last heartbeat; ties broken at random. NULL if none. */
const bus_node_t *chat_cluster_pick(chat_server_t *s, const bus_node_t *nodes, size_t n);
/* session.c */
/* The frame for member ss (borrowed from f; a compressed one is made once per event, on the
 * first member that negotiated permessage-deflate). */
buf_t *chat_frames_pick(chat_server_t *s, chat_frames_t *f, const session_t *ss);
extern const conn_handler_t chat_ws_handler;
/* Take over an upgraded connection: the 101 was sent; rest are bytes already read.
 * token_exp: the handshake token's exp (0: none); the sweep closes the session with 4001
 * once it passes, unless a token:refresh moved it.
 * n_since > 0: first replay what the cursors since[] say was missed, then go live.
 * One cursor: every message after it. Several (one per origin node, the newest id seen
 * from each): per origin node, every message after its cursor; origins not named, every
 * message from shortly before the oldest cursor. deflate: permessage-deflate was negotiated
 * (the 101 said so). */
void chat_session_start(chat_server_t *s, conn_t *c, const char *chat_id, const char *user,
                        int64_t token_exp, const uint64_t *since, size_t n_since, bool deflate,
                        bool presence, const uint8_t *rest, size_t rest_len);
/* The close code of a connection whose token's exp passed without a token:refresh. */
#define CHAT_CLOSE_TOKEN_EXPIRED 4001
/* The sweep's expiry check: close with 4001 "token expired" once now (epoch seconds) has
 * reached the token's exp (a token is valid while exp > now, as at the handshake). */
void chat_session_check_expiry(session_t *ss, int64_t now);
/* The room's subscription became active: start a replay that waited for it. */
void chat_session_subscribed(session_t *ss);
/* Fold the replayed ids into the cursors once they can no longer come live out of order
 * (called by the sweep). */
void chat_session_expire_replayed(session_t *ss, uint64_t now);
/* The session whose room link m is. */
static inline session_t *chat_session_of(room_member_t *m) {
    return (session_t *)(void *)((char *)m - offsetof(session_t, member));
}
/* Queue a live event to one member (or hold it while the member replays), in the encoding
 * it negotiated (chat_frames_pick). */
int chat_session_deliver(session_t *ss, chat_frames_t *f, bool is_new, uint64_t id);
/* Send a close frame with code and reason, then close gracefully. */
void chat_session_close(session_t *ss, uint16_t code, const char *reason);

/* read.c: read positions */
/* Store ss's user's read position at cmd->message_id (PROTO_READ); 0: the op owns cmd and
 * answers later (the event to the user's connections, or an error to ss); < 0: nothing was
 * submitted, cmd is still the caller's. */
struct op;
int chat_read_submit(chat_server_t *s, session_t *ss, proto_cmd_t *cmd,
                     void (*reply)(struct op *op, const sbuf_t *ev));
/* A bus event for room r: if it is a read event, hand it to the connections of the user it
 * names (and no one else) and return true; false: not a read event, p is untouched. */
bool chat_read_from_bus(chat_server_t *s, room_t *r, const uint8_t *p, size_t n);

/* routes.c */
extern const conn_handler_t chat_http_handler;
/* The sweep's look at an HTTP connection: 408 for a request that trickles past its deadline,
 * close when idle (neither bytes in nor written out) for idle_ms. */
void chat_http_sweep(http_peer_t *hp, uint64_t now, uint64_t idle_ms);

/* ---- ratelimit.c: --rate-limit, a token bucket per user on this node ------------------- */
/* Most users the table tracks at once: an entry is about 50 bytes with malloc's overhead,
 * plus the user id (at most 128), so at most about 12 MiB, and 128 KiB of chain heads. */
#define RATE_MAX_USERS 65536u

typedef struct rate_bucket {
    double tokens;  /* sends allowed right now, at most the burst */
    uint64_t at_ms; /* the time tokens was computed at */
} rate_bucket_t;
/* A full bucket at now_ms. */
void rate_bucket_init(rate_bucket_t *b, double burst, uint64_t now_ms);
/* One send at now_ms (milliseconds of any monotonic clock) with per_s tokens a second
 * refilled up to burst. Returns 0 if it may go (a token taken), else the ms until a token
 * is there (>= 1; a refusal takes nothing). Pure: no clock is read. */
uint64_t rate_bucket_take(rate_bucket_t *b, double per_s, double burst, uint64_t now_ms);
/* True if the bucket has refilled to burst by now_ms: forgetting it changes nothing. */
bool rate_bucket_idle(const rate_bucket_t *b, double per_s, double burst, uint64_t now_ms);

typedef struct rate_table rate_table_t;
/* Buckets keyed by user id, at most max_users of them (see ratelimit.c for what happens
 * when full). NULL on OOM or if per_s <= 0, burst < 1 or max_users == 0. The caller frees
 * it with rate_table_free (NULL is fine). */
rate_table_t *rate_table_new(double per_s, double burst, size_t max_users);
void rate_table_free(rate_table_t *t);
/* rate_bucket_take on user's bucket (made full on first sight); user is copied. */
uint64_t rate_table_take(rate_table_t *t, const char *user, uint64_t now_ms);
size_t rate_table_count(const rate_table_t *t);

/* A send (cmd) from a WebSocket of user: 0 if it may go on (or limits are off); else the
 * ms to wait, the refusal counted, and the error event rate_limited (with retry_after_ms,
 * cmd's client_id/message_id) appended to event, which stays the caller's to send and
 * free. cmd stays the caller's. */
uint64_t rate_admit_cmd(chat_server_t *s, const char *user, const proto_cmd_t *cmd, sbuf_t *event);
/* The same for a REST send: on a refusal *resp is the 429 answer (Retry-After, JSON body)
 * whose reference the caller owns (NULL on OOM). */
uint64_t rate_admit_rest(chat_server_t *s, const char *user, bool keep_alive, buf_t **resp);

/* ---- presence.c: who is online, who is typing -------------------------------------------- */
/* A session joined its room (after chat_room_join) / is about to leave it (before
 * chat_room_leave): the user's first connection to the chat is a presence:join, the last
 * one's close a presence:leave after --presence-grace-ms unless the user is back by then. */
void chat_presence_open(chat_server_t *s, session_t *ss);
void chat_presence_close(chat_server_t *s, session_t *ss);
/* presence:get: the session gets presence events from now on, and the list (at once, or
 * once the chat's snapshot from the bus is in). */
void chat_presence_get(chat_server_t *s, session_t *ss);
/* typing: true if the user's last typing in this chat went out TYPING_EVERY_MS ago or more
 * (else the caller drops it); chat_presence_typing forwards it to the other members. */
bool chat_presence_typing_due(chat_server_t *s, session_t *ss);
void chat_presence_typing(chat_server_t *s, session_t *ss);
/* A payload from the bus: true if it was a presence or typing event (handled here). */
bool chat_presence_bus(chat_server_t *s, const char *chat_id, const uint8_t *p, size_t n);
/* The room's bus subscription became active: read who is online through the other nodes. */
void chat_presence_subscribed(chat_server_t *s, const char *chat_id);
/* The live nodes, as a listing asked for at asked_at (uv_now) found them: the users of
 * any other node leave (unless connected elsewhere), those known since asked_at excepted
 * (their node may have registered after the listing read the registry). */
void chat_presence_nodes_live(chat_server_t *s, const bus_node_t *nodes, size_t n,
                              uint64_t asked_at);
/* The bus is back: our entries are written again and every chat's snapshot read again. */
void chat_presence_bus_up(chat_server_t *s);
/* The sweep: grace periods that ended, and the periodic rewrite of our entries. */
void chat_presence_sweep(chat_server_t *s, uint64_t now);
/* GET /api/chats/{chat_id}/presence: done gets the JSON body ({"chat_id":..,"users":[..]}),
 * or NULL if the bus could not be asked; at once or later on the loop thread. body is valid
 * during the call. 0, or an error (then done does not run). */
int chat_presence_rest(chat_server_t *s, const char *chat_id,
                       void (*done)(void *ud, const sbuf_t *body), void *ud);
/* Free the tables (shutdown). */
void chat_presence_free(chat_server_t *s);

#endif

/* session: one WebSocket member of one chat: its commands (handed to command.c, which
 * stores and delivers them; chat__reply answers the sender), the live events the room
 * delivers to it (chat_session_deliver), its flow control, and its resume (?since=: the
 * backlog read from the store while live events wait in its held queue). A session that
 * goes away while a request is in flight stays allocated (refcounted) until the completion
 * has run.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "chat/command.h"

static int chat__send(session_t *ss, buf_t *b) {
    conn_t *c = ss->peer.conn;
    if (!c || conn_is_closing(c)) return CHAT_ECLOSED;
    int rc = conn_send(c, b);
    if (rc == CHAT_EBUSY) {
        log_warn("slow_consumer user=%s queued=%zu", LOG_STR(ss->user), conn_queued(c));
        ss->close_code = WS_CLOSE_POLICY;
        conn_abort(c);
    }
    return rc;
}

/* ---- a fast sender is slowed, not cut ------------------------------------------------- */

/* A member's own commands come back to it as echoes. One that sends faster than it reads
 * would fill its own queue and be cut as a slow consumer; instead it is not read while its
 * queue and the echoes still to come pass half of --max-outbound-bytes, and is read again
 * once they are down to a quarter. What the others send still fills its queue, so a member
 * that stops reading is still cut at the limit. */
static size_t chat__echo_cost(const proto_cmd_t *cmd) { return cmd->message_len + 512; }

static void chat__flow(session_t *ss) {
    conn_t *c = ss->peer.conn;
    if (!c || conn_is_closing(c)) return;
    size_t high = ss->peer.srv->cfg.max_outbound_bytes / 2, low = high / 2;
    size_t load = conn_queued(c) + ss->inflight;
    if (!ss->flow_paused) {
        if (load <= high) return;
        ss->flow_paused = true;
        ss->paused_at = uv_now(ss->peer.srv->loop);
        conn_pause_read(c);
    } else if (load <= low) {
        /* Unread while paused, its pongs too: the keepalive counts from here afresh
         * (chat_sweep judged it by its reading of our writes meanwhile). */
        ss->flow_paused = false;
        ss->peer.last_rx = uv_now(ss->peer.srv->loop);
        ss->ping_sent = 0;
        conn_resume_read(c);
        return;
    }
    /* Still too much: wait for the queue to drain far enough (the echoes to come are
     * counted; their arrival calls this again). */
    size_t target = low > ss->inflight ? low - ss->inflight : 0;
    if (conn_queued(c) > target) conn_notify_drain(c, target);
}

buf_t *chat_frames_pick(chat_server_t *s, chat_frames_t *f, const session_t *ss) {
    if (!ss->parser.zip) return f->plain;
    if (!f->tried) {
        f->tried = true;
        f->zipped = ws_zip_frame(s->zip, f->plain);
        if (f->zipped) s->m.deflate_frames++;
    }
    if (!f->zipped) return f->plain;
    s->m.deflate_out++;
    return f->zipped;
}

/* A text frame for this member alone: compressed if it negotiated that and it is worth it. */
static buf_t *chat__frame(session_t *ss, const void *p, size_t n) {
    chat_frames_t f = {.plain = ws_frame_new(WS_OP_TEXT, p, n)};
    if (!f.plain) return NULL;
    buf_t *b = buf_ref(chat_frames_pick(ss->peer.srv, &f, ss));
    buf_unref(f.plain);
    buf_unref(f.zipped);
    return b;
}

static void chat__send_json(session_t *ss, const sbuf_t *sb) {
    if (sb->oom) return;
    buf_t *f = chat__frame(ss, sb->p, sb->len);
    if (!f) return;
    chat__send(ss, f);
    buf_unref(f);
}

static void chat__send_error(session_t *ss, const char *code, const char *detail,
                             const char *client_id, uint64_t message_id) {
    sbuf_t sb = {0};
    proto_put_error(&sb, code, detail, client_id, message_id);
    chat__send_json(ss, &sb);
    sbuf_free(&sb);
}

static bool chat__was_replayed(const session_t *ss, uint64_t id) {
    size_t lo = 0, hi = ss->n_replayed; /* sorted: the backlog comes in id order */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ss->replayed[mid] == id) return true;
        if (ss->replayed[mid] < id) lo = mid + 1;
        else hi = mid;
    }
    return false;
}

static unsigned chat__origin(uint64_t id) { return (unsigned)((id >> 12) & 1023); }

/* The client has this message: it named a cursor of its origin node at or above it (each
 * node delivers its own messages in id order), or the backlog sent it. */
static bool chat__client_has(const session_t *ss, uint64_t id) {
    if (ss->replayed && chat__was_replayed(ss, id)) return true;
    for (uint16_t i = 0; i < ss->n_cursors; i++)
        if (chat__origin(ss->cursors[i]) == chat__origin(id) && id <= ss->cursors[i]) return true;
    return false;
}

/* Raise the cursor of id's origin to id (adding one for a new origin). */
static void chat__cursor_raise(session_t *ss, uint64_t id) {
    for (uint16_t i = 0; i < ss->n_cursors; i++)
        if (chat__origin(ss->cursors[i]) == chat__origin(id)) {
            if (id > ss->cursors[i]) ss->cursors[i] = id;
            return;
        }
    if (ss->n_cursors == UINT16_MAX) return;
    uint64_t *nc = realloc(ss->cursors, sizeof(uint64_t) * (ss->n_cursors + 1u));
    if (!nc) return; /* the filter is weaker, nothing is lost */
    ss->cursors = nc;
    ss->cursors[ss->n_cursors++] = id;
}

void chat_session_expire_replayed(session_t *ss, uint64_t now) {
    if (ss->replayed && !ss->replaying && now >= ss->replayed_until) {
        /* Anything the backlog sent that could still come live has come by now (the ids
         * behind it have too): per origin, the newest id sent filters from here on. */
        for (uint32_t i = 0; i < ss->n_replayed; i++) chat__cursor_raise(ss, ss->replayed[i]);
        free(ss->replayed);
        ss->replayed = NULL;
        ss->n_replayed = 0;
    }
}

int chat_session_deliver(session_t *ss, chat_frames_t *f, bool is_new, uint64_t id) {
    conn_t *c = ss->peer.conn;
    if (!c || conn_is_closing(c)) return CHAT_ECLOSED;
    if (is_new && chat__client_has(ss, id)) return CHAT_EINVAL;
    buf_t *frame = chat_frames_pick(ss->peer.srv, f, ss);
    if (is_new) ss->recent_new[ss->n_new++ & 15] = id;
    if (!ss->replaying) return chat__send(ss, frame);
    /* Replaying: keep the live event until the backlog has gone out, bounded like the
     * connection's own queue. Past that the client is too far behind to be served from
     * memory: it is told to come back (1013), and its resume with since= reads the store,
     * so nothing is lost. */
    if (ss->held.bytes + frame->len > ss->peer.srv->cfg.max_outbound_bytes ||
        held_push(&ss->held, frame, is_new, id) < 0) {
        log_warn("replay_behind user=%s held=%zu: closing it to resume", LOG_STR(ss->user),
                 ss->held.bytes);
        chat_session_close(ss, WS_CLOSE_TRY_AGAIN, "too far behind; resume with since=");
        return CHAT_EBUSY;
    }
    return 0;
}

void chat_session_close(session_t *ss, uint16_t code, const char *reason) {
    conn_t *c = ss->peer.conn;
    if (!c || conn_is_closing(c)) return;
    ss->close_code = code;
    buf_t *f = ws_close_frame_new(code, reason);
    if (f) conn_send_force(c, f);
    buf_unref(f);
    conn_close(c);
}

/* ---- the answer to its own commands ------------------------------------------------------ */

/* A command of this session completed (command.c delivered it if stored): the retry's
 * acknowledgement, the flow control, or the error event. */
static void chat__reply(op_t *op, const sbuf_t *ev) {
    session_t *ss = (session_t *)op->origin;
    store_req_t *req = &op->req;
    /* The sender of a retry gets the original (its acknowledgement) unless this connection
     * carried it since the retry arrived (the broadcast just now, or the original's own
     * publish) or in its replay: answered through the session's own filter, so that it
     * comes neither twice nor ahead of a replay. A retry sent after the acknowledgement
     * came is answered again. */
    if (req->status == 0 && !ev->oom && req->duplicate && ss->peer.conn) {
        bool carried = false;
        uint32_t from = ss->n_new - op->mark > 16 ? ss->n_new - 16 : op->mark;
        for (uint32_t i = from; i != ss->n_new && !carried; i++)
            carried = ss->recent_new[i & 15] == req->msg.id;
        room_t *r = ss->member.room;
        if (!carried && !(r && r->catching_up)) {
            chat_frames_t f = {.plain = ws_frame_new(WS_OP_TEXT, ev->p, ev->len)};
            if (f.plain) chat_session_deliver(ss, &f, true, req->msg.id);
            buf_unref(f.plain);
            buf_unref(f.zipped);
        }
    }
    size_t cost = chat__echo_cost(&op->cmd);
    ss->inflight = ss->inflight > cost ? ss->inflight - cost : 0;
    if (!ss->peer.conn) return;
    if (req->status == 0) {
        /* answered with the broadcast */
    } else if (req->status == CHAT_ENOTFOUND) {
        chat__send_error(ss, "not_found", "no such message in this chat", NULL, req->id);
    } else if (req->status == CHAT_EPERM) {
        chat__send_error(ss, "not_author", "only the author may change a message", NULL, req->id);
    } else if (req->status == CHAT_EBUSY) { /* the Kafka outbox is full (src/stream/) */
        chat__send_error(ss, "unavailable",
                         "the event stream is behind (outbox full): not stored, retry later",
                         op->cmd.client_id, req->op == STORE_APPEND ? 0 : req->id);
    } else {
        chat__send_error(ss, "store_unavailable",
                         "the message could not be stored; it was not delivered", op->cmd.client_id,
                         req->op == STORE_APPEND ? 0 : req->id);
    }
    chat__flow(ss);
}

/* ---- the WebSocket side --------------------------------------------------------------- */

/* A token's exp as the session keeps it: 0 (none) stays 0, one past 2106 saturates. */
static uint32_t chat__exp32(int64_t exp) {
    return exp <= 0 ? 0 : exp >= (int64_t)UINT32_MAX ? UINT32_MAX : (uint32_t)exp;
}

/* token:refresh: the new token is checked as at the handshake (signature, exp, iss/aud, the
 * chats claim for this chat) and must name the same user; then the connection lives until
 * its exp. A refused token changes nothing: the old deadline still holds, and the client
 * learns why from the error code. Only the deadline (4 bytes) is kept, not the token. */
static void chat__token_refresh(session_t *ss, const proto_cmd_t *cmd) {
    chat_server_t *s = ss->peer.srv;
    jwt_claims_t cl;
    int64_t now = (int64_t)time(NULL);
    int rc = s->cfg.jwks ? jwks_verify(s->cfg.jwks, cmd->token, cmd->token_len, now, &cl)
                         : jwt_verify(cmd->token, cmd->token_len, s->cfg.jwt_secret, now, &cl);
    if (rc < 0) {
        chat__send_error(ss, "bad_token",
                         rc == CHAT_EEXPIRED    ? "the new token has expired"
                         : rc == CHAT_ENOTFOUND ? "unknown key id (kid): the keys are being "
                                                  "refreshed, retry shortly"
                                                : "invalid token",
                         NULL, 0);
        return;
    }
    if (strcmp(cl.sub, ss->user) != 0)
        chat__send_error(ss, "wrong_user", "the new token is for another user", NULL, 0);
    else if (!jwt_allows_chat(&cl, ss->member.room->chat_id))
        chat__send_error(ss, "forbidden", "the new token does not allow this chat", NULL, 0);
    else {
        ss->token_exp = chat__exp32(cl.exp);
        sbuf_t sb = {0};
        sbuf_puts(&sb, "{\"event\":\"token:refreshed\",\"exp\":");
        if (cl.exp) sbuf_printf(&sb, "%" PRId64 "}", cl.exp);
        else sbuf_puts(&sb, "null}");
        chat__send_json(ss, &sb);
        sbuf_free(&sb);
    }
    jwt_claims_free(&cl);
}

void chat_session_check_expiry(session_t *ss, int64_t now) {
    if (ss->token_exp && now >= (int64_t)ss->token_exp) {
        log_info("token_expired user=%s", LOG_STR(ss->user));
        chat_session_close(ss, CHAT_CLOSE_TOKEN_EXPIRED, "token expired");
    }
}

/* A read position of this session was stored (read.c answered it): its flow control. */
static void chat__read_reply(op_t *op, const sbuf_t *ev) {
    session_t *ss = (session_t *)op->origin;
    if (ss->peer.conn) chat__flow(ss);
}

static int chat__on_message(void *ud, int opcode, uint8_t *data, size_t len) {
    session_t *ss = ud;
    chat_server_t *s = ss->peer.srv;
    if (opcode != WS_OP_TEXT) {
        chat_session_close(ss, WS_CLOSE_UNSUPPORTED, "binary messages are not supported");
        return 1;
    }
    proto_cmd_t cmd;
    int rc =
        proto_decode(data, len,
                     (1u << PROTO_MESSAGE) | (1u << PROTO_EDIT) | (1u << PROTO_DELETE) |
                         (1u << PROTO_PING) | (1u << PROTO_TOKEN_REFRESH) | (1u << PROTO_READ) |
                         (1u << PROTO_TYPING) | (1u << PROTO_PRESENCE_GET),
                     &cmd);
    if (rc == CHAT_EINVAL) {
        chat_session_close(ss, WS_CLOSE_INVALID_DATA, "message is not a JSON object");
        return 1;
    }
    if (rc == CHAT_EPROTO) {
        chat__send_error(ss, "bad_request", cmd.error, cmd.client_id, cmd.message_id);
        proto_cmd_free(&cmd);
        return 0;
    }
    if (cmd.kind == PROTO_PING) {
        static const char pong[] = "{\"event\":\"pong\"}";
        buf_t *f = ws_frame_new(WS_OP_TEXT, pong, sizeof pong - 1);
        if (f) chat__send(ss, f);
        buf_unref(f);
        proto_cmd_free(&cmd);
        return conn_is_closing(ss->peer.conn) ? 1 : 0;
    }
    if (cmd.kind == PROTO_TOKEN_REFRESH) {
        chat__token_refresh(ss, &cmd);
        proto_cmd_free(&cmd);
        return conn_is_closing(ss->peer.conn) ? 1 : 0;
    }
    if (cmd.kind == PROTO_READ) { /* read.c; not a send: --rate-limit does not count it */
        if (chat_read_submit(s, ss, &cmd, chat__read_reply) < 0) {
            chat__send_error(ss, "store_unavailable", "the read position could not be stored", NULL,
                             cmd.message_id);
            proto_cmd_free(&cmd);
        }
        return conn_is_closing(ss->peer.conn) ? 1 : 0;
    }
    if (cmd.kind == PROTO_PRESENCE_GET) {
        chat_presence_get(s, ss);
        proto_cmd_free(&cmd);
        return conn_is_closing(ss->peer.conn) ? 1 : 0;
    }
    /* a typing within TYPING_EVERY_MS of the last one forwarded is dropped silently, before
     * the rate limit: only what goes out counts as a send */
    if (cmd.kind == PROTO_TYPING && !chat_presence_typing_due(s, ss)) {
        proto_cmd_free(&cmd);
        return 0;
    }
    sbuf_t limited = {0};
    if (rate_admit_cmd(s, ss->user, &cmd, &limited)) { /* over --rate-limit: nothing stored */
        chat__send_json(ss, &limited);
        sbuf_free(&limited);
        proto_cmd_free(&cmd);
        return conn_is_closing(ss->peer.conn) ? 1 : 0;
    }
    if (cmd.kind == PROTO_TYPING) {
        chat_presence_typing(s, ss);
        proto_cmd_free(&cmd);
        return conn_is_closing(ss->peer.conn) ? 1 : 0;
    }
    size_t cost = chat__echo_cost(&cmd);
    rc = chat_submit(s, &ss->peer, chat__reply, false, ss->n_new, ss->member.room->chat_id,
                     ss->user, &cmd);
    if (rc == 0) ss->inflight += cost;
    if (rc < 0) {
        chat__send_error(ss, "store_unavailable",
                         rc == CHAT_ECLOSED ? "the server is shutting down"
                                            : "the message could not be queued",
                         cmd.client_id, 0);
        proto_cmd_free(&cmd);
    }
    return conn_is_closing(ss->peer.conn) ? 1 : 0;
}

static int chat__on_control(void *ud, int opcode, uint16_t code, uint8_t *data, size_t len) {
    session_t *ss = ud;
    conn_t *c = ss->peer.conn;
    if (opcode == WS_OP_PING) {
        buf_t *pong = ws_frame_new(WS_OP_PONG, data, len);
        if (pong) chat__send(ss, pong);
        buf_unref(pong);
        return conn_is_closing(c) ? 1 : 0;
    }
    if (opcode == WS_OP_PONG) return 0; /* any traffic already cleared ping_sent */
    /* CLOSE: echo the peer's code (RFC 6455 5.5.1), then close our side. */
    ss->close_code = code == WS_CLOSE_NO_STATUS ? WS_CLOSE_NO_STATUS : code;
    buf_t *f = ws_close_frame_new(code == WS_CLOSE_NO_STATUS ? 0 : code, NULL);
    if (f) conn_send_force(c, f);
    buf_unref(f);
    conn_close(c);
    return 1;
}

static const ws_parser_cb_t chat__ws_cb = {
    .on_message = chat__on_message,
    .on_control = chat__on_control,
};

static void chat__ws_read(conn_t *c, uint8_t *data, size_t len) {
    session_t *ss = conn_ctx(c);
    ss->peer.last_rx = uv_now(ss->peer.srv->loop);
    ss->ping_sent = 0;
    int rc = ws_parser_feed(&ss->parser, data, len);
    if (rc < 0 && rc != CHAT_ECLOSED) {
        log_info("ws_protocol_error user=%s code=%u reason=%s", LOG_STR(ss->user),
                 ss->parser.error_code, LOG_STR(ss->parser.error_reason));
        chat_session_close(ss, ss->parser.error_code,
                           ss->parser.error_reason ? ss->parser.error_reason : "");
    }
    chat__flow(ss);
}

static void chat__backlog_free(session_t *ss);

static void chat__ws_close(conn_t *c) {
    session_t *ss = conn_ctx(c);
    chat_server_t *s = ss->peer.srv;
    chat_presence_close(s, ss);
    room_leave(&s->rooms, &ss->member);
    held_clear(&ss->held);
    chat__backlog_free(ss);
    free(ss->cursors);
    ss->cursors = NULL;
    free(ss->replayed);
    ss->replayed = NULL;
    s->n_sessions--;
    chat_record_close(s, ss->close_code ? ss->close_code : WS_CLOSE_ABNORMAL);
    chat_peer_unlink(&ss->peer);
}

static void chat__ws_drain(conn_t *c);

const conn_handler_t chat_ws_handler = {
    .on_read = chat__ws_read,
    .on_close = chat__ws_close,
    .on_drain = chat__ws_drain,
};

/* ---- resume: the backlog of a ?since= connection ------------------------------------------
 *
 * Read in pages and sent as the socket drains: a backlog of any size within --replay-limit
 * arrives, however small the connection's outbound limit. Live events wait in the held
 * queue meanwhile and follow the backlog, less what it already sent.
 *
 * The read window, for the list form: from IN_FLIGHT_MS before the NEWEST cursor, never
 * earlier. The client received that message, so it was connected then, and anything stored
 * IN_FLIGHT_MS before it had reached it (a publish trails its commit by less). An older
 * cursor only means that its origin has been quiet, so reading from it would read the whole
 * busy chat since. Only what will be sent counts against --replay-limit. */
#define REPLAYED_KEEP_MS 60000
/* pages of one resume at most: the rows skipped (at or below their origin's cursor) lie in
 * the window's IN_FLIGHT_MS, so this is only a guard */
#define REPLAY_MAX_PAGES 4096

/* The cursor for the origin node of id: the client has everything from that node up to
 * it. The one-id form stands for every origin; an origin the list does not name gets
 * unknown (the window's start). */
static uint64_t chat__cursor_for(const session_t *ss, uint64_t id, uint64_t unknown) {
    if (ss->cursor_single) return ss->cursors[0];
    bool named = false;
    uint64_t best = 0;
    for (uint16_t i = 0; i < ss->n_cursors; i++)
        if (chat__origin(ss->cursors[i]) == chat__origin(id) && ss->cursors[i] >= best) {
            best = ss->cursors[i];
            named = true;
        }
    return named ? best : unknown;
}

static void chat__backlog_free(session_t *ss) {
    for (size_t i = ss->backlog_next; i < ss->n_backlog; i++) store_msg_clear(&ss->backlog[i]);
    free(ss->backlog);
    free(ss->backlog_state);
    ss->backlog = NULL;
    ss->backlog_state = NULL;
    ss->n_backlog = ss->backlog_cap = ss->backlog_next = ss->backlog_bytes = 0;
    ss->backlog_spilled = false;
    buf_unref(ss->replay_frame);
    ss->replay_frame = NULL;
}

/* What a loaded message costs, roughly (its text dominates). */
static size_t chat__msg_cost(const store_msg_t *m) {
    return (m->message ? strlen(m->message) : 0) + 256;
}

/* Bytes of backlog messages a resuming session keeps loaded at a time: half the outbound
 * limit, as much as its queue holds while it replays. */
static size_t chat__backlog_budget(const chat_server_t *s) { return s->cfg.max_outbound_bytes / 2; }

static int chat__replay_submit(session_t *ss, uint64_t after, int limit, store_cb cb);

/* Rows per read: a read brings whole messages, so a few at a time bounds what one resume
 * holds (64 of the largest is 4 MiB); one more than may be sent tells "too many". */
#define REPLAY_PAGE_ROWS 64
static int chat__count_limit(const chat_server_t *s) {
    return s->cfg.replay_limit + 1 < REPLAY_PAGE_ROWS ? (int)s->cfg.replay_limit + 1
                                                      : REPLAY_PAGE_ROWS;
}
static void chat__replay_load_done(store_req_t *req);

/* The resume cannot complete: say so and close (1011), so the client resumes again with
 * the same cursors instead of missing what was held or not read. */
static void chat__replay_fail(session_t *ss, const char *detail) {
    chat__send_error(ss, "store_unavailable", detail, NULL, 0);
    chat_session_close(ss, WS_CLOSE_INTERNAL, "missed messages could not be read; resume");
}

/* A read of the backlog failed (the first pages or a reload of entries kept as ids). */
static void chat__replay_read_failed(session_t *ss, const op_t *op, int status) {
    ss->peer.srv->m.store_errors++;
    log_error("replay_read_failed user=%s chat=%s error=%s", LOG_STR(ss->user), op->chat_id,
              chat_strerror(status));
    chat__replay_fail(ss, "the missed messages could not be read; resume again");
}

/* Send the backlog, then the held live events, while the queue stays under half the
 * outbound limit; the rest when it drains (chat__ws_drain). */
static void chat__replay_pump(session_t *ss) {
    chat_server_t *s = ss->peer.srv;
    conn_t *c = ss->peer.conn;
    if (!c || conn_is_closing(c) || !ss->replaying) return;
    size_t high = s->cfg.max_outbound_bytes / 2;
    if (ss->n_backlog && !ss->replayed && !ss->n_replayed) {
        ss->replayed = malloc(sizeof(uint64_t) * ss->n_backlog);
        ss->replayed_until = uv_now(s->loop) + REPLAYED_KEEP_MS;
    }
    for (;;) {
        buf_t *f = ss->replay_frame;
        ss->replay_frame = NULL;
        if (!f && ss->backlog_next < ss->n_backlog && ss->backlog_state[ss->backlog_next] == 2) {
            ss->backlog_next++; /* gone from the store meanwhile */
            continue;
        }
        if (!f && ss->backlog_next < ss->n_backlog && ss->backlog_state[ss->backlog_next] == 0) {
            /* the next ones were kept as ids only: read them again, a budget at a time */
            if (ss->backlog_reading) return;
            uint64_t id = ss->backlog[ss->backlog_next].id;
            if (chat__replay_submit(ss, id - 1, REPLAY_PAGE_ROWS, chat__replay_load_done) < 0) {
                chat__replay_fail(ss, "the missed messages could not be read; resume again");
                return;
            }
            ss->backlog_reading = true;
            return;
        }
        if (!f && ss->backlog_next < ss->n_backlog) {
            store_msg_t *m = &ss->backlog[ss->backlog_next++];
            ss->backlog_bytes -= chat__msg_cost(m);
            sbuf_t ev = {0};
            proto_put_msg(&ev, m->deleted_at ? "message:delete" : "message:message", m);
            f = ev.oom ? NULL : chat__frame(ss, ev.p, ev.len);
            sbuf_free(&ev);
            if (ss->replayed) ss->replayed[ss->n_replayed++] = m->id;
            store_msg_clear(m);
            if (!f) {
                chat__replay_fail(ss, "out of memory while sending the missed messages");
                return;
            }
        } else if (!f && ss->held.head) {
            held_event_t *h = held_pop(&ss->held);
            /* held before the backlog was read, the backlog may have sent it already */
            if (!(h->is_new && chat__client_has(ss, h->id))) f = buf_ref(h->frame);
            held_free_one(h);
            if (!f) continue;
        } else if (!f) {
            break;
        }
        if (conn_queued(c) > 0 && conn_queued(c) + f->len > high) {
            ss->replay_frame = f; /* the next one, once the queue drained */
            conn_notify_drain(c, high / 2);
            return;
        }
        int rc = chat__send(ss, f);
        buf_unref(f);
        if (rc < 0) return;
    }
    ss->replaying = false; /* live from here on */
    chat__backlog_free(ss);
}

/* The queue drained to a mark one of two parties asked for: the replay (send on) and the
 * flow control of a fast sender (read again). Each re-arms if it still waits; the conn
 * keeps the lower of their marks. */
static void chat__ws_drain(conn_t *c) {
    session_t *ss = conn_ctx(c);
    if (ss->replaying && !ss->backlog_reading &&
        (ss->replay_frame || ss->backlog_next < ss->n_backlog || ss->held.head))
        chat__replay_pump(ss);
    if (ss->peer.conn) chat__flow(ss);
}

/* Messages read again for entries kept as ids: load them (the first one whatever its size,
 * then up to the budget), mark those the store no longer has, and send on. */
static void chat__replay_load_done(store_req_t *req) {
    op_t *op = req->data;
    session_t *ss = (session_t *)op->origin;
    chat_server_t *s = op->srv;
    chat_record_latency(s, op->t0);
    ss->backlog_reading = false;
    if (!ss->peer.conn || conn_is_closing(ss->peer.conn) || !ss->backlog) {
        /* gone, or closed meanwhile */
    } else if (req->status < 0) {
        chat__replay_read_failed(ss, op, req->status);
    } else {
        size_t j = ss->backlog_next, budget = chat__backlog_budget(s);
        bool full = false;
        for (size_t i = 0; i < req->n_msgs && j < ss->n_backlog && !full; i++) {
            store_msg_t *m = &req->msgs[i];
            while (j < ss->n_backlog && ss->backlog[j].id < m->id) {
                if (ss->backlog_state[j] == 0) ss->backlog_state[j] = 2; /* not stored */
                j++;
            }
            if (j == ss->n_backlog || ss->backlog[j].id != m->id) continue; /* not to send */
            if (j > ss->backlog_next && ss->backlog_bytes + chat__msg_cost(m) > budget) {
                full = true;
                break;
            }
            if (ss->backlog_state[j] == 0) {
                ss->backlog_bytes += chat__msg_cost(m);
                ss->backlog[j] = *m; /* moved */
                memset(m, 0, sizeof(*m));
                ss->backlog_state[j] = 1;
            }
            j++;
        }
        /* the store's end: what it did not return is not stored any more */
        if (!full && req->n_msgs < (size_t)req->limit)
            for (; j < ss->n_backlog; j++)
                if (ss->backlog_state[j] == 0) ss->backlog_state[j] = 2;
        chat__replay_pump(ss);
    }
    store_req_cleanup(req);
    chat_peer_unref(&ss->peer);
    free(op);
}

static void chat__replay_page_done(store_req_t *req);

/* Read limit messages after `after` for the backlog; cb completes it. */
static int chat__replay_submit(session_t *ss, uint64_t after, int limit, store_cb cb) {
    chat_server_t *s = ss->peer.srv;
    op_t *op = calloc(1, sizeof(*op));
    if (!op) return CHAT_ENOMEM;
    if (limit > STORE_READ_MAX) limit = STORE_READ_MAX;
    op->srv = s;
    op->origin = &ss->peer;
    snprintf(op->chat_id, sizeof op->chat_id, "%s", ss->member.room->chat_id);
    op->req.op = STORE_AFTER;
    op->req.chat_id = op->chat_id;
    op->req.id = after;
    op->req.limit = limit;
    op->req.data = op;
    op->req.cb = cb;
    op->t0 = uv_hrtime();
    int rc = store_submit(s->store, &op->req);
    if (rc < 0) {
        free(op);
        return rc;
    }
    ss->peer.refs++;
    return 0;
}

/* A page of the backlog arrived: keep what the cursors say was missed; read on, answer
 * replay_too_large, or start sending. */
static void chat__replay_page_done(store_req_t *req) {
    op_t *op = req->data;
    session_t *ss = (session_t *)op->origin;
    chat_server_t *s = op->srv;
    chat_record_latency(s, op->t0);
    if (!ss->peer.conn || conn_is_closing(ss->peer.conn)) {
        /* gone: chat__ws_close freed the rest */
    } else if (req->status < 0) {
        chat__replay_read_failed(ss, op, req->status);
    } else {
        uint64_t last = req->id;
        bool too_large = false, oom = false;
        for (size_t i = 0; i < req->n_msgs && !too_large && !oom; i++) {
            store_msg_t *m = &req->msgs[i];
            last = m->id;
            if (m->id <= chat__cursor_for(ss, m->id, ss->replay_from)) continue; /* it has it */
            if (ss->n_backlog >= s->cfg.replay_limit) {
                too_large = true;
                break;
            }
            if (ss->n_backlog == ss->backlog_cap) {
                size_t ncap = ss->backlog_cap ? ss->backlog_cap * 2 : 64;
                store_msg_t *nb = realloc(ss->backlog, sizeof(*nb) * ncap);
                if (nb) ss->backlog = nb;
                uint8_t *ns = nb ? realloc(ss->backlog_state, ncap) : NULL;
                if (!ns) {
                    oom = true;
                    break;
                }
                ss->backlog_state = ns;
                ss->backlog_cap = ncap;
            }
            size_t cost = chat__msg_cost(m);
            if (!ss->backlog_spilled && ss->backlog_bytes + cost <= chat__backlog_budget(s)) {
                ss->backlog_bytes += cost;
                ss->backlog[ss->n_backlog] = *m; /* moved: the request no longer owns it */
                memset(m, 0, sizeof(*m));
                ss->backlog_state[ss->n_backlog++] = 1;
            } else {
                /* past the budget: its id only; the sending reads it again */
                ss->backlog_spilled = true;
                memset(&ss->backlog[ss->n_backlog], 0, sizeof(store_msg_t));
                ss->backlog[ss->n_backlog].id = m->id;
                ss->backlog_state[ss->n_backlog++] = 0;
            }
        }
        bool more = !too_large && req->n_msgs == (size_t)req->limit;
        if (more && ++ss->replay_pages >= REPLAY_MAX_PAGES) too_large = true;
        if (oom) {
            chat__replay_fail(ss, "out of memory while reading the missed messages");
        } else if (too_large) {
            /* Too much to push down one socket: the client pages the REST API instead and
             * gets live events from now on. */
            chat__backlog_free(ss);
            chat__send_error(ss, "replay_too_large",
                             "too many missed messages: page GET /api/chats/{chat_id}/messages",
                             NULL, 0);
            chat__replay_pump(ss);
        } else if (more) {
            if (chat__replay_submit(ss, last, chat__count_limit(s), chat__replay_page_done) < 0)
                chat__replay_fail(ss, "the missed messages could not be read; resume again");
        } else {
            chat__replay_pump(ss);
        }
    }
    store_req_cleanup(req);
    chat_peer_unref(&ss->peer);
    free(op);
}

/* Read the backlog. Called once the room's subscription is active (or the bus is down:
 * then the catch-up after its return covers the rest), so that nothing published
 * meanwhile falls between the store read and the live stream. */
static void chat__replay_read(session_t *ss) {
    ss->replay_waiting = false;
    uint64_t from = ss->cursors[0];
    if (!ss->cursor_single) {
        for (uint16_t i = 1; i < ss->n_cursors; i++)
            if (ss->cursors[i] > from) from = ss->cursors[i];
        uint64_t margin = (uint64_t)IN_FLIGHT_MS << 22;
        from = from > margin ? from - margin : 0;
    }
    ss->replay_from = from;
    if (chat__replay_submit(ss, from, chat__count_limit(ss->peer.srv), chat__replay_page_done) < 0)
        chat__replay_fail(ss, "the missed messages could not be read; resume again");
}

static void chat__replay_start(session_t *ss, const uint64_t *since, size_t n) {
    chat_server_t *s = ss->peer.srv;
    ss->cursors = malloc(sizeof(uint64_t) * n);
    if (!ss->cursors) {
        chat_session_close(ss, WS_CLOSE_INTERNAL, "out of memory");
        return;
    }
    memcpy(ss->cursors, since, sizeof(uint64_t) * n);
    ss->n_cursors = (uint16_t)n;
    ss->cursor_single = n == 1;
    ss->replaying = true; /* live events are held from now on */
    if (ss->member.room->subscribed || !s->bus_up) chat__replay_read(ss);
    else ss->replay_waiting = true;
}

void chat_session_subscribed(session_t *ss) {
    if (ss->replay_waiting && ss->peer.conn && !conn_is_closing(ss->peer.conn))
        chat__replay_read(ss);
}

void chat_session_start(chat_server_t *s, conn_t *c, const char *chat_id, const char *user,
                        int64_t token_exp, const uint64_t *since, size_t n_since, bool deflate,
                        bool presence, const uint8_t *rest, size_t rest_len) {
    session_t *ss = calloc(1, sizeof(*ss));
    if (!ss) {
        conn_abort(c);
        return;
    }
    chat_peer_link(s, &ss->peer, PEER_WS, c);
    ws_parser_init(&ss->parser, &chat__ws_cb, ss);
    ss->parser.max_message = s->cfg.max_message_bytes;
    if (deflate && s->zip) {
        ss->parser.zip = s->zip;
        s->m.ws_deflate++;
    }
    snprintf(ss->user, sizeof ss->user, "%s", user);
    ss->token_exp = chat__exp32(token_exp);
    ss->presence = presence;
    conn_set_handler(c, &chat_ws_handler, ss);
    s->n_sessions++;
    s->m.ws_opened++;
    /* Join before reading the backlog: an event stored meanwhile is then either in the
     * backlog or held as live, never in neither. */
    if (room_join(&s->rooms, &ss->member, chat_id) < 0) {
        chat_session_close(ss, WS_CLOSE_INTERNAL, "out of memory");
        return;
    }
    chat_presence_open(s, ss);
    if (n_since) chat__replay_start(ss, since, n_since);
    if (rest_len) {
        /* Frames that came with the handshake: the parser unmasks in place, so copy. */
        uint8_t *copy = malloc(rest_len);
        if (!copy) {
            chat_session_close(ss, WS_CLOSE_INTERNAL, "out of memory");
            return;
        }
        memcpy(copy, rest, rest_len);
        chat__ws_read(c, copy, rest_len);
        free(copy);
    }
}

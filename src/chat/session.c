/* session: one WebSocket member of one chat, and the path of a command through the store.
 *
 * The one idea: durable before delivery. A command becomes a store request; only its
 * completion (on the loop thread, after the store made it durable) encodes the event,
 * once, and queues the same frame to every member of the room, the sender included: the
 * sender's copy is its acknowledgement. A session that goes away while its request is in
 * flight stays allocated (refcounted) until the completion has run.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "chat_internal.h"

static int chat__send(session_t *ss, buf_t *b) {
    conn_t *c = ss->peer.conn;
    if (!c || conn_is_closing(c)) return CHAT_ECLOSED;
    int rc = conn_send(c, b);
    if (rc == CHAT_EBUSY) {
        log_warn("slow_consumer user=%s queued=%zu", ss->user, c->q_bytes);
        ss->close_code = WS_CLOSE_POLICY;
        conn_abort(c);
    }
    return rc;
}

static void chat__send_json(session_t *ss, const sbuf_t *sb) {
    if (sb->oom) return;
    buf_t *f = ws_frame_new(WS_OP_TEXT, sb->p, sb->len);
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

void chat_session_close(session_t *ss, uint16_t code, const char *reason) {
    conn_t *c = ss->peer.conn;
    if (!c || conn_is_closing(c)) return;
    ss->close_code = code;
    buf_t *f = ws_close_frame_new(code, reason);
    if (f) conn_send_force(c, f);
    buf_unref(f);
    conn_close(c);
}

/* ---- commands through the store ------------------------------------------------------- */

static const char *chat__event_name(store_op_t op) {
    return op == STORE_EDIT ? "message:edit" : op == STORE_DELETE ? "message:delete"
                                                                   : "message:message";
}

static void chat__op_done(store_req_t *req) {
    op_t *op = req->data;
    chat_server_t *s = op->srv;
    chat_record_latency(s, op->t0);
    sbuf_t ev = {0};
    if (req->status == 0) {
        proto_put_msg(&ev, chat__event_name(req->op), &req->msg);
        if (!req->duplicate && !ev.oom) {
            /* Durable now: deliver to this node's members and to the other nodes. */
            room_t *r = chat_room_find(s, op->chat_id);
            buf_t *frame = ws_frame_new(WS_OP_TEXT, ev.p, ev.len);
            if (frame && r) chat_room_broadcast(s, r, frame);
            if (bus_publish(s->bus, op->chat_id, ev.p, ev.len) < 0)
                log_warn("bus_publish_failed chat=%s id=%" PRIu64, op->chat_id, req->msg.id);
            buf_unref(frame);
        }
    } else if (req->status != CHAT_ENOTFOUND && req->status != CHAT_EPERM) {
        s->m.store_errors++;
        log_error("store_failed op=%d chat=%s error=%s", (int)req->op, op->chat_id,
                  chat_strerror(req->status));
    }

    if (op->rest) {
        chat_rest_complete(op, &ev);
    } else if (op->origin->conn) {
        session_t *ss = (session_t *)op->origin;
        if (req->status == 0) {
            /* A duplicate is answered to its sender only: the others saw it the first time. */
            if (req->duplicate) chat__send_json(ss, &ev);
        } else if (req->status == CHAT_ENOTFOUND) {
            chat__send_error(ss, "not_found", "no such message in this chat", NULL, req->id);
        } else if (req->status == CHAT_EPERM) {
            chat__send_error(ss, "not_author", "only the author may change a message", NULL,
                             req->id);
        } else {
            chat__send_error(ss, "store_unavailable",
                             "the message could not be stored; it was not delivered",
                             op->cmd.client_id, req->op == STORE_APPEND ? 0 : req->id);
        }
    }
    sbuf_free(&ev);
    store_req_cleanup(req);
    proto_cmd_free(&op->cmd);
    chat_peer_unref(op->origin);
    free(op);
}

int chat_submit(chat_server_t *s, peer_t *origin, bool rest, bool keep_alive,
                const char *chat_id, const char *user, proto_cmd_t *cmd) {
    op_t *op = calloc(1, sizeof(*op));
    if (!op) return CHAT_ENOMEM;
    op->srv = s;
    op->origin = origin;
    op->rest = rest;
    op->keep_alive = keep_alive;
    op->cmd = *cmd;
    memset(cmd, 0, sizeof(*cmd)); /* the op owns the JSON now */
    snprintf(op->chat_id, sizeof op->chat_id, "%s", chat_id);
    snprintf(op->user, sizeof op->user, "%s", user);
    store_req_t *r = &op->req;
    r->chat_id = op->chat_id;
    r->user = op->user;
    r->data = op;
    r->cb = chat__op_done;
    switch (op->cmd.kind) {
    case PROTO_MESSAGE:
        r->op = STORE_APPEND;
        r->text = op->cmd.message;
        r->client_id = op->cmd.client_id;
        r->id = id_next(&s->ids, &r->at);
        break;
    case PROTO_EDIT:
        r->op = STORE_EDIT;
        r->text = op->cmd.message;
        r->id = op->cmd.message_id;
        r->at = time_now_ms();
        break;
    default:
        r->op = STORE_DELETE;
        r->id = op->cmd.message_id;
        r->at = time_now_ms();
        break;
    }
    op->t0 = uv_hrtime();
    s->m.messages_in++;
    int rc = store_submit(s->store, r);
    if (rc < 0) {
        /* the callback will not run: give the JSON back so the caller can name it */
        *cmd = op->cmd;
        free(op);
        return rc;
    }
    origin->refs++;
    return 0;
}

/* ---- the WebSocket side --------------------------------------------------------------- */

static int chat__on_message(void *ud, int opcode, uint8_t *data, size_t len) {
    session_t *ss = ud;
    chat_server_t *s = ss->peer.srv;
    if (opcode != WS_OP_TEXT) {
        chat_session_close(ss, WS_CLOSE_UNSUPPORTED, "binary messages are not supported");
        return 1;
    }
    proto_cmd_t cmd;
    int rc = proto_decode(data, len, (1u << PROTO_MESSAGE) | (1u << PROTO_EDIT) |
                                         (1u << PROTO_DELETE), &cmd);
    if (rc == CHAT_EINVAL) {
        chat_session_close(ss, WS_CLOSE_INVALID_DATA, "message is not a JSON object");
        return 1;
    }
    if (rc == CHAT_EPROTO) {
        chat__send_error(ss, "bad_request", cmd.error, cmd.client_id, cmd.message_id);
        proto_cmd_free(&cmd);
        return 0;
    }
    rc = chat_submit(s, &ss->peer, false, false, ss->room->chat_id, ss->user, &cmd);
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
    session_t *ss = c->ctx;
    ss->peer.last_rx = uv_now(ss->peer.srv->loop);
    ss->ping_sent = 0;
    int rc = ws_parser_feed(&ss->parser, data, len);
    if (rc < 0 && rc != CHAT_ECLOSED) {
        log_info("ws_protocol_error user=%s code=%u reason=\"%s\"", ss->user,
                 ss->parser.error_code, ss->parser.error_reason ? ss->parser.error_reason : "");
        chat_session_close(ss, ss->parser.error_code,
                           ss->parser.error_reason ? ss->parser.error_reason : "");
    }
}

static void chat__ws_close(conn_t *c) {
    session_t *ss = c->ctx;
    chat_server_t *s = ss->peer.srv;
    chat_room_leave(s, ss);
    s->n_sessions--;
    chat_record_close(s, ss->close_code ? ss->close_code : WS_CLOSE_ABNORMAL);
    chat_peer_unlink(&ss->peer);
}

const conn_handler_t chat_ws_handler = {
    .on_read = chat__ws_read,
    .on_close = chat__ws_close,
};

void chat_session_start(chat_server_t *s, conn_t *c, const char *chat_id, const char *user,
                        const uint8_t *rest, size_t rest_len) {
    session_t *ss = calloc(1, sizeof(*ss));
    if (!ss) {
        conn_abort(c);
        return;
    }
    chat_peer_link(s, &ss->peer, PEER_WS, c);
    ws_parser_init(&ss->parser, &chat__ws_cb, ss);
    ss->parser.max_message = s->cfg.max_message_bytes;
    snprintf(ss->user, sizeof ss->user, "%s", user);
    conn_set_handler(c, &chat_ws_handler, ss);
    s->n_sessions++;
    s->m.ws_opened++;
    if (chat_room_join(s, ss, chat_id) < 0) {
        chat_session_close(ss, WS_CLOSE_INTERNAL, "out of memory");
        return;
    }
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

/* read: read positions. {"event":"read","message_id":..} from a member stores the newest
 * message id that user has read in the chat (STORE_READ_SET, monotonic in the store), and
 * the user's connections to the chat, on every node, learn the new position so that a
 * second tab clears its badge.
 *
 * The one idea: a position is the user's own business. Its event travels on the chat's bus
 * channel like every other event (one subscription per node per chat), but each node hands
 * it only to the connections of the user it names, never to the other members. It is not a
 * message: no room filter, no replay, and a client that missed it asks
 * GET /api/chats/{chat_id}/read.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "chat/command.h"

/* What a read costs against the flow control of a fast sender (chat__flow in session.c):
 * its event, a hundred bytes or so plus the ids. */
#define READ_ECHO_COST 512

static bool read__is_user(const room_member_t *m, const void *user) {
    return strcmp(chat_session_of((room_member_t *)m)->user, user) == 0;
}

/* Queue frame to the connections of user in room r; returns how many took it. */
static size_t read__deliver(chat_server_t *s, room_t *r, const char *user, buf_t *frame,
                            uint64_t id) {
    return room_deliver_frame(&s->rooms, r, frame, false, id, read__is_user, user);
}

static void read__send(session_t *ss, const sbuf_t *sb) {
    conn_t *c = ss->peer.conn;
    if (sb->oom || !c || conn_is_closing(c)) return;
    buf_t *frame = ws_frame_new(WS_OP_TEXT, sb->p, sb->len);
    if (frame) room_deliver_one(&ss->peer.srv->rooms, &ss->member, frame);
    buf_unref(frame);
}

static void read__error(session_t *ss, const char *code, const char *detail, uint64_t id) {
    sbuf_t sb = {0};
    proto_put_error(&sb, code, detail, NULL, id);
    read__send(ss, &sb);
    sbuf_free(&sb);
}

static void read__done(store_req_t *req) {
    op_t *op = req->data;
    chat_server_t *s = op->srv;
    session_t *ss = (session_t *)op->origin;
    chat_record_latency(s, op->t0);
    ss->inflight = ss->inflight > READ_ECHO_COST ? ss->inflight - READ_ECHO_COST : 0;
    sbuf_t ev = {0};
    if (req->status == 0) {
        proto_put_read(&ev, op->chat_id, op->user, req->read_id);
        if (ev.oom) {
            /* stored; the tabs learn it at their next GET .../read */
        } else if (req->read_moved) {
            /* Every connection of the user, this one included (its acknowledgement), here
             * and on the other nodes. */
            room_t *r = room_find(&s->rooms, op->chat_id);
            buf_t *frame = ws_frame_new(WS_OP_TEXT, ev.p, ev.len);
            if (frame && r) read__deliver(s, r, op->user, frame, req->read_id);
            buf_unref(frame);
            if (bus_publish(s->bus, op->chat_id, ev.p, ev.len) < 0)
                log_warn("bus_publish_failed chat=%s read=%" PRIu64, op->chat_id, req->read_id);
        } else if (ss->peer.conn) {
            /* an older id (a stale tab): the position stays; the sender alone learns where
             * it is, the other tabs have nothing new to hear */
            read__send(ss, &ev);
        }
    } else if (ss->peer.conn) {
        if (req->status == CHAT_ENOTFOUND) {
            read__error(ss, "not_found", "no such message in this chat", req->id);
        } else {
            s->m.store_errors++;
            log_error("store_failed op=read chat=%s error=%s", op->chat_id,
                      chat_strerror(req->status));
            read__error(ss, "store_unavailable", "the read position could not be stored", req->id);
        }
    }
    op->reply(op, &ev); /* the session's flow control */
    sbuf_free(&ev);
    store_req_cleanup(req);
    proto_cmd_free(&op->cmd);
    chat_peer_unref(op->origin);
    free(op);
}

int chat_read_submit(chat_server_t *s, session_t *ss, proto_cmd_t *cmd, op_reply_fn reply) {
    op_t *op = calloc(1, sizeof(*op));
    if (!op) return CHAT_ENOMEM;
    op->srv = s;
    op->origin = &ss->peer;
    op->reply = reply;
    snprintf(op->chat_id, sizeof op->chat_id, "%s", ss->member.room->chat_id);
    snprintf(op->user, sizeof op->user, "%s", ss->user);
    op->req.op = STORE_READ_SET;
    op->req.chat_id = op->chat_id;
    op->req.user = op->user;
    op->req.id = cmd->message_id;
    op->req.at = time_now_ms();
    op->req.data = op;
    op->req.cb = read__done;
    op->t0 = uv_hrtime();
    int rc = store_submit(s->store, &op->req);
    if (rc < 0) {
        free(op);
        return rc;
    }
    op->cmd = *cmd;
    memset(cmd, 0, sizeof(*cmd)); /* the op owns the JSON now */
    ss->peer.refs++;
    ss->inflight += READ_ECHO_COST;
    return 0;
}

bool chat_read_from_bus(chat_server_t *s, room_t *r, const uint8_t *p, size_t n) {
    static const char ev[] = "{\"event\":\"read\"";
    if (n < sizeof ev - 1 || memcmp(p, ev, sizeof ev - 1) != 0) return false;
    json_t *root = json_loadb((const char *)p, n, 0, NULL);
    json_t *u = json_object_get(root, "user_from"), *id = json_object_get(root, "message_id");
    uint64_t mid = 0;
    if (!json_is_string(u) || !json_is_string(id) ||
        id_parse(json_string_value(id), json_string_length(id), &mid) < 0) {
        log_warn("bus_bad_event chat=%s len=%zu (read)", r->chat_id, n);
    } else {
        buf_t *frame = ws_frame_new(WS_OP_TEXT, p, n);
        if (frame) read__deliver(s, r, json_string_value(u), frame, mid);
        buf_unref(frame);
    }
    json_decref(root);
    return true;
}

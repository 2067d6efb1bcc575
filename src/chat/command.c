/* command: the path of a message, edit or delete through the store (command.h).
 *
 * The one idea: durable before delivery. A command becomes a store request; only its
 * completion (on the loop thread, after the store made it durable) encodes the event,
 * once, and queues the same frame to every member of the room, the sender included: the
 * sender's copy is its acknowledgement. The origin stays allocated (refcounted) until the
 * completion has run and its caller's reply has answered.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat/command.h"

static const char *command__event_name(store_op_t op) {
    return op == STORE_EDIT     ? "message:edit"
           : op == STORE_DELETE ? "message:delete"
                                : "message:message";
}

static void command__done(store_req_t *req) {
    op_t *op = req->data;
    chat_server_t *s = op->srv;
    chat_record_latency(s, op->t0);
    sbuf_t ev = {0};
    if (req->status == 0) {
        /* a new message as it was encoded before the store (the outbox has the same bytes);
         * a retry's original, or an edit or delete, as stored */
        if (req->event && !req->duplicate && req->msg.id == req->id &&
            req->msg.created_at == req->at) {
            ev = op->ev;
            op->ev = (sbuf_t){0};
        } else {
            proto_put_msg(&ev, command__event_name(req->op), &req->msg);
        }
        if (!ev.oom) {
            /* Durable now: deliver to this node's members and to the other nodes. A retry
             * (duplicate) is delivered again too: the node that stored the original may
             * have died before publishing it, and then nobody but a resuming client would
             * ever see it. Where it was seen, the room's filter and each session's drop
             * it. */
            room_t *r = room_find(&s->rooms, op->chat_id);
            buf_t *frame = r ? ws_frame_new(WS_OP_TEXT, ev.p, ev.len) : NULL;
            if (frame) room_broadcast(&s->rooms, r, frame, req->op == STORE_APPEND, req->msg.id);
            if (bus_publish(s->bus, op->chat_id, ev.p, ev.len) < 0)
                log_warn("bus_publish_failed chat=%s id=%" PRIu64, op->chat_id, req->msg.id);
            buf_unref(frame);
        }
    } else if (req->status != CHAT_ENOTFOUND && req->status != CHAT_EPERM &&
               req->status != CHAT_EBUSY) { /* EBUSY: a full outbox, counted there */
        s->m.store_errors++;
        log_error("store_failed op=%d chat=%s error=%s", (int)req->op, op->chat_id,
                  chat_strerror(req->status));
    }

    op->reply(op, &ev);
    sbuf_free(&ev);
    sbuf_free(&op->ev);
    store_req_cleanup(req);
    proto_cmd_free(&op->cmd);
    chat_peer_unref(op->origin);
    free(op);
}

int chat_submit(chat_server_t *s, peer_t *origin, op_reply_fn reply, bool keep_alive, uint32_t mark,
                const char *chat_id, const char *user, proto_cmd_t *cmd) {
    op_t *op = calloc(1, sizeof(*op));
    if (!op) return CHAT_ENOMEM;
    op->srv = s;
    op->origin = origin;
    op->reply = reply;
    op->mark = mark;
    op->keep_alive = keep_alive;
    op->cmd = *cmd;
    memset(cmd, 0, sizeof(*cmd)); /* the op owns the JSON now */
    snprintf(op->chat_id, sizeof op->chat_id, "%s", chat_id);
    snprintf(op->user, sizeof op->user, "%s", user);
    store_req_t *r = &op->req;
    r->chat_id = op->chat_id;
    r->user = op->user;
    r->data = op;
    r->cb = command__done;
    switch (op->cmd.kind) {
    case PROTO_MESSAGE:
        r->op = STORE_APPEND;
        r->text = op->cmd.message;
        r->client_id = op->cmd.client_id;
        r->id = id_next(&s->ids, &r->at);
        /* Encoded once, here: the store's outbox keeps these bytes and the completion
         * broadcasts them, instead of each encoding the same message again. */
        store_msg_t m = {.id = r->id,
                         .chat_id = op->chat_id,
                         .user_from = op->user,
                         .message = (char *)op->cmd.message, /* only read */
                         .client_id = (char *)op->cmd.client_id,
                         .created_at = r->at};
        proto_put_msg(&op->ev, command__event_name(STORE_APPEND), &m);
        if (!op->ev.oom) {
            r->event = op->ev.p;
            r->event_len = op->ev.len;
        }
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
        sbuf_free(&op->ev);
        free(op);
        return rc;
    }
    origin->refs++;
    return 0;
}

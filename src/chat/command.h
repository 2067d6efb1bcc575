/* command: a store request on behalf of a connection and its completion. A message, edit or
 * delete (chat_submit) is stored, and only its completion (on the loop thread, once the store
 * made it durable) encodes the event once, delivers it to this node's room and publishes it
 * to the other nodes; then the caller's reply callback answers its own client: a session its
 * WebSocket, a REST request its HTTP response. Reads (history, backlog pages, read
 * positions) use the same op_t with their own store callback. */
#ifndef CHAT_COMMAND_H
#define CHAT_COMMAND_H

#include "chat/chat_internal.h"

typedef struct op op_t;

/* The caller's answer to its client, after the delivery: op->req.status says how it went
 * (0: stored, then ev is the encoded event; else ev is empty). Runs once, on the loop thread;
 * op, its cmd and ev are freed after it returns. op->origin may have lost its conn. */
typedef void (*op_reply_fn)(op_t *op, const sbuf_t *ev);

/* A store request with what its completion needs. */
struct op {
    store_req_t req;
    chat_server_t *srv;
    peer_t *origin; /* referenced; its conn may be gone by completion */
    proto_cmd_t cmd;
    uint64_t t0;       /* uv_hrtime() at submit */
    op_reply_fn reply; /* chat_submit's caller */
    uint32_t mark;     /* the caller's, for its reply (a session: its n_new at submit) */
    bool keep_alive;   /* a REST caller's connection stays open after the answer */
    char chat_id[129];
    char user[129];
    sbuf_t ev; /* a message's event, encoded before it is stored (store_req_t.event) */
};

/* Submit a message, edit or delete (cmd->kind PROTO_MESSAGE, _EDIT, _DELETE) by user in
 * chat_id from origin. 0: the op owns cmd (zeroed) and holds a reference to origin until
 * reply has run. < 0: nothing was submitted, cmd is still the caller's. */
int chat_submit(chat_server_t *s, peer_t *origin, op_reply_fn reply, bool keep_alive, uint32_t mark,
                const char *chat_id, const char *user, proto_cmd_t *cmd);

#endif

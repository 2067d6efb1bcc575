/* api_presence: GET /api/chats/{chat_id}/presence, the users online in the chat on any
 * node (the tables and the bus side: presence.c). */
#include <stdlib.h>

#include "api.h"

typedef struct presence_wait {
    http_peer_t *hp; /* referenced until the answer */
    bool keep_alive;
    bool asking; /* inside chat_presence_rest: an answer now is not a resume */
    bool answered;
} presence_wait_t;

static void api__presence_done(void *ud, const sbuf_t *body) {
    presence_wait_t *w = ud;
    http_peer_t *hp = w->hp;
    if (body) http_conn_json(&hp->http, 200, body, w->keep_alive);
    else
        http_conn_error(&hp->http, 503, "bus_unavailable", "presence cannot be read now",
                        w->keep_alive);
    if (w->asking) {
        w->answered = true; /* api_presence finishes it */
        return;
    }
    free(w);
    api_done(hp);
}

void api_presence(http_peer_t *hp, const http_request_t *req, const char *chat_id,
                  const jwt_claims_t *cl) {
    bool ka = req->keep_alive;
    presence_wait_t *w = calloc(1, sizeof(*w));
    if (!w) {
        http_conn_error(&hp->http, 500, "internal", "out of memory", false);
        return;
    }
    w->hp = hp;
    w->keep_alive = ka;
    w->asking = true;
    int rc = chat_presence_rest(hp->peer.srv, chat_id, api__presence_done, w);
    w->asking = false;
    if (rc < 0 || w->answered) {
        if (rc < 0)
            http_conn_error(&hp->http, 503, "bus_unavailable", "presence cannot be read now", ka);
        free(w);
        return;
    }
    api_wait(hp); /* until the bus answers */
}

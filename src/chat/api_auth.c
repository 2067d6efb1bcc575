/* api_auth: the token check shared by every REST route and the WebSocket upgrade: a JWT
 * from "Authorization: Bearer" or ?token=, verified by the shared secret or the JWKS, and
 * for a chat's route, allowed for that chat. */
#include <string.h>
#include <strings.h>
#include <time.h>

#include "api.h"

/* 0 with *cl filled, or the status to answer (401/403) with *why set. */
static int api__verify(chat_server_t *s, const http_request_t *req, const char *chat_id,
                       jwt_claims_t *cl, const char **why) {
    char qtok[8193];
    const char *tok = NULL;
    size_t tlen = 0;
    size_t alen;
    const char *auth = http_header(req, "Authorization", &alen);
    if (auth && alen > 7 && strncasecmp(auth, "Bearer ", 7) == 0) {
        tok = auth + 7;
        tlen = alen - 7;
        while (tlen && tok[0] == ' ') tok++, tlen--;
    } else {
        int n = http_query_param(req, "token", qtok, sizeof qtok);
        if (n > 0) {
            tok = qtok;
            tlen = (size_t)n;
        }
    }
    if (!tok) {
        *why = "missing token: pass ?token= or Authorization: Bearer";
        return 401;
    }
    int64_t now = (int64_t)time(NULL);
    int rc = s->cfg.jwks ? jwks_verify(s->cfg.jwks, tok, tlen, now, cl)
                         : jwt_verify(tok, tlen, s->cfg.jwt_secret, now, cl);
    if (rc == CHAT_EEXPIRED) {
        *why = "token expired";
        return 401;
    }
    if (rc == CHAT_ENOTFOUND) { /* jwks_verify has asked for the provider's keys again */
        *why = "unknown key id (kid): the keys are being refreshed, retry shortly";
        return 401;
    }
    if (rc < 0) {
        *why = "invalid token";
        return 401;
    }
    if (chat_id && !jwt_allows_chat(cl, chat_id)) {
        jwt_claims_free(cl);
        *why = "this token does not allow this chat";
        return 403;
    }
    return 0;
}

bool api_auth(http_peer_t *hp, const http_request_t *req, const char *chat_id, jwt_claims_t *cl) {
    const char *why;
    int st = api__verify(hp->peer.srv, req, chat_id, cl, &why);
    if (st) {
        http_conn_error(&hp->http, st, st == 401 ? "unauthorized" : "forbidden", why,
                        req->keep_alive);
        return false;
    }
    return true;
}

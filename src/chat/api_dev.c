/* api_dev: POST /api/dev/token, development only (--dev): a token for any user name, so a
 * person can try the web page without minting tokens by hand. Without --dev the route does
 * not exist (routes.c). */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "api.h"

void api_dev_token(http_peer_t *hp, const http_request_t *req, const char *unused,
                   const jwt_claims_t *no_token) {
    chat_server_t *s = hp->peer.srv;
    bool ka = req->keep_alive;
    json_error_t jerr;
    json_t *body = req->body ? json_loadb(req->body, req->body_len, 0, &jerr) : NULL;
    const char *user = json_string_value(json_object_get(body, "user"));
    size_t ulen = user ? strlen(user) : 0;
    bool ok = ulen >= 1 && ulen <= 64;
    for (size_t i = 0; ok && i < ulen; i++)
        if ((unsigned char)user[i] < 0x20 || user[i] == 0x7f) ok = false;
    /* an optional short life, so that a developer (and the browser test) can watch the page
     * refresh its token before exp without waiting a day */
    json_t *jttl = json_object_get(body, "ttl");
    int64_t ttl = jttl ? json_integer_value(jttl) : 86400;
    if (ok && jttl && (!json_is_integer(jttl) || ttl < 1 || ttl > 86400)) {
        json_decref(body);
        http_conn_error(&hp->http, 400, "bad_request", "ttl must be whole seconds from 1 to 86400",
                        ka);
        return;
    }
    if (!ok) {
        json_decref(body);
        http_conn_error(&hp->http, 400, "bad_request",
                        "body must be {\"user\": name}, 1 to 64 bytes without control characters",
                        ka);
        return;
    }
    char *tok = jwt_sign(user, (int64_t)time(NULL), ttl, NULL, s->cfg.jwt_secret);
    sbuf_t sb = {0};
    if (tok) {
        sbuf_puts(&sb, "{\"user\":");
        sbuf_json_str(&sb, user, ulen);
        sbuf_printf(&sb, ",\"token\":\"%s\"}", tok);
    }
    json_decref(body);
    free(tok);
    if (!tok) http_conn_error(&hp->http, 500, "internal", "cannot sign a token", ka);
    else http_conn_json(&hp->http, 200, &sb, ka);
    sbuf_free(&sb);
}

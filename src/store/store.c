/* store: picks a backend from a URL, checks requests, and frees request outputs.
 *
 * The one idea: everything a backend hands back in a store_req_t is plain malloc'd memory
 * (each string its own allocation), so one cleanup function serves every backend; and
 * every request passes store_submit's checks, so no backend repeats them. */
#include "store.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store_internal.h"

void store__set_err(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

int store_open(store_t **out, uv_loop_t *loop, const char *url, char *err, size_t errlen) {
    *out = NULL;
    if (!url || !*url) {
        store__set_err(err, errlen, "empty store URL");
        return CHAT_EINVAL;
    }
    if (strncmp(url, "sqlite:", 7) == 0) {
        const char *path = url + 7;
        if (strncmp(path, "//", 2) == 0) {
            /* sqlite:///abs/path.db: an empty authority, then an absolute path. A host
             * part ("sqlite://host/x") means nothing for an embedded file, so refuse it
             * rather than guess. */
            path += 2;
            if (*path != '/') {
                store__set_err(err, errlen,
                               "sqlite URL with a host; use sqlite:PATH or "
                               "sqlite:///absolute/path");
                return CHAT_EINVAL;
            }
        }
        if (!*path) {
            store__set_err(err, errlen, "sqlite URL without a path");
            return CHAT_EINVAL;
        }
        return store_sqlite_open(out, loop, path, err, errlen);
    }
    if (strncmp(url, "cassandra://", 12) == 0) {
        return store_cassandra_open(out, loop, url, err, errlen);
    }
    if (err && errlen > 0) {
        snprintf(err, errlen, "unknown store URL scheme in \"%.64s\" (want sqlite:PATH)", url);
    }
    return CHAT_EINVAL;
}

/* Whether r carries what its op needs (store_op_t lists the inputs). */
static bool store__req_valid(const store_req_t *r) {
    if (!r->chat_id && r->op != STORE_OUTBOX_READ && r->op != STORE_OUTBOX_DELETE) return false;
    switch (r->op) {
    case STORE_APPEND: return r->user && r->text && r->id != 0 && r->id <= (uint64_t)INT64_MAX;
    case STORE_EDIT: return r->user && r->text;
    case STORE_DELETE: return r->user;
    case STORE_SEARCH: return r->text;
    case STORE_READ_SET: return r->user && r->id != 0;
    case STORE_READ_GET: return r->user;
    case STORE_HISTORY:
    case STORE_AFTER:
    case STORE_OUTBOX_READ:
    case STORE_OUTBOX_DELETE: return true;
    }
    return false; /* not a store_op_t */
}

int store_submit(store_t *s, store_req_t *r) {
    if (!s->loop || !r || !r->cb || !store__req_valid(r)) return CHAT_EINVAL;
    r->status = 0;
    r->duplicate = false;
    memset(&r->msg, 0, sizeof r->msg);
    r->msgs = NULL;
    r->marks = NULL;
    r->n_msgs = 0;
    r->rows = NULL;
    r->n_rows = 0;
    r->read_id = 0;
    r->read_moved = r->unread_capped = false;
    r->unread = 0;
    queue_init(&r->link_);
    return s->ops->submit(s, r);
}

void store_msg_clear(store_msg_t *m) {
    free(m->chat_id);
    free(m->user_from);
    free(m->message);
    free(m->client_id);
    memset(m, 0, sizeof *m);
}

void store_outbox_rows_free(store_outbox_row_t *rows, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(rows[i].chat_id);
        free(rows[i].event);
    }
    free(rows);
}

void store_req_cleanup(store_req_t *r) {
    store_msg_clear(&r->msg);
    for (size_t i = 0; i < r->n_msgs; i++) {
        store_msg_clear(&r->msgs[i]);
        if (r->marks) free(r->marks[i]);
    }
    free(r->msgs);
    free(r->marks);
    r->msgs = NULL;
    r->marks = NULL;
    r->n_msgs = 0;
    store_outbox_rows_free(r->rows, r->n_rows);
    r->rows = NULL;
    r->n_rows = 0;
    r->duplicate = false;
    r->status = 0;
    r->read_id = 0;
    r->read_moved = r->unread_capped = false;
    r->unread = 0;
}

bool store_unread_add(store_req_t *r, const char *user_from, bool deleted) {
    if (!deleted && strcmp(user_from, r->user) != 0 && ++r->unread >= STORE_UNREAD_CAP) {
        r->unread_capped = true;
        return false;
    }
    return true;
}

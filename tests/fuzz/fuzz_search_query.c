/* fuzz_search_query: the search query parser on arbitrary bytes (the q of a search request
 * is untrusted), then what is built from a parsed query: the FTS5 expression, run against a
 * real FTS5 table of the store's schema, and both highlighters.
 *
 * Invariants: the parser accepts only what it can describe (1..8 non-empty terms, at least
 * one to look for, no quote inside a term); every expression it leads to is valid FTS5
 * (never an engine syntax error, which would reach a client as a 503); a highlight never
 * holds a '<' that is not one of our <em> or </em> tags. */
#include <sqlite3.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_html.h"
#include "search/search_internal.h"
#include "store/store_sqlite_internal.h"
#include "ws/ws.h"

static sqlite3 *db;
static sqlite3_stmt *match;

static void setup(void) {
    if (db) return;
    check(sqlite3_open(":memory:", &db) == SQLITE_OK);
    for (int i = 0; i < store_sqlite_schema_versions; i++)
        check(sqlite3_exec(db, store_sqlite_schema[i], NULL, NULL, NULL) == SQLITE_OK);
    check(sqlite3_exec(db,
                       "INSERT INTO messages VALUES ('general', 1, 'alice', 'red fox café', "
                       "NULL, 1, NULL, NULL), ('a-b.c', 2, 'bob', 'NEAR(x) \"q\" a:b', NULL, "
                       "1, NULL, NULL);"
                       "INSERT INTO messages_fts (rowid, message, chat, author, chat_id) "
                       "SELECT id, message, hex(chat_id), hex(user_from), chat_id FROM messages",
                       NULL, NULL, NULL) == SQLITE_OK);
    check(sqlite3_prepare_v2(db,
                             "SELECT rowid, highlight(messages_fts, 0, char(1), char(2)) "
                             "FROM messages_fts WHERE messages_fts MATCH ?1",
                             -1, &match, NULL) == SQLITE_OK);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    setup();
    const char *why = NULL;
    search_query_t q;
    int rc = search_query_parse(&q, (const char *)data, size, &why);
    if (size > SEARCH_Q_MAX) check(rc == CHAT_EINVAL);
    if (rc != 0) {
        check(rc == CHAT_EINVAL && why && *why);
        return 0;
    }
    check(q.n_terms >= 1 && q.n_terms <= SEARCH_TERMS_MAX && q.n_positive >= 1);
    for (size_t i = 0; i < q.n_terms; i++) {
        check(q.terms[i].len > 0 && strlen(q.terms[i].text) == q.terms[i].len);
        check(!memchr(q.terms[i].text, '"', q.terms[i].len));
    }
    /* the server passes only valid UTF-8 on (FTS5 and the JSON answer need it) */
    if (!utf8_valid(data, size)) return 0;
    const char *chats[] = {"general", "a-b.c"};
    sbuf_t e = {0};
    rc = search_fts_expr(&e, &q, chats, 2, size % 2 ? "alice" : NULL, &why);
    sbuf_put(&e, "", 1);
    check(!e.oom);
    if (rc == 0) {
        sqlite3_bind_text(match, 1, e.p, -1, SQLITE_STATIC);
        int s;
        while ((s = sqlite3_step(match)) == SQLITE_ROW) {
            const char *m = (const char *)sqlite3_column_text(match, 1);
            sbuf_t h = {0};
            search_html_marked(&h, m, strlen(m), NULL, 0);
            check_html(&h);
            sbuf_free(&h);
        }
        sqlite3_reset(match);
        check(s == SQLITE_DONE);
    } else {
        check(rc == CHAT_EINVAL && why);
    }
    sbuf_free(&e);
    sbuf_t h = {0};
    search_html_terms(&h, &q, (const char *)data, size);
    check_html(&h);
    sbuf_free(&h);
    return 0;
}

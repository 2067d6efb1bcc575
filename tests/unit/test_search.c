/* test_search: the query parser, the FTS5 expressions built from it (run against a real
 * FTS5 table of the store's schema), and the two highlighters. */
#include <sqlite3.h>

#include "search/search_internal.h"
#include "store/store_sqlite_internal.h"
#include "test.h"

static int parse(search_query_t *q, const char *s, const char **why) {
    *why = NULL;
    return search_query_parse(q, s, strlen(s), why);
}

static void test_words_phrases_exclusions(void) {
    search_query_t q;
    const char *why;
    CHECK_INT(parse(&q, "  red\tFOX -hen \"quick  brown\" -\"slow one\" ", &why), 0);
    CHECK_INT(q.n_terms, 5);
    CHECK_INT(q.n_positive, 3);
    CHECK_STR(q.terms[0].text, "red");
    CHECK_STR(q.terms[1].text, "FOX");
    CHECK_STR(q.terms[2].text, "hen");
    CHECK(q.terms[2].exclude && !q.terms[2].phrase);
    CHECK_STR(q.terms[3].text, "quick brown"); /* inner blanks: one space */
    CHECK(q.terms[3].phrase && !q.terms[3].exclude);
    CHECK_STR(q.terms[4].text, "slow one");
    CHECK(q.terms[4].phrase && q.terms[4].exclude);
    /* a quote ends a word; a lone '-' and one inside a word are text */
    CHECK_INT(parse(&q, "ab\"cd\" - a-b", &why), 0);
    CHECK_INT(q.n_terms, 4);
    CHECK_STR(q.terms[0].text, "ab");
    CHECK_STR(q.terms[1].text, "cd");
    CHECK_STR(q.terms[2].text, "-");
    CHECK(!q.terms[2].exclude);
    CHECK_STR(q.terms[3].text, "a-b");
    /* eight terms, 256 bytes: fine */
    CHECK_INT(parse(&q, "a b c d e f g -h", &why), 0);
    char big[SEARCH_Q_MAX + 2];
    memset(big, 'x', sizeof big);
    CHECK_INT(search_query_parse(&q, big, SEARCH_Q_MAX, &why), 0);
    CHECK_INT(q.terms[0].len, SEARCH_Q_MAX);
    /* the largest buffer use: 8 one-byte terms, each with its NUL */
    CHECK_INT(parse(&q, "\"a\" \"b\" \"c\" \"d\" \"e\" \"f\" \"g\" \"h\"", &why), 0);
    CHECK_STR(q.terms[7].text, "h");
}

static void test_bad_queries(void) {
    static const char *bad[] = {
        "",         "   ",        "a b c d e f g h i", "a b c d e f g h -i", "red \"fox", "\"",
        "red \"\"", "red \"  \"", "-red -fox",         "-\"red fox\"",       "-\"open"};
    search_query_t q;
    const char *why;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (parse(&q, bad[i], &why) != CHAT_EINVAL || !why || !*why) {
            fprintf(stderr, "  accepted: [%s]\n", bad[i]);
            CHECK(0);
        }
    }
    char big[SEARCH_Q_MAX + 1];
    memset(big, 'x', sizeof big);
    CHECK_INT(search_query_parse(&q, big, sizeof big, &why), CHAT_EINVAL);
    /* a NUL or another control character would cut or garble the terms downstream */
    CHECK_INT(search_query_parse(&q, "red\0fox", 7, &why), CHAT_EINVAL);
    CHECK_INT(parse(&q, "red \x1b[0m", &why), CHAT_EINVAL);
    CHECK_INT(parse(&q, "\"a\x7f\"", &why), CHAT_EINVAL);
}

static char *expr_of(const char *qs, const char *const *chats, size_t n, const char *from,
                     int *rc) {
    search_query_t q;
    const char *why;
    static sbuf_t sb;
    sbuf_free(&sb);
    memset(&sb, 0, sizeof sb);
    *rc = parse(&q, qs, &why);
    if (*rc) return NULL;
    *rc = search_fts_expr(&sb, &q, chats, n, from, &why);
    sbuf_put(&sb, "", 1);
    return *rc ? NULL : sb.p;
}

static void test_fts_expressions_quote_every_term(void) {
    const char *chats[] = {"general", "a-b"};
    int rc;
    CHECK_STR(expr_of("red \"quick fox\" -hen", chats, 2, "al", &rc),
              "chat : (\"67656E6572616C\" OR \"612D62\") AND author : \"616C\" AND "
              "message : ((\"red\" AND \"quick fox\") NOT \"hen\")");
    CHECK_STR(expr_of("NEAR(a OR b) col:x* ^y", chats, 1, NULL, &rc),
              "chat : (\"67656E6572616C\") AND message : ((\"NEAR(a\" AND \"OR\" AND "
              "\"b)\" AND \"col:x*\" AND \"^y\"))");
    /* punctuation-only words are no FTS5 token: left out, and alone they are an error */
    CHECK_STR(expr_of("!!! red -...", chats, 1, NULL, &rc),
              "chat : (\"67656E6572616C\") AND message : ((\"red\"))");
    CHECK(expr_of("!!! ... -red", chats, 1, NULL, &rc) == NULL);
    CHECK_INT(rc, CHAT_EINVAL);
}

/* Every expression the builder makes is valid FTS5 for the store's own table. */
static void test_fts_expressions_run(void) {
    sqlite3 *db;
    CHECK_INT(sqlite3_open(":memory:", &db), SQLITE_OK);
    for (int i = 0; i < store_sqlite_schema_versions; i++)
        CHECK_INT(sqlite3_exec(db, store_sqlite_schema[i], NULL, NULL, NULL), SQLITE_OK);
    /* as the store's writer appends: the row, and its words into the index */
    CHECK_INT(sqlite3_exec(db,
                           "INSERT INTO messages VALUES ('general', 1, 'al', "
                           "'NEAR(a OR b) café \"x\"', NULL, 1, NULL, NULL);"
                           "INSERT INTO messages_fts (rowid, message, chat, author, chat_id) "
                           "SELECT id, message, hex(chat_id), hex(user_from), chat_id "
                           "FROM messages",
                           NULL, NULL, NULL),
              SQLITE_OK);
    static const char *qs[] = {
        "NEAR(a OR b)", "cafe", "\"x\"", "a:b",   "* ^ + - AND OR NOT", "é",
        "\"near a\"",   "'",    "a'b",   "{col}", "x -\"y z\"",         "\\"};
    const char *chats[] = {"general"};
    int matched = 0;
    for (size_t i = 0; i < sizeof qs / sizeof qs[0]; i++) {
        int rc;
        char *e = expr_of(qs[i], chats, 1, "al", &rc);
        if (!e) continue; /* no word in it: answered 400 before FTS5 */
        sqlite3_stmt *st;
        CHECK_INT(sqlite3_prepare_v2(db,
                                     "SELECT rowid FROM messages_fts WHERE messages_fts "
                                     "MATCH ?1",
                                     -1, &st, NULL),
                  SQLITE_OK);
        sqlite3_bind_text(st, 1, e, -1, SQLITE_STATIC);
        int s;
        while ((s = sqlite3_step(st)) == SQLITE_ROW) matched++;
        if (s != SQLITE_DONE) fprintf(stderr, "  [%s] -> %s: %s\n", qs[i], e, sqlite3_errmsg(db));
        sqlite3_finalize(st);
        CHECK_INT(s, SQLITE_DONE);
    }
    CHECK(matched >= 3); /* NEAR(a OR b), cafe, "x" at least */
    sqlite3_close(db);
}

static char *html(void (*fn)(sbuf_t *, const char *), const char *text) {
    static sbuf_t sb;
    sbuf_free(&sb);
    memset(&sb, 0, sizeof sb);
    fn(&sb, text);
    sbuf_put(&sb, "", 1);
    return sb.p;
}

static void marked(sbuf_t *sb, const char *t) { search_html_marked(sb, t, strlen(t), NULL, 0); }

static const char *plain_text;
static void marked_plain(sbuf_t *sb, const char *t) {
    search_html_marked(sb, t, strlen(t), plain_text, strlen(plain_text));
}

static search_query_t hq;
static void terms(sbuf_t *sb, const char *t) { search_html_terms(sb, &hq, t, strlen(t)); }

static void test_highlights_escape_everything_but_em(void) {
    CHECK_STR(html(marked, "<b>\x01red\x02</b> & \"\x01"
                           "fox\x02\" isn't"),
              "&lt;b&gt;<em>red</em>&lt;/b&gt; &amp; &quot;<em>fox</em>&quot; isn&#39;t");
    /* a text with the mark bytes of its own: no marks believed, all escaped */
    plain_text = "a\x01<b>";
    CHECK_STR(html(marked_plain, "\x01"
                                 "a\x02\x01<b>"),
              "a\x01&lt;b&gt;");
    const char *why;
    CHECK_INT(parse(&hq, "red \"ed f\" -fox <b>", &why), 0);
    CHECK_STR(html(terms, "Red fox <b>x</b> RED"),
              "<em>Red f</em>ox <em>&lt;b&gt;</em>x&lt;/b&gt; <em>RED</em>");
    CHECK_STR(html(terms, ""), "");
    CHECK_STR(html(terms, "nothing"), "nothing");
}

int main(void) {
    log_set_level(CHAT_LOG_WARN);
    RUN(test_words_phrases_exclusions);
    RUN(test_bad_queries);
    RUN(test_fts_expressions_quote_every_term);
    RUN(test_fts_expressions_run);
    RUN(test_highlights_escape_everything_but_em);
    return test_summary("test_search");
}

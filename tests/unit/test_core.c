/* Unit tests of core: ids, time formatting, buffers, the string builder, log values, error
 * strings. */
#include "core/core.h"
#include "test.h"

static void test_time_format(void) {
    char out[25];
    time_format_ms(0, out);
    CHECK_STR(out, "1970-01-01T00:00:00.000Z");
    time_format_ms(1795940400123LL, out); /* 2026-11-29T08:20:00.123Z */
    CHECK_STR(out, "2026-11-29T08:20:00.123Z");
    time_format_ms(951782400999LL, out); /* leap day 2000 */
    CHECK_STR(out, "2000-02-29T00:00:00.999Z");
}

static void test_id_layout(void) {
    id_gen_t g;
    id_gen_init(&g, 5);
    int64_t ms;
    int64_t before = time_now_ms();
    uint64_t id = id_next(&g, &ms);
    int64_t after = time_now_ms();
    CHECK(ms >= before && ms <= after);
    CHECK_INT(id_time_ms(id), ms);
    CHECK_INT((id >> 12) & 1023, 5);
    CHECK(id < (1ULL << 63)); /* fits a signed 64-bit column (SQLite, Cassandra bigint) */
}

static void test_id_monotonic_and_unique(void) {
    id_gen_t g;
    id_gen_init(&g, 1023);
    uint64_t prev = 0;
    /* far more than 4096 per millisecond: the sequence must roll into the next ms */
    for (int i = 0; i < 200000; i++) {
        int64_t ms;
        uint64_t id = id_next(&g, &ms);
        CHECK(id > prev);
        CHECK_INT(id_time_ms(id), ms);
        prev = id;
    }
}

static void test_id_clock_step_back(void) {
    id_gen_t g;
    id_gen_init(&g, 1);
    uint64_t a = id_next(&g, NULL);
    g.last_ms += 5000; /* as if the wall clock had been 5 s ahead and then stepped back */
    uint64_t b = id_next(&g, NULL);
    CHECK(b > a);
    CHECK_INT(id_time_ms(b), g.last_ms + ID_EPOCH_MS);
}

static void test_id_parse(void) {
    uint64_t v;
    CHECK_INT(id_parse("7261835409563648", 16, &v), 0);
    CHECK(v == 7261835409563648ULL);
    CHECK_INT(id_parse("18446744073709551615", 20, &v), 0);
    CHECK(v == UINT64_MAX);
    CHECK_INT(id_parse("18446744073709551616", 20, &v), CHAT_EINVAL);
    CHECK_INT(id_parse("", 0, &v), CHAT_EINVAL);
    CHECK_INT(id_parse("12a", 3, &v), CHAT_EINVAL);
    CHECK_INT(id_parse("-1", 2, &v), CHAT_EINVAL);
    CHECK_INT(id_parse(" 1", 2, &v), CHAT_EINVAL);
}

static void test_buf_refcount(void) {
    buf_t *b = buf_from("hello", 5);
    CHECK(b != NULL);
    CHECK_INT(b->len, 5);
    CHECK_MEM(b->data, "hello", 5);
    CHECK(buf_ref(b) == b);
    CHECK_INT(b->refs, 2);
    buf_unref(b);
    CHECK_INT(b->refs, 1);
    buf_unref(b); /* freed: ASan would report a leak otherwise */
    buf_unref(NULL);
}

static void test_sbuf_json(void) {
    sbuf_t sb = {0};
    sbuf_json_str(&sb, "a\"b\\c\n\x01\xc3\xa9", 9);
    CHECK_STR(sb.p, "\"a\\\"b\\\\c\\n\\u0001\xc3\xa9\"");
    sbuf_printf(&sb, "%d-%s", 42, "x");
    CHECK_STR(sb.p, "\"a\\\"b\\\\c\\n\\u0001\xc3\xa9\"42-x");
    CHECK(!sb.oom);
    sbuf_free(&sb);
    /* growth across many appends keeps every byte */
    for (int i = 0; i < 10000; i++) sbuf_put(&sb, "0123456789", 10);
    CHECK_INT(sb.len, 100000);
    CHECK_MEM(sb.p + 99990, "0123456789", 10);
    sbuf_free(&sb);
}

static void test_url_redact(void) {
    char out[128];
    url_redact("cassandra://chat:s3cret@h1:9042,h2/ks?consistency=one", out, sizeof out);
    CHECK_STR(out, "cassandra://chat:***@h1:9042,h2/ks?consistency=one");
    url_redact("redis://:pw@127.0.0.1:6379/0", out, sizeof out);
    CHECK_STR(out, "redis://:***@127.0.0.1:6379/0");
    url_redact("sqlite:./data/chat.db", out, sizeof out);
    CHECK_STR(out, "sqlite:./data/chat.db");
    url_redact("redis://host/a@b", out, sizeof out); /* an @ after the path is no password */
    CHECK_STR(out, "redis://host/a@b");
}

static void test_log_value(void) {
    char out[LOG_VALUE_MAX];
#define LV(s) log_value(out, sizeof out, (s), strlen(s))
    /* plain tokens stay as they are */
    CHECK_STR(LV("alice"), "alice");
    CHECK_STR(LV("127.0.0.1:80"), "127.0.0.1:80");
    CHECK_STR(LV("a-b_c.d/e"), "a-b_c.d/e");
    /* a forged field stays inside the one value */
    CHECK_STR(LV("alice reason=\"forged\" user=admin"),
              "\"alice reason=\\\"forged\\\" user=admin\"");
    CHECK_STR(LV("a=b"), "\"a=b\"");
    CHECK_STR(LV("back\\slash"), "\"back\\\\slash\"");
    CHECK_STR(LV("q\"uote"), "\"q\\\"uote\"");
    /* no new line, control or non-ASCII byte reaches the log */
    CHECK_STR(LV("a\nuser=admin"), "\"a\\nuser=admin\"");
    CHECK_STR(LV("t\tr\r"), "\"t\\tr\\r\"");
    CHECK_STR(LV("\x1b[31m\x7f"), "\"\\x1b[31m\\x7f\"");
    CHECK_STR(LV("Jos\xc3\xa9"), "\"Jos\\xc3\\xa9\"");
    /* empty and NULL are an explicit empty value */
    CHECK_STR(LV(""), "\"\"");
    CHECK_STR(log_value(out, sizeof out, NULL, 5), "\"\"");
    /* length-bounded: bytes after n are not read */
    CHECK_STR(log_value(out, sizeof out, "ab cd", 2), "ab");
    CHECK_STR(log_value(out, sizeof out, "a\0b", 3), "\"a\\x00b\"");
#undef LV
    /* cut to the buffer, never in the middle of an escape, still closed */
    char small[10];
    CHECK_STR(log_value(small, sizeof small, "abcdefghi", 9), "abcdefghi");
    CHECK_STR(log_value(small, sizeof small, "abcdefghij", 10), "abcdef...");
    CHECK_STR(log_value(small, sizeof small, "a b", 3), "\"a b\"");
    CHECK_STR(log_value(small, sizeof small, "abc defgh", 9), "\"abc ...\"");
    CHECK_STR(log_value(small, sizeof small, "\x01\x02\x03", 3), "\"\\x01...\"");
    CHECK_STR(log_value(small, sizeof small, "ab\x01\x02", 4), "\"ab...\"");
    /* LOG_STR: a temporary per use, so two in one call do not share a buffer */
    char line[600];
    snprintf(line, sizeof line, "user=%s chat=%s", LOG_STR("a b"), LOG_STR("c"));
    CHECK_STR(line, "user=\"a b\" chat=c");
    char big[1000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    CHECK_INT(strlen(LOG_STR(big)), LOG_VALUE_MAX - 1);
    CHECK_STR(LOG_STR(big) + LOG_VALUE_MAX - 4, "...");
    CHECK_STR(LOG_STR(NULL), "\"\"");
}

static void test_strerror(void) {
    CHECK_STR(chat_strerror(CHAT_EPERM), "not allowed");
    CHECK_STR(chat_strerror(-999), "unknown error");
}

int main(void) {
    RUN(test_time_format);
    RUN(test_id_layout);
    RUN(test_id_monotonic_and_unique);
    RUN(test_id_clock_step_back);
    RUN(test_id_parse);
    RUN(test_buf_refcount);
    RUN(test_sbuf_json);
    RUN(test_url_redact);
    RUN(test_log_value);
    RUN(test_strerror);
    return test_summary("test_core");
}

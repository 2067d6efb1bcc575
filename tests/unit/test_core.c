/* Unit tests of core: ids, time formatting, buffers, the string builder, JSON escaping, the
 * UTF-8 validator, log values, error strings. */
#include "core/core.h"
#include "test.h"

#include <stdio.h>
#include <string.h>

#define U8(s) ((const uint8_t *)(s))

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

static void test_json_escape(void) {
    /* measure, then write exactly that many bytes */
    const char *in = "a\"b\\c\n\r\t\x01\x1f caf\xc3\xa9 \xf0\x9f\x98\x80";
    const char *want = "a\\\"b\\\\c\\n\\r\\t\\u0001\\u001f caf\xc3\xa9 \xf0\x9f\x98\x80";
    char out[128];
    memset(out, 'x', sizeof out);
    size_t n = json_escape(in, strlen(in), NULL);
    CHECK_INT(n, strlen(want));
    CHECK_INT(json_escape(in, strlen(in), out), n);
    CHECK_MEM(out, want, n);
    CHECK(out[n] == 'x');
    /* invalid UTF-8: one U+FFFD per bad byte (stray continuation, C0, surrogate, truncated
     * sequence at the end), the valid bytes around them kept */
    in = "\x80"
         "a\xc0\xaf"
         "b\xed\xa0\x80"
         "c\xe2\x82";
    want = "\\ufffda\\ufffd\\ufffdb\\ufffd\\ufffd\\ufffdc\\ufffd\\ufffd";
    n = json_escape(in, strlen(in), out);
    CHECK_INT(n, strlen(want));
    CHECK_MEM(out, want, n);
    CHECK_INT(json_escape("", 0, out), 0);
    /* an embedded NUL is escaped, not an end */
    CHECK_INT(json_escape("a\0b", 3, out), 8);
    CHECK_MEM(out, "a\\u0000b", 8);
    /* the worst case fits the documented bound */
    CHECK_INT(json_escape("\x01\xff", 2, NULL), 12);
    /* sbuf_json_str quotes the same */
    sbuf_t sb = {0};
    sbuf_json_str(&sb, "x\xffy", 3);
    CHECK_STR(sb.p, "\"x\\ufffdy\"");
    sbuf_free(&sb);
}

static void test_utf8_seq_len(void) {
    CHECK_INT(utf8_seq_len(U8("a"), 1), 1);
    CHECK_INT(utf8_seq_len(U8("\xc3\xa9"), 2), 2);
    CHECK_INT(utf8_seq_len(U8("\xe2\x82\xac"), 3), 3);
    CHECK_INT(utf8_seq_len(U8("\xf0\x9f\x98\x80"
                              "z"),
                           5),
              4);
    CHECK_INT(utf8_seq_len(U8("\xe2\x82\xac"), 2), 0); /* truncated by n */
    CHECK_INT(utf8_seq_len(U8("\x80"), 1), 0);
    CHECK_INT(utf8_seq_len(U8("\xc0\xaf"), 2), 0);         /* overlong */
    CHECK_INT(utf8_seq_len(U8("\xed\xa0\x80"), 3), 0);     /* surrogate */
    CHECK_INT(utf8_seq_len(U8("\xf4\x90\x80\x80"), 4), 0); /* > U+10FFFF */
}

/* An independent, arithmetic UTF-8 check to compare the DFA against. */
static bool ref_utf8(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        uint32_t cp;
        size_t k;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            k = 1, cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 2, cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3, cp = c & 0x07;
        } else {
            return false;
        }
        for (size_t j = 1; j <= k; j++) {
            if (i + j >= n || (s[i + j] & 0xC0) != 0x80) return false;
            cp = cp << 6 | (s[i + j] & 0x3F);
        }
        if ((k == 2 && cp < 0x800) || (k == 3 && (cp < 0x10000 || cp > 0x10FFFF))) return false;
        if (cp >= 0xD800 && cp <= 0xDFFF) return false;
        i += k + 1;
    }
    return true;
}

static size_t enc_utf8(uint32_t cp, uint8_t *o) {
    if (cp < 0x80) {
        o[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (uint8_t)(0xC0 | cp >> 6);
        o[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (uint8_t)(0xE0 | cp >> 12);
        o[1] = (uint8_t)(0x80 | (cp >> 6 & 0x3F));
        o[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (uint8_t)(0xF0 | cp >> 18);
    o[1] = (uint8_t)(0x80 | (cp >> 12 & 0x3F));
    o[2] = (uint8_t)(0x80 | (cp >> 6 & 0x3F));
    o[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

/* ---- UTF-8 -------------------------------------------------------------------------------- */

static void test_utf8_cases(void) {
    struct {
        const char *s;
        bool ok;
    } t[] = {
        {"", true},
        {"hello", true},
        {"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5", true}, /* kosme */
        {"\xc2\x80", true},                                     /* U+0080 */
        {"\xdf\xbf", true},                                     /* U+07FF */
        {"\xe0\xa0\x80", true},                                 /* U+0800 */
        {"\xed\x9f\xbf", true},                                 /* U+D7FF */
        {"\xee\x80\x80", true},                                 /* U+E000 */
        {"\xef\xbf\xbf", true},                                 /* U+FFFF */
        {"\xf0\x90\x80\x80", true},                             /* U+10000 */
        {"\xf4\x8f\xbf\xbf", true},                             /* U+10FFFF */
        {"\xed\xa0\x80", false},                                /* U+D800 */
        {"\xed\xbf\xbf", false},                                /* U+DFFF */
        {"\xed\xa0\x80\xed\xb0\x80", false},                    /* surrogate pair */
        {"\xf4\x90\x80\x80", false},                            /* U+110000 */
        {"\xf5\x80\x80\x80", false},
        {"\xf7\xbf\xbf\xbf", false},
        {"\xf8\x88\x80\x80\x80", false}, /* 5-byte form */
        {"\xfc\x84\x80\x80\x80\x80", false},
        {"\xfe", false},
        {"\xff", false},
        {"\xc0\xaf", false}, /* overlong '/' */
        {"\xc1\xbf", false},
        {"\xe0\x80\xaf", false},
        {"\xe0\x9f\xbf", false}, /* overlong U+07FF */
        {"\xf0\x80\x80\xaf", false},
        {"\xf0\x8f\xbf\xbf", false}, /* overlong U+FFFF */
        {"\x80", false},             /* stray continuation */
        {"a\xbf", false},
        {"\xce\xba\x80", false},
        {"\xce", false}, /* truncated */
        {"\xe2\x82", false},
        {"\xf0\x9f\x98", false},
        {"\xce\x41", false},
        {"\xe2\x82\x41", false},
        {"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"
         "edited",
         false},
    };
    for (size_t i = 0; i < sizeof t / sizeof *t; i++) {
        const uint8_t *s = U8(t[i].s);
        size_t n = strlen(t[i].s);
        if (utf8_valid(s, n) != t[i].ok || ref_utf8(s, n) != t[i].ok) {
            fprintf(stderr, "  utf8 case %zu\n", i);
            CHECK(0);
        }
    }
    /* The truncated ones are not rejected mid-stream: they may still complete. */
    CHECK(utf8_feed(0, U8("\xe2\x82"), 2) > UTF8_REJECT);
    CHECK_INT(utf8_feed(utf8_feed(0, U8("\xe2\x82"), 2), U8("\xac"), 1), UTF8_ACCEPT);
    /* Reject is sticky, and an unknown state is not trusted. */
    CHECK_INT(utf8_feed(UTF8_REJECT, U8("a"), 1), UTF8_REJECT);
    CHECK_INT(utf8_feed(UTF8_REJECT, NULL, 0), UTF8_REJECT);
    CHECK_INT(utf8_feed(1000, U8("a"), 1), UTF8_REJECT);
}

/* Invalid input is rejected at the very byte that makes it invalid, not later. */
static void test_utf8_reject_position(void) {
    struct {
        const char *s;
        size_t bad;
    } t[] = {
        {"ab\xc0\xaf", 2},
        {"\xed\xa0\x80", 1},
        {"\xf4\x90\x80\x80", 1},
        {"\xe0\x9f\xbf", 1},
        {"\xf0\x8f\xbf\xbf", 1},
        {"xyz\x80", 3},
        {"\xce\xba\xce", 4 /* the end: never rejected, just incomplete */},
        {"\xe2\x82\x41", 2},
        {"\xf0\x9f\x98\xce", 3},
        {"\xf5", 0},
    };
    for (size_t i = 0; i < sizeof t / sizeof *t; i++) {
        const uint8_t *s = U8(t[i].s);
        size_t n = strlen(t[i].s);
        uint32_t st = 0;
        for (size_t k = 0; k < n; k++) {
            st = utf8_feed(st, s + k, 1);
            if ((st == UTF8_REJECT) != (k >= t[i].bad)) {
                fprintf(stderr, "  case %zu byte %zu state %u\n", i, k, st);
                CHECK(0);
            }
        }
    }
}

/* Every code point, encoded and fed at every split point. */
static void test_utf8_all_code_points(void) {
    uint8_t b[4];
    for (uint32_t cp = 0; cp <= 0x10FFFF; cp++) {
        size_t n = enc_utf8(cp, b);
        bool want = !(cp >= 0xD800 && cp <= 0xDFFF);
        if (utf8_valid(b, n) != want) {
            fprintf(stderr, "  U+%04X\n", cp);
            CHECK(0);
        }
        for (size_t k = 1; k < n; k++) {
            uint32_t st = utf8_feed(0, b, k);
            if (want && (st == UTF8_ACCEPT || st == UTF8_REJECT)) {
                fprintf(stderr, "  U+%04X split %zu\n", cp, k);
                CHECK(0);
            }
            if ((utf8_feed(st, b + k, n - k) == UTF8_ACCEPT) != want) {
                fprintf(stderr, "  U+%04X split %zu\n", cp, k);
                CHECK(0);
            }
        }
    }
    /* Overlong forms of every code point that has a shorter one. */
    for (uint32_t cp = 0; cp < 0x10000; cp++) {
        uint8_t o[4] = {(uint8_t)(0xF0 | cp >> 18), (uint8_t)(0x80 | (cp >> 12 & 0x3F)),
                        (uint8_t)(0x80 | (cp >> 6 & 0x3F)), (uint8_t)(0x80 | (cp & 0x3F))};
        CHECK(!utf8_valid(o, 4));
        if (cp < 0x800) {
            uint8_t o3[3] = {0xE0, (uint8_t)(0x80 | (cp >> 6 & 0x3F)),
                             (uint8_t)(0x80 | (cp & 0x3F))};
            CHECK(!utf8_valid(o3, 3));
        }
        if (cp < 0x80) {
            uint8_t o2[2] = {(uint8_t)(0xC0 | cp >> 6), (uint8_t)(0x80 | (cp & 0x3F))};
            CHECK(!utf8_valid(o2, 2));
        }
    }
}

/* Every 1-, 2- and 3-byte string, and every 4-byte string from a lead >= F0 with continuation
 * and edge bytes, against the arithmetic reference. */
static void test_utf8_exhaustive(void) {
    uint8_t s[4];
    for (unsigned a = 0; a < 256; a++) {
        s[0] = (uint8_t)a;
        CHECK(utf8_valid(s, 1) == ref_utf8(s, 1));
        for (unsigned b = 0; b < 256; b++) {
            s[1] = (uint8_t)b;
            CHECK(utf8_valid(s, 2) == ref_utf8(s, 2));
            for (unsigned c = 0; c < 256; c++) {
                s[2] = (uint8_t)c;
                if (utf8_valid(s, 3) != ref_utf8(s, 3)) {
                    fprintf(stderr, "  %02x %02x %02x\n", a, b, c);
                    CHECK(0);
                }
            }
        }
    }
    static const uint8_t edge[] = {0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0,
                                   0xC2, 0xDF, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xFF};
    for (unsigned a = 0xF0; a < 256; a++) {
        for (unsigned b = 0; b < 256; b++) {
            for (size_t c = 0; c < sizeof edge; c++) {
                for (size_t d = 0; d < sizeof edge; d++) {
                    uint8_t q[4] = {(uint8_t)a, (uint8_t)b, edge[c], edge[d]};
                    CHECK(utf8_valid(q, 4) == ref_utf8(q, 4));
                }
            }
        }
    }
}

/* The ASCII fast path must hand over to the DFA at any offset, in any feed. */
static void test_utf8_fast_path(void) {
    uint8_t s[80];
    for (size_t pos = 0; pos + 4 <= sizeof s; pos++) {
        memset(s, 'a', sizeof s);
        memcpy(s + pos, "\xf0\x9f\x98\x80", 4); /* U+1F600 */
        CHECK(utf8_valid(s, sizeof s));
        for (size_t k = 0; k <= sizeof s; k++) {
            uint32_t st = utf8_feed(0, s, k);
            CHECK_INT(utf8_feed(st, s + k, sizeof s - k), UTF8_ACCEPT);
        }
        s[pos + 3] = 0x41; /* truncated 4-byte sequence */
        CHECK(!utf8_valid(s, sizeof s));
        memset(s, 'a', sizeof s);
        s[pos] = 0x80;
        CHECK(!utf8_valid(s, sizeof s));
        CHECK_INT(utf8_feed(0, s, pos + 1), UTF8_REJECT);
        CHECK_INT(utf8_feed(0, s, pos), UTF8_ACCEPT);
    }
    /* a long mixed text, fed at every split point */
    char text[600];
    size_t n = 0;
    while (n + 40 < sizeof text) {
        memcpy(text + n, "plain ascii text ", 17);
        n += 17;
        memcpy(text + n, "\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf0\x9f\x92\xac", 15);
        n += 15;
    }
    CHECK(utf8_valid(U8(text), n));
    for (size_t k = 0; k <= n; k++) {
        uint32_t st = utf8_feed(0, U8(text), k);
        CHECK(st != UTF8_REJECT);
        CHECK_INT(utf8_feed(st, U8(text) + k, n - k), UTF8_ACCEPT);
    }
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
    RUN(test_json_escape);
    RUN(test_utf8_seq_len);
    RUN(test_utf8_cases);
    RUN(test_utf8_reject_position);
    RUN(test_utf8_all_code_points);
    RUN(test_utf8_exhaustive);
    RUN(test_utf8_fast_path);
    RUN(test_url_redact);
    RUN(test_log_value);
    RUN(test_strerror);
    return test_summary("test_core");
}

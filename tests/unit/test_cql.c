/* Unit tests of src/cql: the codec against byte layouts written out from the native protocol
 * v4 spec, and the client against a scripted fake server on the same loop.
 *
 * The one idea: the fake server is not a Cassandra; it is a script. It parses request frames
 * by hand (independently of the codec), records them, and answers when and how each test
 * says: late, out of order, never, with ERRORs, or by hanging up. That is how the client's
 * stream matching, re-prepare, timeouts and reconnection are tested exactly; the real
 * Cassandra is exercised by test_store_cassandra and tests/cassandra. */
#include "cql/cql.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test.h"

/* ---- byte helpers ------------------------------------------------------------------------ */

/* Decode a whole response frame (header + body) given as bytes. */
static int decode(const uint8_t *f, size_t n, cql_response_t *r) {
    cql_header_t h;
    int rc = cql_header_decode(f, n, &h);
    if (rc) return rc;
    if (n != CQL_HEADER_LEN + h.length) return -100;
    return cql_response_decode(r, &h, f + CQL_HEADER_LEN, h.length);
}

static bool str_is(cql_str_t s, const char *want) {
    return s.n == strlen(want) && memcmp(s.p, want, s.n) == 0;
}

/* ---- header ------------------------------------------------------------------------------ */

static void test_header_decode(void) {
    /* a RESULT response on stream 5 with a 4-byte body */
    const uint8_t f[] = {0x84, 0x00, 0x00, 0x05, 0x08, 0x00, 0x00, 0x00, 0x04};
    cql_header_t h;
    CHECK_INT(cql_header_decode(f, 8, &h), CHAT_EAGAIN);
    CHECK_INT(cql_header_decode(f, 9, &h), 0);
    CHECK_INT(h.version, 0x84);
    CHECK_INT(h.flags, 0);
    CHECK_INT(h.stream, 5);
    CHECK_INT(h.opcode, CQL_OP_RESULT);
    CHECK_INT(h.length, 4);
    /* an EVENT: stream -1 */
    const uint8_t ev[] = {0x84, 0x00, 0xff, 0xff, 0x0c, 0x00, 0x00, 0x01, 0x00};
    CHECK_INT(cql_header_decode(ev, 9, &h), 0);
    CHECK_INT(h.stream, -1);
    CHECK_INT(h.length, 256);
    /* a request frame, or another version, is not a v4 response */
    const uint8_t req[] = {0x04, 0x00, 0x00, 0x01, 0x05, 0x00, 0x00, 0x00, 0x00};
    CHECK_INT(cql_header_decode(req, 9, &h), CHAT_EPROTO);
    const uint8_t v5[] = {0x85, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00};
    CHECK_INT(cql_header_decode(v5, 9, &h), CHAT_EPROTO);
    /* 256 MB is the limit; one more byte is too big */
    const uint8_t max[] = {0x84, 0x00, 0x00, 0x01, 0x08, 0x10, 0x00, 0x00, 0x00};
    CHECK_INT(cql_header_decode(max, 9, &h), 0);
    const uint8_t big[] = {0x84, 0x00, 0x00, 0x01, 0x08, 0x10, 0x00, 0x00, 0x01};
    CHECK_INT(cql_header_decode(big, 9, &h), CHAT_ETOOBIG);

    uint8_t out[9];
    cql_header_t e = {
        .version = 0x04, .flags = 0x02, .stream = 0x1234, .opcode = 0x07, .length = 0x01020304};
    cql_header_encode(out, &e);
    const uint8_t want[] = {0x04, 0x02, 0x12, 0x34, 0x07, 0x01, 0x02, 0x03, 0x04};
    CHECK_MEM(out, want, 9);
    cql_frame_set_stream(out, 300);
    CHECK_INT(out[2], 0x01);
    CHECK_INT(out[3], 0x2c);
}

/* ---- requests ------------------------------------------------------------------------------ */

static void test_encode_options_startup_auth(void) {
    sbuf_t sb = {0};
    CHECK_INT(cql_encode_options(&sb, 1), 0);
    const uint8_t opt[] = {0x04, 0x00, 0x00, 0x01, 0x05, 0x00, 0x00, 0x00, 0x00};
    CHECK_INT(sb.len, sizeof opt);
    CHECK_MEM(sb.p, opt, sizeof opt);
    sb.len = 0;

    static const char *const kv[] = {"CQL_VERSION", "3.0.0", NULL};
    CHECK_INT(cql_encode_startup(&sb, 0, kv), 0);
    /* [string map] with one pair: n=1, "CQL_VERSION", "3.0.0" (22 bytes) */
    const uint8_t st[] = {0x04, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x16, 0x00, 0x01,
                          0x00, 0x0b, 'C',  'Q',  'L',  '_',  'V',  'E',  'R',  'S',  'I',
                          'O',  'N',  0x00, 0x05, '3',  '.',  '0',  '.',  '0'};
    CHECK_INT(sb.len, sizeof st);
    CHECK_MEM(sb.p, st, sizeof st);
    sb.len = 0;
    static const char *const nover[] = {"COMPRESSION", "lz4", NULL};
    CHECK_INT(cql_encode_startup(&sb, 0, nover), CHAT_EINVAL);
    sb.len = 0;

    /* SASL PLAIN token as [bytes] */
    CHECK_INT(cql_encode_auth_response(&sb, 2, "\0bob\0pw", 7), 0);
    const uint8_t ar[] = {0x04, 0x00, 0x00, 0x02, 0x0f, 0x00, 0x00, 0x00, 0x0b, 0x00,
                          0x00, 0x00, 0x07, 0x00, 'b',  'o',  'b',  0x00, 'p',  'w'};
    CHECK_INT(sb.len, sizeof ar);
    CHECK_MEM(sb.p, ar, sizeof ar);
    sb.len = 0;

    CHECK_INT(cql_encode_prepare(&sb, 3, "SELECT 1"), 0);
    const uint8_t pr[] = {0x04, 0x00, 0x00, 0x03, 0x09, 0x00, 0x00, 0x00, 0x0c, 0x00, 0x00,
                          0x00, 0x08, 'S',  'E',  'L',  'E',  'C',  'T',  ' ',  '1'};
    CHECK_INT(sb.len, sizeof pr);
    CHECK_MEM(sb.p, pr, sizeof pr);
    sbuf_free(&sb);
}

static void test_encode_query_values(void) {
    sbuf_t sb = {0};
    const uint8_t uuid[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    cql_value_t v[] = {cql_int(7),     cql_text("hé"), cql_null(),     cql_unset(),
                       cql_bigint(-2), cql_bool(true), cql_uuid(uuid), cql_blob("", 0)};
    CHECK_INT(cql_encode_query(&sb, 9, "Q", v, 8, NULL, CQL_LOCAL_QUORUM, CQL_SERIAL), 0);
    const uint8_t want[] = {
        0x04, 0x00, 0x00, 0x09, 0x07, 0x00, 0x00, 0x00, 0x4c, /* header: QUERY, 76 bytes */
        0x00, 0x00, 0x00, 0x01, 'Q',                          /* [long string] */
        0x00, 0x06,                                           /* LOCAL_QUORUM */
        0x11,                                                 /* flags: values, serial */
        0x00, 0x08,                                           /* 8 values */
        0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x07,       /* int 7 */
        0x00, 0x00, 0x00, 0x03, 'h',  0xc3, 0xa9,             /* text "hé" (UTF-8) */
        0xff, 0xff, 0xff, 0xff,                               /* null: -1 */
        0xff, 0xff, 0xff, 0xfe,                               /* not set: -2 */
        0x00, 0x00, 0x00, 0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, /* -2 */
        0x00, 0x00, 0x00, 0x01, 0x01,                                           /* true */
        0x00, 0x00, 0x00, 0x10, 0,    1,    2,    3,    4,    5,    6,    7,    8,
        9,    10,   11,   12,   13,   14,   15,   0x00, 0x00, 0x00, 0x00, /* empty blob: length 0, not null */
        0x00, 0x08, /* serial consistency SERIAL */
    };
    CHECK_INT(sb.len, sizeof want);
    CHECK_MEM(sb.p, want, sizeof want);
    sb.len = 0;

    /* no values, page size, paging state, LOCAL_SERIAL, default timestamp */
    cql_params_t p = CQL_PARAMS_DEFAULT;
    p.page_size = 100;
    p.paging_state = (cql_bytes_t){(const uint8_t *)"\xaa\xbb", 2};
    p.timestamp_us = 0x0102030405060708LL;
    CHECK_INT(cql_encode_query(&sb, 1, "Q", NULL, 0, &p, CQL_ONE, CQL_LOCAL_SERIAL), 0);
    const uint8_t want2[] = {
        0x04, 0x00, 0x00, 0x01, 0x07, 0x00, 0x00, 0x00,
        0x1c, 0x00, 0x00, 0x00, 0x01, 'Q',  0x00, 0x01, /* ONE */
        0x3c,                   /* page size, paging state, serial, timestamp */
        0x00, 0x00, 0x00, 0x64, /* 100 rows */
        0x00, 0x00, 0x00, 0x02, 0xaa, 0xbb, 0x00, 0x09, /* LOCAL_SERIAL */
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
    };
    CHECK_INT(sb.len, sizeof want2);
    CHECK_MEM(sb.p, want2, sizeof want2);
    sb.len = 0;

    /* EXECUTE: [short bytes] id then the same parameters */
    cql_value_t one[] = {cql_text("a")};
    CHECK_INT(cql_encode_execute(&sb, 4, (const uint8_t *)"\x01\x02\x03", 3, one, 1, NULL,
                                 CQL_QUORUM, CQL_SERIAL),
              0);
    const uint8_t ex[] = {0x04, 0x00, 0x00, 0x04, 0x0a, 0x00, 0x00, 0x00, 0x11,
                          0x00, 0x03, 0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x00,
                          0x01, 0x00, 0x00, 0x00, 0x01, 'a',  0x00, 0x08};
    CHECK_INT(sb.len, sizeof ex);
    CHECK_MEM(sb.p, ex, sizeof ex);
    sb.len = 0;

    /* refused: a bad level, an int out of range; nothing is left behind */
    CHECK_INT(cql_encode_query(&sb, 1, "Q", NULL, 0, NULL, 42, CQL_SERIAL), CHAT_EINVAL);
    CHECK_INT(cql_encode_query(&sb, 1, "Q", NULL, 0, NULL, CQL_ONE, CQL_ONE), CHAT_EINVAL);
    cql_value_t big[] = {{.kind = CQL_V_INT, .i = 1LL << 40}};
    CHECK_INT(cql_encode_query(&sb, 1, "Q", big, 1, NULL, CQL_ONE, CQL_SERIAL), CHAT_ERANGE);
    CHECK_INT(sb.len, 0);
    sbuf_free(&sb);
}

/* BATCH (v4 section 4.1.7): <type><n>, per statement <kind=1><[short bytes] id><n><values>,
 * then <consistency><flags: a byte><serial>[<timestamp>]. */
static void test_encode_batch(void) {
    sbuf_t sb = {0};
    cql_value_t v[] = {cql_int(1), cql_text("a"), cql_int(2), cql_null()};
    CHECK_INT(cql_encode_batch(&sb, 3, CQL_BATCH_UNLOGGED, (const uint8_t *)"ID", 2, v, 2, 2, NULL,
                               CQL_LOCAL_QUORUM, CQL_SERIAL),
              0);
    const uint8_t want[] = {
        0x04, 0x00, 0x00, 0x03, 0x0d, 0x00, 0x00, 0x00, 0x2f, /* header: BATCH, 47 bytes */
        0x01,                                                 /* UNLOGGED */
        0x00, 0x02,                                           /* 2 statements */
        0x01, 0x00, 0x02, 'I',  'D',                          /* prepared, id "ID" */
        0x00, 0x02,                                           /* 2 values */
        0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x01,       /* int 1 */
        0x00, 0x00, 0x00, 0x01, 'a',                          /* text "a" */
        0x01, 0x00, 0x02, 'I',  'D',  0x00, 0x02,             /* the second statement */
        0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x02,       /* int 2 */
        0xff, 0xff, 0xff, 0xff,                               /* null */
        0x00, 0x06,                                           /* LOCAL_QUORUM */
        0x10,                                                 /* flags: serial */
        0x00, 0x08,                                           /* SERIAL */
    };
    CHECK_INT(sb.len, sizeof want);
    CHECK_MEM(sb.p, want, sizeof want);
    sb.len = 0;

    /* a logged batch of one statement without values, LOCAL_SERIAL, a default timestamp */
    cql_params_t p = CQL_PARAMS_DEFAULT;
    p.timestamp_us = 0x0102030405060708LL;
    p.page_size = 100; /* no meaning for a batch: not sent */
    CHECK_INT(cql_encode_batch(&sb, 1, CQL_BATCH_LOGGED, (const uint8_t *)"\x07", 1, NULL, 0, 1, &p,
                               CQL_ONE, CQL_LOCAL_SERIAL),
              0);
    const uint8_t want2[] = {
        0x04, 0x00, 0x00, 0x01, 0x0d, 0x00, 0x00, 0x00, 0x16, /* 22 bytes */
        0x00, 0x00, 0x01,                                     /* LOGGED, 1 statement */
        0x01, 0x00, 0x01, 0x07, 0x00, 0x00,                   /* id 07, no values */
        0x00, 0x01, 0x30, 0x00, 0x09,                         /* ONE, serial|timestamp */
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
    };
    CHECK_INT(sb.len, sizeof want2);
    CHECK_MEM(sb.p, want2, sizeof want2);
    sb.len = 0;

    /* refused, nothing left behind: no statement, a bad type or level, a value out of range */
    CHECK_INT(cql_encode_batch(&sb, 1, CQL_BATCH_UNLOGGED, (const uint8_t *)"ID", 2, v, 2, 0, NULL,
                               CQL_ONE, CQL_SERIAL),
              CHAT_EINVAL);
    CHECK_INT(
        cql_encode_batch(&sb, 1, 3, (const uint8_t *)"ID", 2, v, 2, 1, NULL, CQL_ONE, CQL_SERIAL),
        CHAT_EINVAL);
    CHECK_INT(cql_encode_batch(&sb, 1, CQL_BATCH_UNLOGGED, (const uint8_t *)"ID", 2, v, 2, 1, NULL,
                               CQL_ONE, CQL_ONE),
              CHAT_EINVAL);
    cql_value_t big[] = {cql_int(1), {.kind = CQL_V_INT, .i = 1LL << 40}};
    CHECK_INT(cql_encode_batch(&sb, 1, CQL_BATCH_UNLOGGED, (const uint8_t *)"ID", 2, big, 1, 2,
                               NULL, CQL_ONE, CQL_SERIAL),
              CHAT_ERANGE);
    CHECK_INT(sb.len, 0);
    sbuf_free(&sb);
}

static void test_consistency_names(void) {
    CHECK_STR(cql_consistency_name(CQL_LOCAL_QUORUM), "LOCAL_QUORUM");
    CHECK_STR(cql_consistency_name(CQL_ANY), "ANY");
    CHECK_STR(cql_consistency_name(99), "UNKNOWN");
    CHECK_INT(cql_consistency_parse("local_quorum"), 6);
    CHECK_INT(cql_consistency_parse("EACH_QUORUM"), 7);
    CHECK_INT(cql_consistency_parse("local_one"), 10);
    CHECK_INT(cql_consistency_parse("quorumx"), -1);
    CHECK_STR(cql_error_name(0x1100), "Write_timeout");
    CHECK_STR(cql_error_name(0x2500), "Unprepared");
    CHECK_STR(cql_error_name(0x7777), "Error");
}

/* ---- responses ------------------------------------------------------------------------------- */

static void test_decode_errors(void) {
    cql_response_t r;
    char msg[300];
    /* Unavailable: code, message, <cl><required><alive> */
    const uint8_t un[] = {0x84, 0,    0,    1,    0x00, 0,    0,    0,    0x15, 0x00,
                          0x00, 0x10, 0x00, 0x00, 0x05, 'n',  'o',  'd',  'e',  's',
                          0x00, 0x04, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01};
    CHECK_INT(decode(un, sizeof un, &r), 0);
    CHECK_INT(r.error.code, CQL_ERR_UNAVAILABLE);
    CHECK(str_is(r.error.message, "nodes"));
    CHECK_INT(r.error.consistency, CQL_QUORUM);
    CHECK_INT(r.error.required, 3);
    CHECK_INT(r.error.alive, 1);
    cql_error_format(&r, msg, sizeof msg);
    CHECK_STR(msg, "Unavailable (0x1000): nodes [consistency=QUORUM required=3 alive=1]");
    cql_response_free(&r);

    /* Write_timeout: <cl><received><blockfor><writeType> */
    const uint8_t wt[] = {0x84, 0,    0,    2,    0x00, 0,    0,    0,    0x19, 0x00, 0x00, 0x11,
                          0x00, 0x00, 0x01, 'w',  0x00, 0x06, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
                          0x00, 0x02, 0x00, 0x06, 'S',  'I',  'M',  'P',  'L',  'E'};
    CHECK_INT(decode(wt, sizeof wt, &r), 0);
    CHECK_INT(r.error.code, CQL_ERR_WRITE_TIMEOUT);
    CHECK_INT(r.error.received, 1);
    CHECK_INT(r.error.blockfor, 2);
    CHECK(str_is(r.error.write_type, "SIMPLE"));
    cql_error_format(&r, msg, sizeof msg);
    CHECK_STR(msg, "Write_timeout (0x1100): w [consistency=LOCAL_QUORUM received=1 blockfor=2 "
                   "failures=0 write_type=SIMPLE]");
    cql_response_free(&r);

    /* Read_timeout: <cl><received><blockfor><data_present> */
    const uint8_t rt[] = {0x84, 0,    0,    2,    0x00, 0,    0,    0,    0x11,
                          0x00, 0x00, 0x12, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00,
                          0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00};
    CHECK_INT(decode(rt, sizeof rt, &r), 0);
    CHECK_INT(r.error.code, CQL_ERR_READ_TIMEOUT);
    CHECK_INT(r.error.blockfor, 1);
    CHECK_INT(r.error.data_present, 0);
    cql_response_free(&r);

    /* Unprepared: [short bytes] id */
    const uint8_t up[] = {0x84, 0,    0,    3,    0x00, 0,   0,    0,    0x0b, 0x00,
                          0x00, 0x25, 0x00, 0x00, 0x01, '?', 0x00, 0x02, 0xde, 0xad};
    CHECK_INT(decode(up, sizeof up, &r), 0);
    CHECK_INT(r.error.code, CQL_ERR_UNPREPARED);
    CHECK_INT(r.error.unprepared_id.n, 2);
    CHECK_MEM(r.error.unprepared_id.p, "\xde\xad", 2);
    cql_response_free(&r);

    /* Already_exists: <ks><table> */
    const uint8_t ae[] = {0x84, 0,    0,    3,   0x00, 0,    0,   0,   0x0e, 0x00, 0x00, 0x24,
                          0x00, 0x00, 0x01, 'x', 0x00, 0x02, 'k', 's', 0x00, 0x01, 't'};
    CHECK_INT(decode(ae, sizeof ae, &r), 0);
    cql_error_format(&r, msg, sizeof msg);
    CHECK_STR(msg, "Already_exists (0x2400): x [keyspace=ks table=t]");
    cql_response_free(&r);

    /* Syntax error: no extra fields; Overloaded likewise */
    const uint8_t sy[] = {0x84, 0,    0,    3,    0x00, 0,    0,   0,   0x09,
                          0x00, 0x00, 0x20, 0x00, 0x00, 0x03, 'b', 'a', 'd'};
    CHECK_INT(decode(sy, sizeof sy, &r), 0);
    cql_error_format(&r, msg, sizeof msg);
    CHECK_STR(msg, "Syntax_error (0x2000): bad");
    cql_response_free(&r);
    const uint8_t ov[] = {0x84, 0, 0, 3, 0x00, 0, 0, 0, 0x06, 0x00, 0x00, 0x10, 0x01, 0x00, 0x00};
    CHECK_INT(decode(ov, sizeof ov, &r), 0);
    cql_error_format(&r, msg, sizeof msg);
    CHECK_STR(msg, "Overloaded (0x1001): ");
    cql_response_free(&r);
}

/* RESULT Rows: global table spec ks.t, columns (k text, n bigint, l list<int>,
 * m map<text,bigint>, u udt, tp tuple<int,boolean>), two rows, a paging state. */
static const uint8_t ROWS_FRAME[] = {
    0x84,
    0x00,
    0x00,
    0x07,
    0x08,
    0x00,
    0x00,
    0x00,
    0xb0,
    0x00,
    0x00,
    0x00,
    0x02, /* kind: Rows */
    0x00,
    0x00,
    0x00,
    0x03, /* flags: global spec, has more pages */
    0x00,
    0x00,
    0x00,
    0x06, /* 6 columns */
    0x00,
    0x00,
    0x00,
    0x03,
    0x01,
    0x02,
    0x03, /* paging state */
    0x00,
    0x02,
    'k',
    's',
    0x00,
    0x01,
    't', /* keyspace, table */
    0x00,
    0x01,
    'k',
    0x00,
    0x0d, /* k varchar */
    0x00,
    0x01,
    'n',
    0x00,
    0x02, /* n bigint */
    0x00,
    0x01,
    'l',
    0x00,
    0x20,
    0x00,
    0x09, /* l list<int> */
    0x00,
    0x01,
    'm',
    0x00,
    0x21,
    0x00,
    0x0d,
    0x00,
    0x02, /* m map<varchar, bigint> */
    0x00,
    0x01,
    'u',
    0x00,
    0x30,
    0x00,
    0x02,
    'k',
    's',
    0x00,
    0x02,
    'u',
    't',
    0x00,
    0x02,
    0x00,
    0x01,
    'a',
    0x00,
    0x09,
    0x00,
    0x01,
    'b',
    0x00,
    0x0d, /* u udt ks.ut {a int, b text} */
    0x00,
    0x02,
    't',
    'p',
    0x00,
    0x31,
    0x00,
    0x02,
    0x00,
    0x09,
    0x00,
    0x04, /* tuple<int,bool> */
    0x00,
    0x00,
    0x00,
    0x02, /* 2 rows */
    /* row 0 */
    0x00,
    0x00,
    0x00,
    0x02,
    'h',
    'i',
    0x00,
    0x00,
    0x00,
    0x08,
    0x00,
    0x00,
    0x00,
    0x00,
    0x00,
    0x00,
    0x01,
    0x00,
    0x00,
    0x00,
    0x00,
    0x0c,
    0x00,
    0x00,
    0x00,
    0x01,
    0x00,
    0x00,
    0x00,
    0x04,
    0x00,
    0x00,
    0x00,
    0x05,
    0xff,
    0xff,
    0xff,
    0xff,
    0x00,
    0x00,
    0x00,
    0x00,
    0x00,
    0x00,
    0x00,
    0x0d,
    0x00,
    0x00,
    0x00,
    0x04,
    0x00,
    0x00,
    0x00,
    0x01,
    0x00,
    0x00,
    0x00,
    0x01,
    0x01,
    /* row 1: k empty, the 5 others null */
    0x00,
    0x00,
    0x00,
    0x00,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
};

static void test_decode_rows(void) {
    cql_response_t r;
    CHECK_INT(sizeof ROWS_FRAME, 9 + 0xb0);
    CHECK_INT(decode(ROWS_FRAME, sizeof ROWS_FRAME, &r), 0);
    CHECK_INT(r.kind, CQL_RESULT_ROWS);
    CHECK_INT(r.rows.n_cols, 6);
    CHECK_INT(r.rows.n_rows, 2);
    CHECK_INT(r.rows.paging_state.n, 3);
    CHECK_MEM(r.rows.paging_state.p, "\x01\x02\x03", 3);
    CHECK(str_is(r.rows.cols[0].keyspace, "ks"));
    CHECK(str_is(r.rows.cols[5].table, "t"));
    CHECK(str_is(r.rows.cols[5].name, "tp"));
    CHECK_INT(r.rows.cols[0].type, CQL_T_VARCHAR);
    CHECK_INT(r.rows.cols[2].type, CQL_T_LIST);
    CHECK_INT(r.rows.cols[3].type, CQL_T_MAP);
    CHECK_INT(r.rows.cols[4].type, CQL_T_UDT);
    CHECK_INT(r.rows.cols[5].type, CQL_T_TUPLE);
    CHECK_INT(cql_rows_col(&r.rows, "n"), 1);
    CHECK_INT(cql_rows_col(&r.rows, "nope"), -1);

    cql_str_t s;
    CHECK_INT(cql_cell_text(cql_rows_cell(&r.rows, 0, 0), &s), 0);
    CHECK(str_is(s, "hi"));
    int64_t n;
    CHECK_INT(cql_cell_bigint(cql_rows_cell(&r.rows, 0, 1), &n), 0);
    CHECK_INT(n, 256);
    CHECK_INT(cql_rows_cell(&r.rows, 0, 2)->n, 12); /* a list stays opaque bytes */
    CHECK_INT(cql_rows_cell(&r.rows, 0, 3)->n, -1);
    CHECK_INT(cql_rows_cell(&r.rows, 0, 4)->n, 0); /* empty, not null */
    /* row 1: empty text, nulls */
    CHECK_INT(cql_cell_text(cql_rows_cell(&r.rows, 1, 0), &s), 0);
    CHECK_INT(s.n, 0);
    CHECK_INT(cql_cell_bigint(cql_rows_cell(&r.rows, 1, 1), &n), CHAT_ENOTFOUND);
    char *dup = (char *)1;
    CHECK_INT(cql_cell_strdup(cql_rows_cell(&r.rows, 1, 1), &dup), 0);
    CHECK(dup == NULL);
    CHECK_INT(cql_cell_strdup(cql_rows_cell(&r.rows, 0, 0), &dup), 0);
    CHECK_STR(dup, "hi");
    free(dup);
    /* wrong sizes for the type */
    int32_t i32;
    bool b;
    CHECK_INT(cql_cell_int(cql_rows_cell(&r.rows, 0, 1), &i32), CHAT_EPROTO);
    CHECK_INT(cql_cell_bool(cql_rows_cell(&r.rows, 0, 0), &b), CHAT_EPROTO);
    uint8_t u[16];
    CHECK_INT(cql_cell_uuid(cql_rows_cell(&r.rows, 0, 0), u), CHAT_EPROTO);
    cql_response_free(&r);

    /* every strict prefix of the body is malformed, never a crash or an over-read */
    for (size_t cut = 9; cut < sizeof ROWS_FRAME; cut++) {
        cql_header_t h;
        CHECK_INT(cql_header_decode(ROWS_FRAME, 9, &h), 0);
        int rc = cql_response_decode(&r, &h, ROWS_FRAME + 9, cut - 9);
        if (rc != CHAT_EPROTO) {
            fprintf(stderr, "  prefix %zu decoded with %d\n", cut, rc);
            CHECK(0);
        }
    }
}

static void test_decode_rows_variants(void) {
    cql_response_t r;
    /* per-column specs (no global flag), one int column, one row; no metadata */
    const uint8_t f[] = {0x84, 0,    0,    1,    0x08, 0,    0,    0,    0x23, 0x00, 0x00,
                         0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00,
                         0x01, 'a',  0x00, 0x01, 'b',  0x00, 0x01, 'c',  0x00, 0x09, 0x00,
                         0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x04, 0xff, 0xff, 0xff, 0xfe};
    CHECK_INT(decode(f, sizeof f, &r), 0);
    CHECK(str_is(r.rows.cols[0].keyspace, "a"));
    CHECK(str_is(r.rows.cols[0].table, "b"));
    CHECK(str_is(r.rows.cols[0].name, "c"));
    CHECK_INT(r.rows.paging_state.n, -1);
    int32_t v;
    CHECK_INT(cql_cell_int(cql_rows_cell(&r.rows, 0, 0), &v), 0);
    CHECK_INT(v, -2);
    cql_response_free(&r);

    /* No_metadata: flags 4, 2 columns, no specs, 0 rows */
    const uint8_t nm[] = {0x84, 0,    0,    1,    0x08, 0,    0,    0,    0x10,
                          0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x04, 0x00,
                          0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00};
    CHECK_INT(decode(nm, sizeof nm, &r), 0);
    CHECK(r.rows.cols == NULL);
    CHECK_INT(r.rows.n_cols, 2);
    CHECK_INT(r.rows.n_rows, 0);
    CHECK_INT(cql_rows_col(&r.rows, "x"), -1);
    cql_response_free(&r);

    /* a hostile row count: 2^31-1 rows of 2 columns in a few bytes, refused before malloc */
    const uint8_t hostile[] = {0x84, 0,    0,    1,    0x08, 0,    0,    0,    0x14, 0x00,
                               0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00,
                               0x02, 0x7f, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00};
    CHECK_INT(decode(hostile, sizeof hostile, &r), CHAT_EPROTO);
    /* negative counts */
    const uint8_t neg[] = {0x84, 0,    0,    1,    0x08, 0,    0,    0,    0x10,
                           0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x04, 0xff,
                           0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00};
    CHECK_INT(decode(neg, sizeof neg, &r), CHAT_EPROTO);
    /* types nested deeper than we accept: list<list<...>> 20 deep */
    uint8_t deep[9 + 4 + 4 + 4 + 4 + 40 + 2 + 4];
    size_t k = 0;
    uint8_t body[128];
    const uint8_t pre[] = {0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 'k', 0, 1, 't', 0, 1, 'c'};
    memcpy(body, pre, sizeof pre);
    k = sizeof pre;
    for (int i = 0; i < 20; i++) {
        body[k++] = 0x00;
        body[k++] = 0x20;
    }
    body[k++] = 0x00;
    body[k++] = 0x09;
    memcpy(body + k, "\0\0\0\0", 4);
    k += 4;
    cql_header_t h = {.version = 0x84, .opcode = CQL_OP_RESULT, .length = (uint32_t)k};
    (void)deep;
    CHECK_INT(cql_response_decode(&r, &h, body, k), CHAT_EPROTO);
    /* compressed bodies are refused: we never ask for compression */
    h.flags = CQL_FLAG_COMPRESSION;
    h.length = 4;
    CHECK_INT(cql_response_decode(&r, &h, (const uint8_t *)"\0\0\0\1", 4), CHAT_EPROTO);
}

static void test_decode_other_results(void) {
    cql_response_t r;
    const uint8_t vd[] = {0x84, 0, 0, 1, 0x08, 0, 0, 0, 0x04, 0, 0, 0, 1};
    CHECK_INT(decode(vd, sizeof vd, &r), 0);
    CHECK_INT(r.kind, CQL_RESULT_VOID);
    cql_response_free(&r);

    const uint8_t sk[] = {0x84, 0, 0, 1, 0x08, 0, 0, 0, 0x09, 0, 0, 0, 3, 0, 3, 'c', 'h', 't'};
    CHECK_INT(decode(sk, sizeof sk, &r), 0);
    CHECK_INT(r.kind, CQL_RESULT_SET_KEYSPACE);
    CHECK(str_is(r.keyspace, "cht"));
    cql_response_free(&r);

    /* Prepared: id, metadata (global spec, 2 binds, 1 pk index), result metadata (none) */
    const uint8_t pp[] = {0x84, 0,    0,    1,    0x08, 0,    0,    0,    0x34, 0,    0,    0,
                          4,    0x00, 0x02, 0xab, 0xcd, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
                          0x02, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 'k',  0x00, 0x01,
                          't',  0x00, 0x01, 'a',  0x00, 0x0d, 0x00, 0x01, 'b',  0x00, 0x02, 0x00,
                          0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
    CHECK_INT(decode(pp, sizeof pp, &r), -100); /* length check of the test itself */
    cql_header_t h;
    CHECK_INT(cql_header_decode(pp, 9, &h), 0);
    h.length = sizeof pp - 9;
    CHECK_INT(cql_response_decode(&r, &h, pp + 9, h.length), 0);
    CHECK_INT(r.kind, CQL_RESULT_PREPARED);
    CHECK_INT(r.prepared.id.n, 2);
    CHECK_MEM(r.prepared.id.p, "\xab\xcd", 2);
    CHECK_INT(r.prepared.n_binds, 2);
    CHECK_INT(r.prepared.n_pk, 1);
    CHECK(str_is(r.prepared.binds[1].name, "b"));
    CHECK_INT(r.prepared.binds[1].type, CQL_T_BIGINT);
    CHECK_INT(r.rows.flags, 4);
    cql_response_free(&r);

    /* Schema_change: KEYSPACE has one name, TABLE two */
    const uint8_t sc1[] = {0x84, 0,   0,   1,   0x08, 0,   0,   0,   0x1b, 0,   0,   0,
                           5,    0,   7,   'C', 'R',  'E', 'A', 'T', 'E',  'D', 0,   8,
                           'K',  'E', 'Y', 'S', 'P',  'A', 'C', 'E', 0,    2,   'k', 's'};
    CHECK_INT(decode(sc1, sizeof sc1, &r), 0);
    CHECK(str_is(r.schema_change.change, "CREATED"));
    CHECK(str_is(r.schema_change.target, "KEYSPACE"));
    CHECK(str_is(r.schema_change.keyspace, "ks"));
    CHECK_INT(r.schema_change.name.n, 0);
    cql_response_free(&r);
    const uint8_t sc2[] = {0x84, 0,   0,   1,   0x08, 0,   0,   0,   0x1b, 0,   0, 0,
                           5,    0,   7,   'U', 'P',  'D', 'A', 'T', 'E',  'D', 0, 5,
                           'T',  'A', 'B', 'L', 'E',  0,   2,   'k', 's',  0,   1, 't'};
    CHECK_INT(decode(sc2, sizeof sc2, &r), 0);
    CHECK(str_is(r.schema_change.target, "TABLE"));
    CHECK(str_is(r.schema_change.name, "t"));
    cql_response_free(&r);

    /* an unknown result kind is malformed */
    const uint8_t uk[] = {0x84, 0, 0, 1, 0x08, 0, 0, 0, 0x04, 0, 0, 0, 9};
    CHECK_INT(decode(uk, sizeof uk, &r), CHAT_EPROTO);
}

static void test_decode_setup_messages(void) {
    cql_response_t r;
    /* SUPPORTED: {CQL_VERSION: [3.4.7], COMPRESSION: [lz4, snappy]} */
    const uint8_t su[] = {0x84, 0,   0,   0,   0x06, 0,   0,   0,   0x34, 0,   2,   0,   11,
                          'C',  'Q', 'L', '_', 'V',  'E', 'R', 'S', 'I',  'O', 'N', 0,   1,
                          0,    5,   '3', '.', '4',  '.', '7', 0,   11,   'C', 'O', 'M', 'P',
                          'R',  'E', 'S', 'S', 'I',  'O', 'N', 0,   2,    0,   3,   'l', 'z',
                          '4',  0,   6,   's', 'n',  'a', 'p', 'p', 'y'};
    CHECK_INT(decode(su, sizeof su, &r), 0);
    CHECK_INT(r.n_supported, 2);
    CHECK(str_is(r.supported[0].key, "CQL_VERSION"));
    CHECK_INT(r.supported[1].n_vals, 2);
    CHECK(str_is(r.supported[1].vals[1], "snappy"));
    cql_response_free(&r);

    const uint8_t au[] = {0x84, 0, 0, 0, 0x03, 0, 0, 0, 0x05, 0, 3, 'P', 'w', 'A'};
    CHECK_INT(decode(au, sizeof au, &r), 0);
    CHECK(str_is(r.authenticator, "PwA"));
    cql_response_free(&r);

    const uint8_t as[] = {0x84, 0, 0, 0, 0x10, 0, 0, 0, 0x04, 0xff, 0xff, 0xff, 0xff};
    CHECK_INT(decode(as, sizeof as, &r), 0);
    CHECK_INT(r.token.n, -1);
    cql_response_free(&r);

    const uint8_t rd[] = {0x84, 0, 0, 0, 0x02, 0, 0, 0, 0};
    CHECK_INT(decode(rd, sizeof rd, &r), 0);
    CHECK_INT(r.hdr.opcode, CQL_OP_READY);
    cql_response_free(&r);

    /* tracing id, then warnings, then the body */
    const uint8_t tw[] = {0x84, 0x0a, 0, 1, 0x08, 0,   0,   0,   0x1b, 1,  2,  3,
                          4,    5,    6, 7, 8,    9,   10,  11,  12,   13, 14, 15,
                          16,   0,    1, 0, 3,    'w', 'a', 'r', 0,    0,  0,  1};
    CHECK_INT(decode(tw, sizeof tw, &r), 0);
    CHECK(r.has_tracing);
    CHECK_INT(r.tracing_id[15], 16);
    CHECK_INT(r.n_warnings, 1);
    CHECK(str_is(r.warnings[0], "war"));
    CHECK_INT(r.kind, CQL_RESULT_VOID);
    cql_response_free(&r);

    /* a request opcode in a response is malformed */
    const uint8_t bad[] = {0x84, 0, 0, 0, 0x07, 0, 0, 0, 0};
    CHECK_INT(decode(bad, sizeof bad, &r), CHAT_EPROTO);
}

/* ---- the fake server ------------------------------------------------------------------------- */

#define FAKE_MAX_REQS 4096

typedef struct freq {
    int conn;
    int16_t stream;
    uint8_t opcode;
    uint8_t *body;
    uint32_t len;
} freq_t;

typedef struct fake fake_t;

typedef struct fconn {
    fake_t *f;
    uv_tcp_t tcp;
    uint8_t buf[1 << 16];
    size_t len;
    int idx;
    bool closed;
} fconn_t;

/* What the script does with each request; return true if it answered (else it is kept). */
typedef bool (*fake_fn)(fake_t *f, freq_t *q);

struct fake {
    uv_loop_t *loop;
    uv_tcp_t server;
    int port;
    fconn_t *conns[32];
    int n_conns;
    freq_t reqs[FAKE_MAX_REQS]; /* every request seen, in order */
    int n_reqs;
    freq_t *held[FAKE_MAX_REQS]; /* requests not answered yet */
    int n_held, max_held;
    fake_fn script;
    const char *need_auth; /* PLAIN token expected, NULL: no auth */
    size_t need_auth_len;
    int n_prepares, n_executes, n_queries, n_batches;
    bool unprepare_next; /* answer the next EXECUTE or BATCH with UNPREPARED */
    int schema_rounds;   /* agreement answers with two versions this many times */
};

static void on_fake_closed(uv_handle_t *h) { free(h->data); }

static void fake_send(fake_t *f, int conn, int16_t stream, uint8_t op, const void *body, size_t n) {
    fconn_t *c = f->conns[conn];
    if (!c || c->closed) return;
    uint8_t *frame = malloc(9 + n);
    cql_header_t h = {.version = 0x84, .stream = stream, .opcode = op, .length = (uint32_t)n};
    cql_header_encode(frame, &h);
    if (n) memcpy(frame + 9, body, n);
    uv_buf_t b = uv_buf_init((char *)frame, (unsigned)(9 + n));
    int rc = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (rc != (int)(9 + n)) fprintf(stderr, "fake: short write %d\n", rc);
    free(frame);
}

static void fake_hangup(fake_t *f, int conn) {
    fconn_t *c = f->conns[conn];
    if (!c || c->closed) return;
    c->closed = true;
    f->conns[conn] = NULL;
    uv_close((uv_handle_t *)&c->tcp, on_fake_closed);
}

static void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void fake_void(fake_t *f, freq_t *q) {
    const uint8_t b[] = {0, 0, 0, 1};
    fake_send(f, q->conn, q->stream, CQL_OP_RESULT, b, 4);
}

/* One row, one varchar column "v" holding s. */
static void fake_row(fake_t *f, freq_t *q, const char *s) {
    uint8_t b[512];
    size_t n = strlen(s), k = 0;
    const uint8_t meta[] = {0,   0, 0, 2,   0, 0, 0,   1, 0,    0, 0, 1, 0, 1,
                            'k', 0, 1, 't', 0, 1, 'v', 0, 0x0d, 0, 0, 0, 1};
    memcpy(b, meta, sizeof meta);
    k = sizeof meta;
    put32(b + k, (uint32_t)n);
    k += 4;
    memcpy(b + k, s, n);
    k += n;
    fake_send(f, q->conn, q->stream, CQL_OP_RESULT, b, k);
}

static void fake_error(fake_t *f, freq_t *q, uint32_t code, const char *msg) {
    uint8_t b[256];
    size_t n = strlen(msg);
    put32(b, code);
    b[4] = (uint8_t)(n >> 8);
    b[5] = (uint8_t)n;
    memcpy(b + 6, msg, n);
    size_t k = 6 + n;
    if (code == CQL_ERR_UNPREPARED) {
        b[k++] = 0;
        b[k++] = 2;
        b[k++] = 'I';
        b[k++] = 'D';
    }
    fake_send(f, q->conn, q->stream, CQL_OP_ERROR, b, k);
}

/* The query text of a QUERY request (a view into its body). */
static cql_str_t q_text(const freq_t *q) {
    cql_str_t s = {"", 0};
    if (q->opcode == CQL_OP_QUERY || q->opcode == CQL_OP_PREPARE) {
        uint32_t n = (uint32_t)q->body[0] << 24 | (uint32_t)q->body[1] << 16 |
                     (uint32_t)q->body[2] << 8 | q->body[3];
        s = (cql_str_t){(const char *)q->body + 4, n};
    }
    return s;
}

static bool q_is(const freq_t *q, const char *prefix) {
    cql_str_t s = q_text(q);
    return s.n >= strlen(prefix) && memcmp(s.p, prefix, strlen(prefix)) == 0;
}

/* The setup conversation and the common answers; tests override via f->script. */
static void fake_handle(fake_t *f, freq_t *q) {
    if (q->opcode == CQL_OP_OPTIONS) {
        const uint8_t b[] = {0,   1,   0,   11, 'C', 'Q', 'L', '_', 'V', 'E', 'R', 'S',
                             'I', 'O', 'N', 0,  1,   0,   5,   '3', '.', '4', '.', '7'};
        fake_send(f, q->conn, q->stream, CQL_OP_SUPPORTED, b, sizeof b);
        return;
    }
    if (q->opcode == CQL_OP_STARTUP) {
        if (f->need_auth) {
            const uint8_t b[] = {0, 3, 'P', 'w', 'A'};
            fake_send(f, q->conn, q->stream, CQL_OP_AUTHENTICATE, b, sizeof b);
        } else {
            fake_send(f, q->conn, q->stream, CQL_OP_READY, NULL, 0);
        }
        return;
    }
    if (q->opcode == CQL_OP_AUTH_RESPONSE) {
        uint32_t n = (uint32_t)q->body[0] << 24 | (uint32_t)q->body[1] << 16 |
                     (uint32_t)q->body[2] << 8 | q->body[3];
        if (n == f->need_auth_len && memcmp(q->body + 4, f->need_auth, n) == 0) {
            const uint8_t b[] = {0xff, 0xff, 0xff, 0xff};
            fake_send(f, q->conn, q->stream, CQL_OP_AUTH_SUCCESS, b, 4);
        } else {
            fake_error(f, q, CQL_ERR_AUTH, "Provided username and/or password are incorrect");
        }
        return;
    }
    if (q->opcode == CQL_OP_PREPARE) {
        f->n_prepares++;
        /* id "ID", no binds, no result metadata */
        const uint8_t b[] = {0, 0, 0, 4, 0, 2, 'I', 'D', 0, 0, 0, 0, 0, 0,
                             0, 0, 0, 0, 0, 0, 0,   0,   0, 4, 0, 0, 0, 0};
        fake_send(f, q->conn, q->stream, CQL_OP_RESULT, b, sizeof b);
        return;
    }
    if (q->opcode == CQL_OP_EXECUTE || q->opcode == CQL_OP_BATCH) {
        if (q->opcode == CQL_OP_EXECUTE) f->n_executes++;
        if (q->opcode == CQL_OP_BATCH) f->n_batches++;
        if (f->unprepare_next) {
            f->unprepare_next = false;
            fake_error(f, q, CQL_ERR_UNPREPARED, "unknown id");
            return;
        }
    }
    if (q->opcode == CQL_OP_QUERY && q->stream == 0 && q_is(q, "USE ")) {
        /* Set_keyspace with the quoted name the client sent, unquoted */
        cql_str_t t = q_text(q);
        uint8_t b[128] = {0, 0, 0, 3};
        size_t n = t.n - 6; /* USE "x" */
        b[4] = 0;
        b[5] = (uint8_t)n;
        memcpy(b + 6, t.p + 5, n);
        fake_send(f, q->conn, q->stream, CQL_OP_RESULT, b, 6 + n);
        return;
    }
    if (q->opcode == CQL_OP_QUERY) f->n_queries++;
    if (q->opcode == CQL_OP_QUERY && q_is(q, "SELECT schema_version FROM system.local")) {
        /* one uuid column schema_version */
        uint8_t b[64];
        const uint8_t meta[] = {0,   0,   0,    2,   0,   0,   0,   1,   0,   0,   0,
                                1,   0,   1,    's', 0,   1,   'l', 0,   14,  's', 'c',
                                'h', 'e', 'm',  'a', '_', 'v', 'e', 'r', 's', 'i', 'o',
                                'n', 0,   0x0c, 0,   0,   0,   1,   0,   0,   0,   16};
        memcpy(b, meta, sizeof meta);
        memset(b + sizeof meta, 0x11, 16);
        fake_send(f, q->conn, q->stream, CQL_OP_RESULT, b, sizeof meta + 16);
        return;
    }
    if (q->opcode == CQL_OP_QUERY && q_is(q, "SELECT peer, schema_version FROM system.peers")) {
        uint8_t b[64];
        const uint8_t meta[] = {0,   0,   0,    2,   0,   0,   0,   1,   0,   0,   0,
                                1,   0,   1,    's', 0,   1,   'p', 0,   14,  's', 'c',
                                'h', 'e', 'm',  'a', '_', 'v', 'e', 'r', 's', 'i', 'o',
                                'n', 0,   0x0c, 0,   0,   0,   1,   0,   0,   0,   16};
        memcpy(b, meta, sizeof meta);
        /* a peer that has not caught up yet, for schema_rounds answers */
        memset(b + sizeof meta, f->schema_rounds > 0 ? 0x22 : 0x11, 16);
        if (f->schema_rounds > 0) f->schema_rounds--;
        fake_send(f, q->conn, q->stream, CQL_OP_RESULT, b, sizeof meta + 16);
        return;
    }
    if (f->script && f->script(f, q)) return;
    if (f->n_held < FAKE_MAX_REQS) f->held[f->n_held++] = q;
    if (f->n_held > f->max_held) f->max_held = f->n_held;
}

static void fake_alloc(uv_handle_t *h, size_t sug, uv_buf_t *b) {
    fconn_t *c = h->data;
    *b = uv_buf_init((char *)c->buf + c->len, (unsigned)(sizeof c->buf - c->len));
}

static void fake_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b) {
    fconn_t *c = st->data;
    fake_t *f = c->f;
    if (n < 0) {
        fake_hangup(f, c->idx);
        return;
    }
    c->len += (size_t)n;
    size_t off = 0;
    while (c->len - off >= 9) {
        uint8_t *p = c->buf + off;
        uint32_t len = (uint32_t)p[5] << 24 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 8 | p[8];
        if (c->len - off < 9 + len) break;
        if (p[0] != 0x04 || f->n_reqs == FAKE_MAX_REQS) {
            fprintf(stderr, "fake: bad request version 0x%02x\n", p[0]);
            fake_hangup(f, c->idx);
            return;
        }
        freq_t *q = &f->reqs[f->n_reqs++];
        q->conn = c->idx;
        q->stream = (int16_t)((uint16_t)p[2] << 8 | p[3]);
        q->opcode = p[4];
        q->len = len;
        q->body = malloc(len ? len : 1);
        memcpy(q->body, p + 9, len);
        off += 9 + len;
        fake_handle(f, q);
        if (!f->conns[c->idx]) return; /* the script hung up */
    }
    memmove(c->buf, c->buf + off, c->len - off);
    c->len -= off;
}

static void fake_accept(uv_stream_t *srv, int status) {
    fake_t *f = srv->data;
    fconn_t *c = calloc(1, sizeof *c);
    c->f = f;
    c->idx = f->n_conns++;
    f->conns[c->idx] = c;
    uv_tcp_init(f->loop, &c->tcp);
    c->tcp.data = c;
    uv_accept(srv, (uv_stream_t *)&c->tcp);
    uv_read_start((uv_stream_t *)&c->tcp, fake_alloc, fake_read);
}

static void fake_start(fake_t *f, uv_loop_t *loop) {
    memset(f, 0, sizeof *f);
    f->loop = loop;
    uv_tcp_init(loop, &f->server);
    f->server.data = f;
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_tcp_bind(&f->server, (const struct sockaddr *)&a, 0);
    uv_listen((uv_stream_t *)&f->server, 16, fake_accept);
    struct sockaddr_in got;
    int len = sizeof got;
    uv_tcp_getsockname(&f->server, (struct sockaddr *)&got, &len);
    f->port = ntohs(got.sin_port);
}

static void fake_stop(fake_t *f) {
    for (int i = 0; i < f->n_conns; i++) fake_hangup(f, i);
    uv_close((uv_handle_t *)&f->server, NULL);
    for (int i = 0; i < f->n_reqs; i++) free(f->reqs[i].body);
}

/* ---- client test plumbing ------------------------------------------------------------------ */

typedef struct got {
    int n;
    int status[1100];
    int code[1100];
    char msg[1100][200];
    char val[1100][64];
    int kind[1100];
} got_t;

static got_t G;

static void on_res(const cql_result_t *res, void *data) {
    int i = (int)(intptr_t)data;
    G.n++;
    G.status[i] = res->status;
    G.code[i] = res->error_code;
    snprintf(G.msg[i], sizeof G.msg[i], "%s", res->message ? res->message : "");
    G.val[i][0] = '\0';
    G.kind[i] = res->resp ? res->resp->kind : -1;
    if (res->status == 0 && res->resp && res->resp->kind == CQL_RESULT_ROWS &&
        res->resp->rows.n_rows > 0) {
        cql_str_t s;
        if (cql_cell_text(cql_rows_cell(&res->resp->rows, 0, 0), &s) == 0) {
            snprintf(G.val[i], sizeof G.val[i], "%.*s", (int)s.n, s.p);
        }
    }
}

typedef struct ready {
    bool done;
    int status;
    char msg[300];
} ready_t;

static void on_ready(const cql_result_t *res, void *data) {
    ready_t *r = data;
    r->done = true;
    r->status = res->status;
    snprintf(r->msg, sizeof r->msg, "%s", res->message ? res->message : "");
}

static void on_closed(void *arg) { *(bool *)arg = true; }

/* Run the loop until cond or 5 s. */
#define RUN_UNTIL(loop, cond)                                                   \
    do {                                                                        \
        uint64_t t0_ = uv_now(loop);                                            \
        while (!(cond) && uv_now(loop) - t0_ < 5000) uv_run(loop, UV_RUN_ONCE); \
    } while (0)

static cql_client_t *client_for(fake_t *f, uv_loop_t *loop, cql_client_opts_t *o, ready_t *rd) {
    static char host[64];
    static const char *hosts[1];
    snprintf(host, sizeof host, "127.0.0.1:%d", f->port);
    hosts[0] = host;
    o->hosts = hosts;
    o->n_hosts = 1;
    if (!o->conns_per_host) o->conns_per_host = 1;
    cql_client_t *c = NULL;
    if (cql_client_new(&c, loop, o) != 0) return NULL;
    cql_client_on_ready(c, on_ready, rd);
    RUN_UNTIL(loop, rd->done);
    return c;
}

static void close_all(uv_loop_t *loop, cql_client_t *c, fake_t *f) {
    bool closed = false;
    if (c) cql_client_close(c, on_closed, &closed);
    RUN_UNTIL(loop, closed || !c);
    fake_stop(f);
    uv_run(loop, UV_RUN_DEFAULT);
}

#define OPTS() ((cql_client_opts_t){.consistency = -1, .serial_consistency = -1})

/* ---- client tests -------------------------------------------------------------------------- */

static void test_client_setup_and_defaults(void) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    fake_t f;
    fake_start(&f, &loop);
    cql_client_opts_t o = OPTS();
    ready_t rd = {0};
    cql_client_t *c = client_for(&f, &loop, &o, &rd);
    CHECK(c != NULL);
    CHECK(rd.done);
    CHECK_INT(rd.status, 0);
    /* OPTIONS first, then STARTUP with exactly {CQL_VERSION: 3.0.0}, on stream 0 */
    CHECK(f.n_reqs >= 2);
    CHECK_INT(f.reqs[0].opcode, CQL_OP_OPTIONS);
    CHECK_INT(f.reqs[0].len, 0);
    CHECK_INT(f.reqs[1].opcode, CQL_OP_STARTUP);
    CHECK_INT(f.reqs[1].stream, 0);
    CHECK_INT(f.reqs[1].len, 22);
    CHECK_MEM(f.reqs[1].body,
              "\x00\x01\x00\x0b"
              "CQL_VERSION"
              "\x00\x05"
              "3.0.0",
              22);

    memset(&G, 0, sizeof G);
    CHECK_INT(cql_query(c, "SELECT 1", NULL, 0, NULL, on_res, (void *)0), 0);
    cql_params_t p = CQL_PARAMS_DEFAULT;
    p.consistency = CQL_ONE;
    p.serial_consistency = CQL_LOCAL_SERIAL;
    CHECK_INT(cql_query(c, "SELECT 2", NULL, 0, &p, on_res, (void *)1), 0);
    CHECK_INT(G.n, 0); /* never called inside the submit */
    RUN_UNTIL(&loop, f.n_held == 2);
    CHECK_INT(f.n_held, 2);
    /* [long string] "SELECT 1", LOCAL_QUORUM by default, flags 0x10, SERIAL */
    CHECK_INT(f.held[0]->len, 4 + 8 + 2 + 1 + 2);
    CHECK_MEM(f.held[0]->body + 12, "\x00\x06\x10\x00\x08", 5);
    CHECK_MEM(f.held[1]->body + 12, "\x00\x01\x10\x00\x09", 5);
    CHECK(f.held[0]->stream > 0);
    CHECK(f.held[1]->stream > 0 && f.held[1]->stream != f.held[0]->stream);
    fake_void(&f, f.held[0]);
    fake_void(&f, f.held[1]);
    RUN_UNTIL(&loop, G.n == 2);
    CHECK_INT(G.status[0], 0);
    CHECK_INT(G.kind[0], CQL_RESULT_VOID);
    CHECK_INT(G.status[1], 0);
    close_all(&loop, c, &f);
    CHECK_INT(uv_loop_close(&loop), 0);
}

/* Hold every request: the test answers them itself. */
static bool script_hold(fake_t *f, freq_t *q) { return false; }

static void test_client_out_of_order_and_many_in_flight(void) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    fake_t f;
    fake_start(&f, &loop);
    f.script = script_hold;
    cql_client_opts_t o = OPTS();
    ready_t rd = {0};
    cql_client_t *c = client_for(&f, &loop, &o, &rd);
    CHECK(c && rd.status == 0);
    memset(&G, 0, sizeof G);
    enum { N = 1000 };
    char q[32];
    for (int i = 0; i < N; i++) {
        snprintf(q, sizeof q, "Q%d", i);
        CHECK_INT(cql_query(c, q, NULL, 0, NULL, on_res, (void *)(intptr_t)i), 0);
    }
    RUN_UNTIL(&loop, f.n_held == N);
    /* all of them on the wire at once, on one connection, each on its own stream */
    CHECK_INT(f.n_held, N);
    CHECK_INT(f.max_held, N);
    static bool seen[CQL_MAX_STREAMS];
    memset(seen, 0, sizeof seen);
    for (int i = 0; i < N; i++) {
        CHECK(!seen[f.held[i]->stream]);
        seen[f.held[i]->stream] = true;
    }
    /* answer in reverse order, each with its own query text: matched by stream id */
    for (int i = N - 1; i >= 0; i--) {
        cql_str_t t = q_text(f.held[i]);
        char s[32];
        snprintf(s, sizeof s, "%.*s", (int)t.n, t.p);
        fake_row(&f, f.held[i], s);
    }
    f.n_held = 0;
    RUN_UNTIL(&loop, G.n == N);
    CHECK_INT(G.n, N);
    for (int i = 0; i < N; i++) {
        snprintf(q, sizeof q, "Q%d", i);
        CHECK_INT(G.status[i], 0);
        CHECK_STR(G.val[i], q);
    }
    cql_client_stats_t st;
    cql_client_stats(c, &st);
    CHECK_INT(st.requests, N);
    CHECK_INT(st.errors, 0);
    CHECK_INT(st.in_flight, 0);
    close_all(&loop, c, &f);
    CHECK_INT(uv_loop_close(&loop), 0);
}

static bool script_answer_void(fake_t *f, freq_t *q) {
    fake_void(f, q);
    return true;
}

static void test_client_prepare_and_reprepare(void) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    fake_t f;
    fake_start(&f, &loop);
    f.script = script_answer_void;
    cql_client_opts_t o = OPTS();
    ready_t rd = {0};
    cql_client_t *c = client_for(&f, &loop, &o, &rd);
    CHECK(c && rd.status == 0);
    memset(&G, 0, sizeof G);
    cql_stmt_t *st = cql_stmt_new(c, "INSERT INTO t (a) VALUES (?)");
    CHECK(st != NULL);
    cql_value_t v[] = {cql_int(5)};
    /* three at once: one PREPARE, then three EXECUTEs with its id */
    for (int i = 0; i < 3; i++) {
        CHECK_INT(cql_execute(c, st, v, 1, NULL, on_res, (void *)(intptr_t)i), 0);
    }
    RUN_UNTIL(&loop, G.n == 3);
    CHECK_INT(G.n, 3);
    CHECK_INT(f.n_prepares, 1);
    CHECK_INT(f.n_executes, 3);
    int ex = -1;
    for (int i = 0; i < f.n_reqs; i++) {
        if (f.reqs[i].opcode == CQL_OP_EXECUTE) ex = i;
    }
    CHECK(ex >= 0);
    /* [short bytes] "ID", LOCAL_QUORUM, flags values|serial, 1 value: int 5, SERIAL */
    CHECK_INT(f.reqs[ex].len, 4 + 3 + 2 + 8 + 2);
    CHECK_MEM(f.reqs[ex].body,
              "\x00\x02"
              "ID"
              "\x00\x06\x11\x00\x01\x00\x00\x00\x04\x00\x00\x00\x05\x00\x08",
              19);

    /* the node forgot it: UNPREPARED, then a transparent PREPARE and a second EXECUTE */
    f.unprepare_next = true;
    CHECK_INT(cql_execute(c, st, v, 1, NULL, on_res, (void *)3), 0);
    RUN_UNTIL(&loop, G.n == 4);
    CHECK_INT(G.status[3], 0);
    CHECK_INT(f.n_prepares, 2);
    CHECK_INT(f.n_executes, 5);
    cql_client_stats_t s;
    cql_client_stats(c, &s);
    CHECK_INT(s.reprepares, 1);

    /* UNPREPARED twice in a row is reported, not looped on */
    f.unprepare_next = true;
    f.script = NULL;
    CHECK_INT(cql_execute(c, st, v, 1, NULL, on_res, (void *)4), 0);
    RUN_UNTIL(&loop, f.n_prepares == 3);
    /* the re-sent EXECUTE is held: answer it with UNPREPARED by hand */
    RUN_UNTIL(&loop, f.n_held == 1);
    CHECK_INT(f.n_held, 1);
    fake_error(&f, f.held[0], CQL_ERR_UNPREPARED, "still unknown");
    f.n_held = 0;
    RUN_UNTIL(&loop, G.n == 5);
    CHECK_INT(G.status[4], CHAT_EIO);
    CHECK_INT(G.code[4], CQL_ERR_UNPREPARED);
    CHECK(strstr(G.msg[4], "Unprepared (0x2500): still unknown") != NULL);
    close_all(&loop, c, &f);
    CHECK_INT(uv_loop_close(&loop), 0);
}

/* cql_batch sends the statement's prepared id (this connection's) in every entry, prepares
 * it first when needed, and re-prepares and re-sends the batch once on UNPREPARED. */
static void test_client_batch(void) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    fake_t f;
    fake_start(&f, &loop);
    f.script = script_answer_void;
    cql_client_opts_t o = OPTS();
    ready_t rd = {0};
    cql_client_t *c = client_for(&f, &loop, &o, &rd);
    CHECK(c && rd.status == 0);
    memset(&G, 0, sizeof G);
    cql_stmt_t *st = cql_stmt_new(c, "INSERT INTO t (a, b) VALUES (?, ?)");
    CHECK(st != NULL);
    cql_value_t v[] = {cql_int(5), cql_text("x"), cql_int(6), cql_text("y")};
    CHECK_INT(cql_batch(c, CQL_BATCH_UNLOGGED, st, v, 2, 2, NULL, on_res, (void *)0), 0);
    RUN_UNTIL(&loop, G.n == 1);
    CHECK_INT(G.status[0], 0);
    CHECK_INT(f.n_prepares, 1);
    CHECK_INT(f.n_batches, 1);
    int bi = -1;
    for (int i = 0; i < f.n_reqs; i++) {
        if (f.reqs[i].opcode == CQL_OP_BATCH) bi = i;
    }
    CHECK(bi >= 0);
    const uint8_t want[] = {
        0x01, 0x00, 0x02,                         /* UNLOGGED, 2 */
        0x01, 0x00, 0x02, 'I',  'D',  0x00, 0x02, /* id, 2 values */
        0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x01, 'x',
        0x01, 0x00, 0x02, 'I',  'D',  0x00, 0x02, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00,
        0x00, 0x06, 0x00, 0x00, 0x00, 0x01, 'y',  0x00, 0x06, 0x10, 0x00, 0x08, /* LOCAL_QUORUM, serial, SERIAL */
    };
    CHECK_INT(f.reqs[bi].len, sizeof want);
    CHECK_MEM(f.reqs[bi].body, want, sizeof want);

    /* the node forgot the statement: PREPARE again, then the same batch again */
    f.unprepare_next = true;
    CHECK_INT(cql_batch(c, CQL_BATCH_UNLOGGED, st, v, 2, 2, NULL, on_res, (void *)1), 0);
    RUN_UNTIL(&loop, G.n == 2);
    CHECK_INT(G.status[1], 0);
    CHECK_INT(f.n_prepares, 2);
    CHECK_INT(f.n_batches, 3);
    CHECK_INT(f.reqs[f.n_reqs - 1].opcode, CQL_OP_BATCH);
    CHECK_INT(f.reqs[f.n_reqs - 1].len, sizeof want);
    CHECK_MEM(f.reqs[f.n_reqs - 1].body, want, sizeof want);

    /* refused at submit, no callback: no statement in it, a bad type */
    CHECK_INT(cql_batch(c, CQL_BATCH_UNLOGGED, st, v, 2, 0, NULL, on_res, (void *)2), CHAT_EINVAL);
    CHECK_INT(cql_batch(c, 7, st, v, 2, 1, NULL, on_res, (void *)2), CHAT_EINVAL);
    close_all(&loop, c, &f);
    CHECK_INT(G.n, 2);
    CHECK_INT(uv_loop_close(&loop), 0);
}

static void test_client_errors_and_timeouts(void) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    fake_t f;
    fake_start(&f, &loop);
    cql_client_opts_t o = OPTS();
    o.max_streams = 4;
    ready_t rd = {0};
    cql_client_t *c = client_for(&f, &loop, &o, &rd);
    CHECK(c && rd.status == 0);
    memset(&G, 0, sizeof G);
    CHECK_INT(cql_query(c, "BAD", NULL, 0, NULL, on_res, (void *)0), 0);
    RUN_UNTIL(&loop, f.n_held == 1);
    fake_error(&f, f.held[0], CQL_ERR_SYNTAX, "line 1:0 no viable alternative");
    f.n_held = 0;
    RUN_UNTIL(&loop, G.n == 1);
    CHECK_INT(G.status[0], CHAT_EIO);
    CHECK_INT(G.code[0], CQL_ERR_SYNTAX);
    CHECK(strstr(G.msg[0], "Syntax_error (0x2000): line 1:0 no viable alternative [127.0.0.1:") ==
          G.msg[0]);

    /* a request the server never answers times out; its stream stays reserved */
    cql_params_t p = CQL_PARAMS_DEFAULT;
    p.timeout_ms = 50;
    CHECK_INT(cql_query(c, "SLOW", NULL, 0, &p, on_res, (void *)1), 0);
    RUN_UNTIL(&loop, G.n == 2);
    CHECK_INT(G.status[1], CHAT_EIO);
    CHECK(strstr(G.msg[1], "timed out after 50 ms") != NULL);
    CHECK_INT(f.n_held, 1);
    freq_t *late = f.held[0];
    f.n_held = 0;
    /* with 4 streams, one orphaned: three more fit, none on the orphan's stream */
    for (int i = 2; i < 5; i++) {
        CHECK_INT(cql_query(c, "Q", NULL, 0, NULL, on_res, (void *)(intptr_t)i), 0);
    }
    RUN_UNTIL(&loop, f.n_held == 3);
    CHECK_INT(f.n_held, 3);
    for (int i = 0; i < 3; i++) CHECK(f.held[i]->stream != late->stream);
    /* the late answer arrives and is dropped; then the stream is free again */
    fake_row(&f, late, "late");
    for (int i = 0; i < 3; i++) fake_row(&f, f.held[i], "ok");
    f.n_held = 0;
    RUN_UNTIL(&loop, G.n == 5);
    CHECK_INT(G.n, 5);
    for (int i = 2; i < 5; i++) CHECK_STR(G.val[i], "ok");
    cql_client_stats_t s;
    cql_client_stats(c, &s);
    CHECK_INT(s.timeouts, 1);
    CHECK_INT(s.in_flight, 0);
    close_all(&loop, c, &f);
    CHECK_INT(uv_loop_close(&loop), 0);
}

static void test_client_auth(void) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    fake_t f;
    fake_start(&f, &loop);
    f.need_auth = "\0alice\0s3cret";
    f.need_auth_len = 13;
    cql_client_opts_t o = OPTS();
    o.user = "alice";
    o.password = "s3cret";
    ready_t rd = {0};
    cql_client_t *c = client_for(&f, &loop, &o, &rd);
    CHECK(c && rd.done);
    CHECK_INT(rd.status, 0);
    CHECK_INT(f.reqs[2].opcode, CQL_OP_AUTH_RESPONSE);
    CHECK_INT(f.reqs[2].len, 4 + 13);
    close_all(&loop, c, &f);

    /* wrong password: a clear CHAT_EAUTH at once */
    fake_start(&f, &loop);
    f.need_auth = "\0alice\0s3cret";
    f.need_auth_len = 13;
    o = OPTS();
    o.user = "alice";
    o.password = "nope";
    rd = (ready_t){0};
    c = client_for(&f, &loop, &o, &rd);
    CHECK(c && rd.done);
    CHECK_INT(rd.status, CHAT_EAUTH);
    CHECK(strstr(rd.msg, "authentication failed for user \"alice\": Authentication_error "
                         "(0x0100): Provided username and/or password are incorrect") != NULL);
    close_all(&loop, c, &f);

    /* no credentials, and the server wants some */
    fake_start(&f, &loop);
    f.need_auth = "x";
    f.need_auth_len = 1;
    o = OPTS();
    rd = (ready_t){0};
    c = client_for(&f, &loop, &o, &rd);
    CHECK(c && rd.done);
    CHECK_INT(rd.status, CHAT_EAUTH);
    CHECK(strstr(rd.msg, "requires authentication (PwA) but no user") != NULL);
    close_all(&loop, c, &f);
    CHECK_INT(uv_loop_close(&loop), 0);
}

static void test_client_conn_lost_and_reconnect(void) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    fake_t f;
    fake_start(&f, &loop);
    cql_client_opts_t o = OPTS();
    o.reconnect_min_ms = 20;
    ready_t rd = {0};
    cql_client_t *c = client_for(&f, &loop, &o, &rd);
    CHECK(c && rd.status == 0);
    memset(&G, 0, sizeof G);
    CHECK_INT(cql_query(c, "Q", NULL, 0, NULL, on_res, (void *)0), 0);
    RUN_UNTIL(&loop, f.n_held == 1);
    /* the node goes away with the request in flight: it fails, it is not silently lost */
    int conns_before = f.n_conns;
    fake_hangup(&f, 0);
    f.n_held = 0;
    RUN_UNTIL(&loop, G.n == 1);
    CHECK_INT(G.status[0], CHAT_EIO);
    CHECK(strstr(G.msg[0], "connection to 127.0.0.1:") == G.msg[0]);
    CHECK(strstr(G.msg[0], "lost: closed by the server") != NULL);
    /* it reconnects by itself; a new request works */
    RUN_UNTIL(&loop, f.n_conns > conns_before);
    CHECK(f.n_conns > conns_before);
    f.script = script_answer_void;
    cql_client_stats_t s;
    do {
        uv_run(&loop, UV_RUN_ONCE);
        cql_client_stats(c, &s);
    } while (s.conns_ready == 0);
    CHECK_INT(cql_query(c, "Q", NULL, 0, NULL, on_res, (void *)1), 0);
    RUN_UNTIL(&loop, G.n == 2);
    CHECK_INT(G.status[1], 0);
    CHECK_INT(s.connects, 2);
    close_all(&loop, c, &f);
    CHECK_INT(uv_loop_close(&loop), 0);
}

static void test_client_no_host(void) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    /* a port nobody listens on: bind one, close it */
    fake_t f;
    fake_start(&f, &loop);
    int port = f.port;
    fake_stop(&f);
    uv_run(&loop, UV_RUN_DEFAULT);
    char host[64];
    snprintf(host, sizeof host, "127.0.0.1:%d", port);
    const char *hosts[] = {host};
    cql_client_opts_t o = OPTS();
    o.hosts = hosts;
    o.n_hosts = 1;
    o.reconnect_min_ms = 1000;
    cql_client_t *c = NULL;
    CHECK_INT(cql_client_new(&c, &loop, &o), 0);
    ready_t rd = {0};
    cql_client_on_ready(c, on_ready, &rd);
    RUN_UNTIL(&loop, rd.done);
    CHECK_INT(rd.status, CHAT_EIO);
    CHECK(strstr(rd.msg, "no Cassandra host available (1 configured); last error: 127.0.0.1:") !=
          NULL);
    CHECK(strstr(rd.msg, "connection refused") != NULL);
    /* while every host is down a request fails fast, on the next loop turn, with the reason */
    memset(&G, 0, sizeof G);
    CHECK_INT(cql_query(c, "Q", NULL, 0, NULL, on_res, (void *)0), 0);
    CHECK_INT(G.n, 0);
    uint64_t t0 = uv_now(&loop);
    RUN_UNTIL(&loop, G.n == 1);
    CHECK(uv_now(&loop) - t0 < 500);
    CHECK_INT(G.status[0], CHAT_EIO);
    CHECK(strstr(G.msg[0], "connection refused") != NULL);
    bool closed = false;
    cql_client_close(c, on_closed, &closed);
    RUN_UNTIL(&loop, closed);
    CHECK(closed);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(uv_loop_close(&loop), 0);

    /* options that cannot work are refused at once */
    const char *bad[] = {"127.0.0.1:99999"};
    o.hosts = bad;
    CHECK_INT(cql_client_new(&c, &loop, &o), CHAT_EINVAL);
    o.n_hosts = 0;
    CHECK_INT(cql_client_new(&c, &loop, &o), CHAT_EINVAL);
}

static bool script_schema(fake_t *f, freq_t *q) {
    if (q_is(q, "CREATE")) {
        /* Schema_change CREATED TABLE ks t */
        const uint8_t b[] = {0, 0,   0,   5,   0,   7,   'C', 'R', 'E', 'A', 'T', 'E', 'D', 0,
                             5, 'T', 'A', 'B', 'L', 'E', 0,   2,   'k', 's', 0,   1,   't'};
        fake_send(f, q->conn, q->stream, CQL_OP_RESULT, b, sizeof b);
        return true;
    }
    return false;
}

static void test_client_schema_agreement(void) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    fake_t f;
    fake_start(&f, &loop);
    f.script = script_schema;
    f.schema_rounds = 2; /* the peer disagrees twice, then agrees */
    cql_client_opts_t o = OPTS();
    ready_t rd = {0};
    cql_client_t *c = client_for(&f, &loop, &o, &rd);
    CHECK(c && rd.status == 0);
    memset(&G, 0, sizeof G);
    uint64_t t0 = uv_now(&loop);
    CHECK_INT(
        cql_query(c, "CREATE TABLE ks.t (a int PRIMARY KEY)", NULL, 0, NULL, on_res, (void *)0), 0);
    RUN_UNTIL(&loop, G.n == 1);
    CHECK_INT(G.status[0], 0);
    CHECK_INT(G.kind[0], CQL_RESULT_SCHEMA_CHANGE);
    /* three rounds of (local, peers) were needed, 200 ms apart */
    CHECK_INT(f.schema_rounds, 0);
    CHECK_INT(f.n_queries, 1 + 3 * 2);
    CHECK(uv_now(&loop) - t0 >= 400);
    close_all(&loop, c, &f);
    CHECK_INT(uv_loop_close(&loop), 0);
}

static void test_client_close_fails_in_flight(void) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    fake_t f;
    fake_start(&f, &loop);
    cql_client_opts_t o = OPTS();
    ready_t rd = {0};
    cql_client_t *c = client_for(&f, &loop, &o, &rd);
    CHECK(c && rd.status == 0);
    memset(&G, 0, sizeof G);
    cql_stmt_t *st = cql_stmt_new(c, "SELECT ?");
    cql_value_t v[] = {cql_text("x")};
    CHECK_INT(cql_query(c, "Q", NULL, 0, NULL, on_res, (void *)0), 0);
    CHECK_INT(cql_execute(c, st, v, 1, NULL, on_res, (void *)1), 0);
    RUN_UNTIL(&loop, f.n_held == 1);
    bool closed = false;
    cql_client_close(c, on_closed, &closed);
    CHECK_INT(G.n, 2);
    CHECK_INT(G.status[0], CHAT_ECLOSED); /* in flight */
    CHECK_INT(G.status[1], CHAT_ECLOSED); /* sent or still waiting for its PREPARE */
    CHECK_INT(cql_query(c, "Q", NULL, 0, NULL, on_res, (void *)2), CHAT_ECLOSED);
    RUN_UNTIL(&loop, closed);
    CHECK(closed);
    fake_stop(&f);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(uv_loop_close(&loop), 0);
}

/* Two contact points, one dead: everything goes to the live one, the dead one is retried
 * with a growing delay; a node that drops its connections is reconnected while the other
 * serves. Names are resolved (asynchronously): "localhost" works. */
static void test_client_several_hosts(void) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    fake_t dead, a, b;
    fake_start(&dead, &loop);
    int dead_port = dead.port;
    fake_stop(&dead);
    uv_run(&loop, UV_RUN_NOWAIT);
    fake_start(&a, &loop);
    fake_start(&b, &loop);
    a.script = b.script = script_answer_void;
    char h0[64], h1[64], h2[64];
    snprintf(h0, sizeof h0, "127.0.0.1:%d", dead_port);
    snprintf(h1, sizeof h1, "localhost:%d", a.port);
    snprintf(h2, sizeof h2, "127.0.0.1:%d", b.port);
    const char *hosts[] = {h0, h1, h2};
    cql_client_opts_t o = OPTS();
    o.hosts = hosts;
    o.n_hosts = 3;
    o.conns_per_host = 1;
    o.reconnect_min_ms = 50;
    o.reconnect_max_ms = 400;
    o.keyspace = "chat";
    cql_client_t *c = NULL;
    CHECK_INT(cql_client_new(&c, &loop, &o), 0);
    ready_t rd = {0};
    cql_client_on_ready(c, on_ready, &rd);
    RUN_UNTIL(&loop, rd.done);
    CHECK_INT(rd.status, 0);
    cql_client_stats_t st;
    do {
        uv_run(&loop, UV_RUN_ONCE);
        cql_client_stats(c, &st);
    } while (st.conns_ready < 2);
    CHECK_INT(st.hosts_up, 2);
    /* the keyspace was set on each connection during its setup */
    bool saw_use = false;
    for (int i = 0; i < a.n_reqs; i++) {
        if (a.reqs[i].opcode == CQL_OP_QUERY && q_is(&a.reqs[i], "USE \"chat\"")) saw_use = true;
    }
    CHECK(saw_use);
    memset(&G, 0, sizeof G);
    for (int i = 0; i < 100; i++) {
        CHECK_INT(cql_query(c, "Q", NULL, 0, NULL, on_res, (void *)(intptr_t)i), 0);
    }
    RUN_UNTIL(&loop, G.n == 100);
    for (int i = 0; i < 100; i++) CHECK_INT(G.status[i], 0);
    /* spread over both live nodes */
    CHECK(a.n_queries > 20 && b.n_queries > 20);
    CHECK_INT(a.n_queries + b.n_queries, 100);
    /* the dead one: tried again and again, but with backoff (50, 100, 200, 400, 400 ms...) */
    uint64_t t0 = uv_now(&loop);
    cql_client_stats(c, &st);
    uint64_t f0 = st.connect_failures;
    while (uv_now(&loop) - t0 < 1500) uv_run(&loop, UV_RUN_ONCE);
    cql_client_stats(c, &st);
    CHECK(st.connect_failures - f0 >= 3);
    CHECK(st.connect_failures - f0 <= 8);
    /* a drops its connection: b serves meanwhile, a comes back by itself */
    fake_hangup(&a, 0);
    do { /* (requests in flight on it when it notices would fail: tested above) */
        uv_run(&loop, UV_RUN_ONCE);
        cql_client_stats(c, &st);
    } while (st.conns_ready > 1);
    memset(&G, 0, sizeof G);
    int qa = a.n_queries, qb = b.n_queries;
    for (int i = 0; i < 20; i++) {
        CHECK_INT(cql_query(c, "Q", NULL, 0, NULL, on_res, (void *)(intptr_t)i), 0);
    }
    RUN_UNTIL(&loop, G.n == 20);
    for (int i = 0; i < 20; i++) CHECK_INT(G.status[i], 0);
    CHECK_INT(a.n_queries, qa);
    CHECK_INT(b.n_queries, qb + 20);
    do {
        uv_run(&loop, UV_RUN_ONCE);
        cql_client_stats(c, &st);
    } while (st.conns_ready < 2);
    CHECK_INT(a.n_conns, 2);
    bool closed = false;
    cql_client_close(c, on_closed, &closed);
    RUN_UNTIL(&loop, closed);
    fake_stop(&a);
    fake_stop(&b);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(uv_loop_close(&loop), 0);
}

int main(void) {
    log_set_level(CHAT_LOG_ERROR);
    RUN(test_header_decode);
    RUN(test_encode_options_startup_auth);
    RUN(test_encode_query_values);
    RUN(test_encode_batch);
    RUN(test_consistency_names);
    RUN(test_decode_errors);
    RUN(test_decode_rows);
    RUN(test_decode_rows_variants);
    RUN(test_decode_other_results);
    RUN(test_decode_setup_messages);
    RUN(test_client_setup_and_defaults);
    RUN(test_client_out_of_order_and_many_in_flight);
    RUN(test_client_prepare_and_reprepare);
    RUN(test_client_batch);
    RUN(test_client_errors_and_timeouts);
    RUN(test_client_auth);
    RUN(test_client_conn_lost_and_reconnect);
    RUN(test_client_no_host);
    RUN(test_client_schema_agreement);
    RUN(test_client_close_fails_in_flight);
    RUN(test_client_several_hosts);
    return test_summary("test_cql");
}

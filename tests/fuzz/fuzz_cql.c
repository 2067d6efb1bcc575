/* fuzz_cql: libFuzzer driver for the CQL response decoder (src/cql/codec.c).
 *
 * The one idea: the input is a byte stream from a hostile server, cut into frames the way
 * the client's read loop cuts it (9-byte header, then the body it announces). Each body is
 * decoded and then used the way the client and the store use it: every cell read with every
 * typed getter, columns looked up by name, errors formatted. A decoded view must always lie
 * inside the body (checked), and a decode that fails must leave nothing allocated. The body
 * is copied into its own exact-size allocation first, so an over-read is an ASan report
 * rather than a read of the next frame.
 */
#include "cql/cql.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ASSERT(c)                                                             \
    do {                                                                      \
        if (!(c)) {                                                           \
            fprintf(stderr, "fuzz_cql: %s:%d: %s\n", __FILE__, __LINE__, #c); \
            abort();                                                          \
        }                                                                     \
    } while (0)

static const uint8_t *g_lo, *g_hi;

static void in_body_str(cql_str_t s) {
    if (s.n == 0) return;
    ASSERT((const uint8_t *)s.p >= g_lo && (const uint8_t *)s.p + s.n <= g_hi);
}

static void in_body_bytes(cql_bytes_t b) {
    if (b.n <= 0) return;
    ASSERT(b.p >= g_lo && b.p + b.n <= g_hi);
}

static void use_cols(const cql_colspec_t *cols, int32_t n) {
    for (int32_t i = 0; cols && i < n; i++) {
        in_body_str(cols[i].keyspace);
        in_body_str(cols[i].table);
        in_body_str(cols[i].name);
    }
}

static void use_rows(const cql_rows_t *rows) {
    use_cols(rows->cols, rows->n_cols);
    in_body_bytes(rows->paging_state);
    (void)cql_rows_col(rows, "message_id");
    (void)cql_rows_col(rows, "[applied]");
    for (int32_t r = 0; r < rows->n_rows && rows->cells; r++) {
        for (int32_t c = 0; c < rows->n_cols; c++) {
            const cql_bytes_t *cell = cql_rows_cell(rows, r, c);
            in_body_bytes(*cell);
            int64_t i64;
            int32_t i32;
            bool b;
            uint8_t u[16];
            cql_str_t s;
            int rc = cql_cell_bigint(cell, &i64);
            ASSERT(rc == 0 ? cell->n == 8 : rc == CHAT_ENOTFOUND ? cell->n < 0 : cell->n != 8);
            rc = cql_cell_int(cell, &i32);
            ASSERT(rc != 0 || cell->n == 4);
            rc = cql_cell_bool(cell, &b);
            ASSERT(rc != 0 || cell->n == 1);
            rc = cql_cell_uuid(cell, u);
            ASSERT(rc != 0 || cell->n == 16);
            if (cql_cell_text(cell, &s) == 0) ASSERT(s.n == (size_t)cell->n);
            char *dup = NULL;
            if (cql_cell_strdup(cell, &dup) == 0 && dup) {
                ASSERT(memcmp(dup, cell->p, (size_t)cell->n) == 0 && dup[cell->n] == '\0');
            }
            free(dup);
        }
    }
}

static void use_response(const cql_response_t *r) {
    for (uint16_t i = 0; i < r->n_warnings; i++) in_body_str(r->warnings[i]);
    char msg[256];
    switch (r->hdr.opcode) {
    case CQL_OP_ERROR:
        in_body_str(r->error.message);
        in_body_str(r->error.write_type);
        in_body_bytes(r->error.unprepared_id);
        cql_error_format(r, msg, sizeof msg);
        ASSERT(strlen(msg) < sizeof msg);
        cql_error_format(r, msg, 8); /* truncation must stay in bounds */
        ASSERT(strlen(msg) < 8);
        break;
    case CQL_OP_RESULT:
        if (r->kind == CQL_RESULT_ROWS || r->kind == CQL_RESULT_PREPARED) use_rows(&r->rows);
        if (r->kind == CQL_RESULT_PREPARED) {
            in_body_bytes(r->prepared.id);
            use_cols(r->prepared.binds, r->prepared.n_binds);
        }
        in_body_str(r->keyspace);
        in_body_str(r->schema_change.change);
        in_body_str(r->schema_change.name);
        break;
    case CQL_OP_SUPPORTED:
        for (uint16_t i = 0; i < r->n_supported; i++) {
            in_body_str(r->supported[i].key);
            for (uint16_t j = 0; j < r->supported[i].n_vals; j++) {
                in_body_str(r->supported[i].vals[j]);
            }
        }
        break;
    case CQL_OP_AUTHENTICATE: in_body_str(r->authenticator); break;
    case CQL_OP_AUTH_CHALLENGE:
    case CQL_OP_AUTH_SUCCESS: in_body_bytes(r->token); break;
    default: break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    size_t off = 0;
    /* at most 64 frames per input keeps each run short */
    for (int frames = 0; frames < 64 && size - off >= CQL_HEADER_LEN; frames++) {
        cql_header_t h;
        int rc = cql_header_decode(data + off, size - off, &h);
        if (rc == CHAT_EAGAIN) break;
        if (rc) {
            ASSERT(rc == CHAT_EPROTO || rc == CHAT_ETOOBIG);
            /* the client drops the connection here; go on with the next byte to explore */
            off++;
            continue;
        }
        off += CQL_HEADER_LEN;
        size_t n = h.length <= size - off ? h.length : size - off; /* a truncated last frame */
        uint8_t *body = malloc(n ? n : 1);
        if (!body) return 0;
        if (n) memcpy(body, data + off, n);
        off += n;
        g_lo = body;
        g_hi = body + n;
        cql_response_t r;
        rc = cql_response_decode(&r, &h, body, n);
        if (rc == 0) {
            ASSERT(r.hdr.opcode == h.opcode && r.hdr.stream == h.stream);
            use_response(&r);
            cql_response_free(&r);
        } else {
            ASSERT(rc == CHAT_EPROTO || rc == CHAT_ENOMEM);
            /* freed already: these must be NULL so a second free is harmless */
            ASSERT(r.rows.cells == NULL && r.rows.cols == NULL && r.supported == NULL);
        }
        free(body);
    }
    return 0;
}

/* core/utf8: the one UTF-8 validator: behind every WebSocket TEXT message and close reason,
 * the REST inputs, and the U+FFFD replacement in json_escape.
 *
 * One idea: the state after any byte says exactly which bytes may come next, so a stream
 * split anywhere (across frames, fragments or reads) is checked with no lookback, and an
 * invalid byte is caught the moment it arrives. The DFA has 9 states and 12 byte classes;
 * the class split is where the valid second byte of a sequence depends on its lead byte
 * (E0: A0..BF, no overlongs; ED: 80..9F, no surrogates; F0: 90..BF; F4: 80..8F, <= U+10FFFF).
 * Chat text is mostly ASCII, so at a character boundary the validator skips 8 bytes per step.
 */
#include "core.h"

#include <string.h>

/* States. 0 and 1 are the public UTF8_ACCEPT and UTF8_REJECT. */
enum {
    S_OK = UTF8_ACCEPT,
    S_BAD = UTF8_REJECT,
    S_1,  /* one continuation byte 80..BF to go */
    S_2,  /* two to go */
    S_3,  /* three to go */
    S_E0, /* after E0: next is A0..BF */
    S_ED, /* after ED: next is 80..9F */
    S_F0, /* after F0: next is 90..BF */
    S_F4, /* after F4: next is 80..8F */
    S_COUNT
};

/* Byte classes. */
enum {
    C_ASC, /* 00..7F */
    C_80,  /* 80..8F */
    C_90,  /* 90..9F */
    C_A0,  /* A0..BF */
    C_BAD, /* C0, C1, F5..FF: never valid */
    C_L2,  /* C2..DF */
    C_E0,
    C_L3, /* E1..EC, EE, EF */
    C_ED,
    C_F0,
    C_L4, /* F1..F3 */
    C_F4,
    C_COUNT
};

#define X4(c) c, c, c, c
#define X16(c) X4(c), X4(c), X4(c), X4(c)

static const uint8_t byte_class[256] = {
    /* 00..7F */
    X16(C_ASC),
    X16(C_ASC),
    X16(C_ASC),
    X16(C_ASC),
    X16(C_ASC),
    X16(C_ASC),
    X16(C_ASC),
    X16(C_ASC),
    /* 80..BF */
    X16(C_80),
    X16(C_90),
    X16(C_A0),
    X16(C_A0),
    /* C0..DF */
    C_BAD,
    C_BAD,
    C_L2,
    C_L2,
    X4(C_L2),
    X4(C_L2),
    X4(C_L2),
    X16(C_L2),
    /* E0..EF */
    C_E0,
    C_L3,
    C_L3,
    C_L3,
    X4(C_L3),
    X4(C_L3),
    C_L3,
    C_ED,
    C_L3,
    C_L3,
    /* F0..FF */
    C_F0,
    C_L4,
    C_L4,
    C_L4,
    C_F4,
    C_BAD,
    C_BAD,
    C_BAD,
    X4(C_BAD),
    X4(C_BAD),
};

/* next[state][class]; rows for S_OK and the lead bytes, the rest is continuation checks. */
static const uint8_t next_state[S_COUNT][C_COUNT] = {
    /*          ASC    80     90     A0     BAD    L2     E0     L3     ED     F0     L4    F4 */
    [S_OK] = {S_OK, S_BAD, S_BAD, S_BAD, S_BAD, S_1, S_E0, S_2, S_ED, S_F0, S_3, S_F4},
    [S_BAD] = {S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD},
    [S_1] = {S_BAD, S_OK, S_OK, S_OK, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD},
    [S_2] = {S_BAD, S_1, S_1, S_1, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD},
    [S_3] = {S_BAD, S_2, S_2, S_2, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD},
    [S_E0] = {S_BAD, S_BAD, S_BAD, S_1, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD},
    [S_ED] = {S_BAD, S_1, S_1, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD},
    [S_F0] = {S_BAD, S_BAD, S_2, S_2, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD},
    [S_F4] = {S_BAD, S_2, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD, S_BAD},
};

#define HIGH_BITS 0x8080808080808080ull

uint32_t utf8_feed(uint32_t state, const uint8_t *p, size_t n) {
    /* A state we never handed out is treated as invalid rather than indexing past the table. */
    if (state >= S_COUNT) return UTF8_REJECT;
    size_t i = 0;
    while (i < n) {
        if (state == S_OK) {
            /* ASCII run: 8 bytes per step, then byte by byte up to the first non-ASCII. */
            while (n - i >= 16) {
                uint64_t a, b;
                memcpy(&a, p + i, 8);
                memcpy(&b, p + i + 8, 8);
                if ((a | b) & HIGH_BITS) break;
                i += 16;
            }
            while (n - i >= 8) {
                uint64_t a;
                memcpy(&a, p + i, 8);
                if (a & HIGH_BITS) break;
                i += 8;
            }
            while (i < n && p[i] < 0x80) i++;
            if (i == n) break;
        }
        state = next_state[state][byte_class[p[i++]]];
        if (state == S_BAD) return UTF8_REJECT;
    }
    return state;
}

bool utf8_valid(const uint8_t *p, size_t n) { return utf8_feed(S_OK, p, n) == S_OK; }

size_t utf8_seq_len(const uint8_t *p, size_t n) {
    uint32_t state = S_OK;
    for (size_t i = 0; i < n && i < 4; i++) {
        state = next_state[state][byte_class[p[i]]];
        if (state == S_OK) return i + 1;
        if (state == S_BAD) return 0;
    }
    return 0;
}

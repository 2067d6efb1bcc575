/* ws: the RFC 6455 codec, with no I/O. The connection layer feeds it bytes and sends
 * what it encodes.
 *
 * The parser streams: a frame's header may arrive a byte at a time and its payload in many
 * pieces; it keeps at most the 14 header bytes plus the message being reassembled. A
 * complete unfragmented frame already in the input is delivered in place (unmasked where
 * it lies), with no copy. Text is checked as UTF-8 incrementally, across fragments, so an
 * invalid byte closes the connection as soon as it is seen (1007). A message that would
 * exceed max_message is refused at its header (1009) without buffering its payload.
 *
 * permessage-deflate (RFC 7692, deflate.c): the offer is negotiated from the request's
 * Sec-WebSocket-Extensions; a ws_zip_t, one per loop thread and shared by every connection,
 * compresses a broadcast frame once for all its recipients and inflates a client's whole
 * compressed message, so that a connection holds no zlib state of its own.
 */
#ifndef CHAT_WS_H
#define CHAT_WS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/core.h"

enum {
    WS_OP_CONT = 0x0,
    WS_OP_TEXT = 0x1,
    WS_OP_BINARY = 0x2,
    WS_OP_CLOSE = 0x8,
    WS_OP_PING = 0x9,
    WS_OP_PONG = 0xA,
};

/* Close codes (RFC 6455 section 7.4.1) */
enum {
    WS_CLOSE_NORMAL = 1000,
    WS_CLOSE_GOING_AWAY = 1001,
    WS_CLOSE_PROTOCOL = 1002,
    WS_CLOSE_UNSUPPORTED = 1003,
    WS_CLOSE_NO_STATUS = 1005, /* never on the wire */
    WS_CLOSE_ABNORMAL = 1006,  /* never on the wire */
    WS_CLOSE_INVALID_DATA = 1007,
    WS_CLOSE_POLICY = 1008,
    WS_CLOSE_TOO_BIG = 1009,
    WS_CLOSE_INTERNAL = 1011,
    WS_CLOSE_RESTART = 1012,
    WS_CLOSE_TRY_AGAIN = 1013,
};

/* ---- handshake ------------------------------------------------------------------------ */
/* Sec-WebSocket-Accept for a Sec-WebSocket-Key: base64(SHA-1(key + GUID)).
 * key must be the base64 of exactly 16 bytes (24 chars), else CHAT_EINVAL.
 * out gets 28 chars and a NUL. */
int ws_accept_key(const char *key, size_t key_len, char out[29]);

/* ---- permessage-deflate (RFC 7692) ---------------------------------------------------- */
/* The LZ77 window of what we compress (server_max_window_bits) and what we ask of a client
 * that lets us choose (client_max_window_bits): 2 KiB. Every message is compressed alone
 * (no context takeover), and chat events are a few hundred bytes: on events up to a few KB
 * a 2 KiB window compresses as well as the 32 KiB maximum (bench/RESULTS.md), while the
 * peer's inflater keeps 2 KiB of window instead of 32. zlib cannot make a raw stream with
 * 8 bits. */
#define WS_DEFLATE_WINDOW_BITS 11
/* Payloads shorter than this go out uncompressed even to a compressing peer: below it
 * deflate saves a dozen bytes at best (a pong or an error event grows). */
#define WS_DEFLATE_MIN_BYTES 128
/* Room for the response's extension value. */
#define WS_DEFLATE_RESPONSE_MAX 160

/* One Sec-WebSocket-Extensions request header value (a comma-separated list of offers).
 * Returns true if it holds an acceptable permessage-deflate offer (the first one): out gets
 * the response header's value, NUL-terminated: permessage-deflate with
 * server_no_context_takeover (one compressed frame then serves every recipient),
 * client_no_context_takeover (each client message inflates alone: no state per connection
 * between messages), server_max_window_bits, and client_max_window_bits when offered.
 * An offer with an unknown, repeated or malformed parameter, or a server_max_window_bits
 * below ours, is declined (the next one is tried); a header that does not parse declines
 * everything. value need not be NUL-terminated; out is the caller's. */
bool ws_deflate_negotiate(const char *value, size_t len, char out[WS_DEFLATE_RESPONSE_MAX]);

/* A compressor and a decompressor for one thread (zlib's state, about 300 KiB, allocated
 * once): not reentrant, not shared between threads. ws_zip_new returns NULL on OOM; the
 * caller frees it with ws_zip_free (NULL is fine). */
typedef struct ws_zip ws_zip_t;
ws_zip_t *ws_zip_new(void);
void ws_zip_free(ws_zip_t *z);
/* The compressed form (RSV1 set) of an unmasked, unfragmented frame made by ws_frame_new:
 * a new buf_t with one reference, owned by the caller; NULL when there is nothing to gain
 * (a payload under WS_DEFLATE_MIN_BYTES, a control frame, no shrinking) or on OOM: then
 * send plain. */
buf_t *ws_zip_frame(ws_zip_t *z, const buf_t *plain);
/* Inflate one whole message's payload in[0..n) (the 00 00 ff ff tail implied). 0: *out
 * holds *out_len bytes, valid until the next call on z. CHAT_ETOOBIG: it inflates to more
 * than max bytes (only max + 1 are ever produced: a zip bomb costs nothing); CHAT_EINVAL:
 * not a valid deflate stream; CHAT_ENOMEM. */
int ws_zip_inflate(ws_zip_t *z, const uint8_t *in, size_t n, size_t max, uint8_t **out,
                   size_t *out_len);

/* ---- parser --------------------------------------------------------------------------- */
typedef struct ws_parser ws_parser_t;

typedef struct ws_parser_cb {
    /* A complete data message (TEXT already validated as UTF-8). data[0..len) is valid only
     * during the call. Return 0 to go on, non-zero to stop parsing (e.g. the connection was
     * closed): ws_parser_feed then returns CHAT_ECLOSED at once. */
    int (*on_message)(void *ud, int opcode, uint8_t *data, size_t len);
    /* A control frame: WS_OP_PING, WS_OP_PONG, or WS_OP_CLOSE. For CLOSE the payload was
     * validated: code is 1005 when the frame had no body, else a valid code, and reason is
     * valid UTF-8 (not NUL-terminated). For PING/PONG, code is 0 and data the payload.
     * Same return convention as on_message. */
    int (*on_control)(void *ud, int opcode, uint16_t code, uint8_t *data, size_t len);
} ws_parser_cb_t;

struct ws_parser {
    /* settings (set before the first feed) */
    size_t max_message;   /* largest reassembled message payload; 0 = 65536 */
    bool require_mask;    /* server side: client frames must be masked */
    bool expect_unmasked; /* client side: server frames must not be masked */
    /* the close code to send after ws_parser_feed failed (1002, 1007, 1009); here, beside
     * the flags, where it costs no padding (a session holds a parser: its size counts) */
    uint16_t error_code;
    /* Non-NULL: permessage-deflate was negotiated; RSV1 on a message's first frame marks it
     * compressed, and zip (borrowed) inflates it before on_message. NULL: RSV1 is a
     * protocol error (1002), as it is on a continuation or control frame always. */
    ws_zip_t *zip;
    const ws_parser_cb_t *cb;
    void *ud;
    const char *error_reason; /* static string, for the close frame and logs */
    /* private state */
    uint8_t hdr[14];
    uint8_t hdr_len;
    uint8_t hdr_need;
    uint8_t opcode;     /* of the frame being read */
    uint8_t msg_opcode; /* TEXT/BINARY of the message in progress, 0 if none */
    bool fin, masked;
    uint8_t mask[4];
    uint64_t payload_len; /* of the frame being read */
    uint64_t payload_got;
    uint32_t utf8; /* validator state of the text message in progress */
    uint8_t *msg;  /* reassembly buffer (malloc'd, freed when the message ends) */
    size_t msg_len, msg_cap;
    uint8_t ctl[125]; /* a control frame split across reads */
    uint8_t ctl_len;
    bool failed;
    bool msg_zipped; /* the message in progress is compressed */
};

/* Set defaults: max_message 65536, require_mask true. cb and ud must be set by the caller. */
void ws_parser_init(ws_parser_t *p, const ws_parser_cb_t *cb, void *ud);
/* Free the reassembly buffer. The parser can be re-initialised afterwards. */
void ws_parser_free(ws_parser_t *p);
/* Feed bytes; data may be modified in place (unmasking). A compressed message reaches
 * on_message inflated (its data then lives in p->zip until its next use). Returns:
 *   0              every byte consumed (a partial frame is kept for the next call)
 *   CHAT_ECLOSED   a callback asked to stop
 *   CHAT_EPROTO / CHAT_EUTF8 / CHAT_ETOOBIG   the stream is bad: p->error_code holds the close
 *                  code to send (1002 / 1007 / 1009; 1007 too for invalid compressed data)
 *                  and every later call fails the same way. */
int ws_parser_feed(ws_parser_t *p, uint8_t *data, size_t len);

/* ---- encoder -------------------------------------------------------------------------- */
/* Frame header for a payload of len bytes; out needs 14 bytes; returns the header length.
 * mask NULL: an unmasked (server) frame; else the 4 mask bytes are written after the length
 * and the caller must mask the payload with ws_mask(). */
size_t ws_frame_header(uint8_t *out, int opcode, bool fin, uint64_t len, const uint8_t *mask);
/* XOR p[0..n) with mask, where offset is the payload position of p[0] (for split payloads). */
void ws_mask(uint8_t *p, size_t n, const uint8_t mask[4], uint64_t offset);
/* A whole unmasked server frame (header and payload) in one new buf_t with one reference,
 * owned by the caller. NULL on OOM. This is the broadcast encoding: build once, queue the
 * same buf_t to every member. */
buf_t *ws_frame_new(int opcode, const void *payload, size_t len);
/* A close frame with code and reason (reason truncated to fit 125 bytes, at a UTF-8
 * boundary). code 0 = empty body. Caller owns the reference. */
buf_t *ws_close_frame_new(uint16_t code, const char *reason);
/* True for codes a peer may send in a close frame (1000-1003, 1007-1014, 3000-4999). */
bool ws_close_code_valid(uint16_t code);

#endif

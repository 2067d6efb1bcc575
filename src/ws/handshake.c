/* ws/handshake: Sec-WebSocket-Accept from Sec-WebSocket-Key (RFC 6455 section 4.2.2).
 *
 * One idea: the key is checked, not just hashed. A key that is not the base64 of 16 bytes is
 * a broken or hostile client, and refusing it here keeps that rule in one place. The hash
 * itself runs over the key text as received, so decoding is only a validity check.
 */
#include "ws.h"

#include <openssl/evp.h>
#include <openssl/sha.h>
#include <string.h>

static const char WS_GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

static bool b64_char(char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' ||
           c == '/';
}

int ws_accept_key(const char *key, size_t key_len, char out[29]) {
    /* 16 bytes are 128 bits: 21 full sextets, a 22nd carrying 2 bits, then "==". The 4 spare
     * bits of the 22nd char are not required to be zero: the key is an opaque nonce and a
     * decoder would still yield 16 bytes. */
    if (!key || key_len != 24 || key[22] != '=' || key[23] != '=') return CHAT_EINVAL;
    for (size_t i = 0; i < 22; i++) {
        if (!b64_char(key[i])) return CHAT_EINVAL;
    }
    unsigned char cat[24 + sizeof WS_GUID - 1];
    memcpy(cat, key, 24);
    memcpy(cat + 24, WS_GUID, sizeof WS_GUID - 1);
    unsigned char md[SHA_DIGEST_LENGTH];
    SHA1(cat, sizeof cat, md);
    /* 20 bytes encode to exactly 28 chars; EVP_EncodeBlock adds the NUL (29 bytes total). */
    if (EVP_EncodeBlock((unsigned char *)out, md, SHA_DIGEST_LENGTH) != 28) return CHAT_EINVAL;
    return 0;
}

/* store: helpers shared by the backends; not part of the layer's contract. */
#ifndef CHAT_STORE_INTERNAL_H
#define CHAT_STORE_INTERNAL_H

#include <stddef.h>

/* printf into a caller's error buffer (err may be NULL or errlen 0: then nothing). */
void store__set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif

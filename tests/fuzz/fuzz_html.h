/* fuzz_html: checks shared by the search harnesses. */
#ifndef FUZZ_HTML_H
#define FUZZ_HTML_H

#include <string.h>

#include "core/core.h"

static inline void check(int cond) {
    if (!cond) __builtin_trap();
}

/* A highlight: outside our <em> and </em> tags, balanced and never nested, no '<' (it would
 * be markup in the browser). */
static inline void check_html(const sbuf_t *sb) {
    int open = 0;
    for (size_t i = 0; i < sb->len; i++) {
        if (sb->p[i] != '<') continue;
        if (sb->len - i >= 4 && memcmp(sb->p + i, "<em>", 4) == 0) {
            check(!open);
            open = 1;
        } else if (sb->len - i >= 5 && memcmp(sb->p + i, "</em>", 5) == 0) {
            check(open);
            open = 0;
        } else {
            check(0);
        }
    }
    check(!open);
}

#endif

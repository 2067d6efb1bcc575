/* A minimal unit-test harness: checks that survive NDEBUG, one binary per module, and a
 * closing line "NAME: N passed, N failed". A failed check ends its test function and is
 * reported with file, line and the values involved. */
#ifndef CHAT_TEST_H
#define CHAT_TEST_H

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int test_passed_, test_failed_, test_cur_failed_;

#define CHECK(cond)                                                           \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "  FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            test_cur_failed_ = 1;                                             \
            return;                                                           \
        }                                                                     \
    } while (0)

#define CHECK_INT(a, b)                                                                            \
    do {                                                                                           \
        long long a_ = (long long)(a), b_ = (long long)(b);                                        \
        if (a_ != b_) {                                                                            \
            fprintf(stderr, "  FAIL %s:%d: %s == %s (%lld != %lld)\n", __FILE__, __LINE__, #a, #b, \
                    a_, b_);                                                                       \
            test_cur_failed_ = 1;                                                                  \
            return;                                                                                \
        }                                                                                          \
    } while (0)

#define CHECK_STR(a, b)                                                                            \
    do {                                                                                           \
        const char *a_ = (a), *b_ = (b);                                                           \
        if (!a_ || !b_ || strcmp(a_, b_) != 0) {                                                   \
            fprintf(stderr, "  FAIL %s:%d: %s == %s (\"%s\" != \"%s\")\n", __FILE__, __LINE__, #a, \
                    #b, a_ ? a_ : "(null)", b_ ? b_ : "(null)");                                   \
            test_cur_failed_ = 1;                                                                  \
            return;                                                                                \
        }                                                                                          \
    } while (0)

#define CHECK_MEM(a, b, n)                                                                         \
    do {                                                                                           \
        if (memcmp((a), (b), (n)) != 0) {                                                          \
            fprintf(stderr, "  FAIL %s:%d: memcmp(%s, %s, %s)\n", __FILE__, __LINE__, #a, #b, #n); \
            test_cur_failed_ = 1;                                                                  \
            return;                                                                                \
        }                                                                                          \
    } while (0)

#define RUN(fn)                                  \
    do {                                         \
        test_cur_failed_ = 0;                    \
        fn();                                    \
        if (test_cur_failed_) {                  \
            test_failed_++;                      \
            fprintf(stderr, "not ok %s\n", #fn); \
        } else {                                 \
            test_passed_++;                      \
        }                                        \
    } while (0)

static inline int test_summary(const char *name) {
    printf("%s: %d passed, %d failed\n", name, test_passed_, test_failed_);
    return test_failed_ ? 1 : 0;
}

#endif

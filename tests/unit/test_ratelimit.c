/* Unit tests of --rate-limit's token bucket and its table of users, on a made-up clock (the
 * functions take the time as an argument): no sleeps. */
#include "chat/chat_internal.h"
#include "test.h"

/* 5 a second, bursts of 5: the first five pass at once, the sixth waits for one token
 * (200 ms), and a refusal takes nothing. */
static void test_burst_then_refill(void) {
    rate_bucket_t b;
    rate_bucket_init(&b, 5, 1000);
    for (int i = 0; i < 5; i++) CHECK_INT(rate_bucket_take(&b, 5, 5, 1000), 0);
    CHECK_INT(rate_bucket_take(&b, 5, 5, 1000), 200);
    CHECK_INT(rate_bucket_take(&b, 5, 5, 1000), 200); /* still 200: nothing was taken */
    CHECK_INT(rate_bucket_take(&b, 5, 5, 1050), 150);
    CHECK_INT(rate_bucket_take(&b, 5, 5, 1199), 1);
    /* waiting exactly what was said is enough */
    CHECK_INT(rate_bucket_take(&b, 5, 5, 1200), 0);
    CHECK_INT(rate_bucket_take(&b, 5, 5, 1200), 200);
}

/* The bucket never holds more than the burst, however long the user was away. */
static void test_refill_capped_at_burst(void) {
    rate_bucket_t b;
    rate_bucket_init(&b, 3, 0);
    for (int i = 0; i < 3; i++) CHECK_INT(rate_bucket_take(&b, 10, 3, 0), 0);
    CHECK(!rate_bucket_idle(&b, 10, 3, 0));
    CHECK(!rate_bucket_idle(&b, 10, 3, 299));
    CHECK(rate_bucket_idle(&b, 10, 3, 300));
    uint64_t later = 3600u * 1000u;
    for (int i = 0; i < 3; i++) CHECK_INT(rate_bucket_take(&b, 10, 3, later), 0);
    CHECK_INT(rate_bucket_take(&b, 10, 3, later), 100);
}

/* Less than one a second, and a rate that is not a divisor of 1000 ms: the wait is rounded
 * up, never down, and that wait is enough. */
static void test_fractional_rates(void) {
    rate_bucket_t b;
    rate_bucket_init(&b, 1, 0);
    CHECK_INT(rate_bucket_take(&b, 0.5, 1, 0), 0);
    CHECK_INT(rate_bucket_take(&b, 0.5, 1, 0), 2000);
    CHECK_INT(rate_bucket_take(&b, 0.5, 1, 1500), 500);
    CHECK_INT(rate_bucket_take(&b, 0.5, 1, 2000), 0);

    rate_bucket_init(&b, 1, 0);
    CHECK_INT(rate_bucket_take(&b, 3, 1, 0), 0);
    uint64_t wait = rate_bucket_take(&b, 3, 1, 0);
    CHECK_INT(wait, 334); /* 333.3 ms, rounded up */
    CHECK_INT(rate_bucket_take(&b, 3, 1, wait), 0);
}

/* A clock that goes back gives nothing and breaks nothing. */
static void test_clock_backwards(void) {
    rate_bucket_t b;
    rate_bucket_init(&b, 1, 5000);
    CHECK_INT(rate_bucket_take(&b, 1, 1, 5000), 0);
    CHECK_INT(rate_bucket_take(&b, 1, 1, 4000), 1000);
    CHECK_INT(rate_bucket_take(&b, 1, 1, 6000), 0);
}

/* Users have their own buckets; the table is bounded: when full, the users whose buckets
 * refilled are forgotten to make room, and while all are still refilling a new user is let
 * through without a bucket. */
static void test_table(void) {
    rate_table_t *t = rate_table_new(1, 2, 3);
    CHECK(t != NULL);
    CHECK_INT(rate_table_take(t, "alice", 0), 0);
    CHECK_INT(rate_table_take(t, "alice", 0), 0);
    CHECK_INT(rate_table_take(t, "alice", 0), 1000);
    CHECK_INT(rate_table_take(t, "bob", 0), 0); /* another user: his own bucket */
    CHECK_INT(rate_table_take(t, "carol", 0), 0);
    CHECK_INT(rate_table_count(t), 3);
    /* full, nobody idle: dave goes through untracked, alice stays limited */
    CHECK_INT(rate_table_take(t, "dave", 0), 0);
    CHECK_INT(rate_table_take(t, "dave", 0), 0);
    CHECK_INT(rate_table_take(t, "dave", 0), 0);
    CHECK_INT(rate_table_count(t), 3);
    CHECK_INT(rate_table_take(t, "alice", 0), 1000);
    /* at 1 s bob and carol have refilled (one token each of two), alice has not */
    CHECK_INT(rate_table_take(t, "alice", 1000), 0);
    CHECK_INT(rate_table_take(t, "dave", 1000), 0);
    CHECK_INT(rate_table_count(t), 2); /* bob and carol dropped, dave in */
    CHECK_INT(rate_table_take(t, "dave", 1000), 0);
    CHECK_INT(rate_table_take(t, "dave", 1000), 1000);
    CHECK_INT(rate_table_take(t, "alice", 1000), 1000);
    rate_table_free(t);
    CHECK(rate_table_new(0, 2, 3) == NULL);   /* off is not a table */
    CHECK(rate_table_new(1, 0.5, 3) == NULL); /* a burst below one could never send */
    rate_table_free(NULL);
}

/* Many users over the bound: memory stays at the bound, and each chain still finds its
 * users (the hash keeps them apart). */
static void test_table_many_users(void) {
    rate_table_t *t = rate_table_new(1, 1, 1000);
    CHECK(t != NULL);
    char name[32];
    for (int i = 0; i < 5000; i++) {
        snprintf(name, sizeof name, "user-%d", i);
        rate_table_take(t, name, (uint64_t)i * 10);
        CHECK(rate_table_count(t) <= 1000);
    }
    /* the last user sent at 49990 ms: it is known and limited */
    CHECK_INT(rate_table_take(t, "user-4999", 49990), 1000);
    rate_table_free(t);
}

int main(void) {
    RUN(test_burst_then_refill);
    RUN(test_refill_capped_at_burst);
    RUN(test_fractional_rates);
    RUN(test_clock_backwards);
    RUN(test_table);
    RUN(test_table_many_users);
    return test_summary("test_ratelimit");
}

/* Unit tests of core/queue.h: order of inserts, removal from any position (and of a link on no
 * list), walking while freeing, moving one list onto another, getting back to the element. */
#include "core/queue.h"
#include "test.h"

#include <stdlib.h>

typedef struct item {
    int v;
    queue_t link;
} item_t;

/* The values of h's elements in order into out; returns how many (also checks prev links). */
static int values(queue_t *h, int *out, int max) {
    int n = 0;
    queue_t *q;
    QUEUE_FOREACH(q, h) {
        if (q->next->prev != q || q->prev->next != q) return -1;
        if (n < max) out[n] = queue_data(q, item_t, link)->v;
        n++;
    }
    return n;
}

static void test_queue_empty(void) {
    queue_t h;
    queue_init(&h);
    CHECK(queue_empty(&h));
    CHECK(queue_head(&h) == &h);
    CHECK(queue_tail(&h) == &h);
    int out[1];
    CHECK_INT(values(&h, out, 1), 0);
}

static void test_queue_insert_order(void) {
    queue_t h;
    queue_init(&h);
    item_t it[4] = {{.v = 1}, {.v = 2}, {.v = 3}, {.v = 0}};
    queue_insert_tail(&h, &it[0].link);
    queue_insert_tail(&h, &it[1].link);
    queue_insert_tail(&h, &it[2].link);
    queue_insert_head(&h, &it[3].link);
    int out[4];
    CHECK_INT(values(&h, out, 4), 4);
    for (int i = 0; i < 4; i++) CHECK_INT(out[i], i);
    CHECK(!queue_empty(&h));
    CHECK_INT(queue_data(queue_head(&h), item_t, link)->v, 0);
    CHECK_INT(queue_data(queue_tail(&h), item_t, link)->v, 3);
}

static void test_queue_remove_anywhere(void) {
    queue_t h;
    queue_init(&h);
    item_t it[5];
    for (int i = 0; i < 5; i++) {
        it[i].v = i;
        queue_insert_tail(&h, &it[i].link);
        CHECK(queue_linked(&it[i].link));
    }
    queue_remove(&it[2].link); /* middle */
    queue_remove(&it[0].link); /* first */
    queue_remove(&it[4].link); /* last */
    CHECK(!queue_linked(&it[2].link));
    CHECK(!queue_linked(&it[0].link));
    int out[5];
    CHECK_INT(values(&h, out, 5), 2);
    CHECK_INT(out[0], 1);
    CHECK_INT(out[1], 3);
    /* removing again, or a link never inserted (zeroed or initialised), changes nothing */
    queue_remove(&it[2].link);
    item_t zeroed = {0};
    CHECK(!queue_linked(&zeroed.link));
    queue_remove(&zeroed.link);
    CHECK(!queue_linked(&zeroed.link));
    CHECK_INT(values(&h, out, 5), 2);
    /* a removed element can go on again */
    queue_insert_head(&h, &it[4].link);
    CHECK_INT(values(&h, out, 5), 3);
    CHECK_INT(out[0], 4);
    queue_remove(&it[1].link);
    queue_remove(&it[3].link);
    queue_remove(&it[4].link);
    CHECK(queue_empty(&h));
}

static void test_queue_foreach_safe_frees(void) {
    queue_t h;
    queue_init(&h);
    for (int i = 0; i < 10; i++) {
        item_t *p = calloc(1, sizeof *p);
        CHECK(p);
        p->v = i;
        queue_insert_tail(&h, &p->link);
    }
    /* free the odd ones while walking, then all (ASan sees any use after free) */
    queue_t *q, *n;
    QUEUE_FOREACH_SAFE(q, n, &h) {
        item_t *p = queue_data(q, item_t, link);
        if (p->v % 2) {
            queue_remove(q);
            free(p);
        }
    }
    int out[10];
    CHECK_INT(values(&h, out, 10), 5);
    for (int i = 0; i < 5; i++) CHECK_INT(out[i], 2 * i);
    QUEUE_FOREACH_SAFE(q, n, &h) {
        queue_remove(q);
        free(queue_data(q, item_t, link));
    }
    CHECK(queue_empty(&h));
}

static void test_queue_move_tail(void) {
    queue_t a, b;
    queue_init(&a);
    queue_init(&b);
    item_t it[5];
    for (int i = 0; i < 5; i++) {
        it[i].v = i;
        queue_insert_tail(i < 2 ? &b : &a, &it[i].link);
    }
    queue_move_tail(&a, &b);
    CHECK(queue_empty(&a));
    int out[5];
    CHECK_INT(values(&b, out, 5), 5);
    for (int i = 0; i < 5; i++) CHECK_INT(out[i], i);
    queue_move_tail(&a, &b); /* an empty list moves nothing */
    CHECK_INT(values(&b, out, 5), 5);
    queue_move_tail(&b, &a); /* onto an empty list */
    CHECK(queue_empty(&b));
    CHECK_INT(values(&a, out, 5), 5);
    CHECK_INT(out[4], 4);
}

int main(void) {
    RUN(test_queue_empty);
    RUN(test_queue_insert_order);
    RUN(test_queue_remove_anywhere);
    RUN(test_queue_foreach_safe_frees);
    RUN(test_queue_move_tail);
    return test_summary("test_queue");
}

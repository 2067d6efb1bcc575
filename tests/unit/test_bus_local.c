/* Unit tests for the local bus (one process, nothing to carry): its node list answers on a
 * later loop turn, exactly once, and a close while such an answer is queued neither frees
 * the bus under it (the sanitizer build reports the read of freed memory) nor loses it. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bus/bus.h"
#include "test.h"

static void on_msg(void *ud, const char *chat_id, const uint8_t *p, size_t n) {}
static void on_state(void *ud, bool up) {}

typedef struct answer {
    int calls;
    int status;
    size_t n;
    char id[33];
} answer_t;

static void on_nodes(void *ud, int status, const bus_node_t *nodes, size_t n) {
    answer_t *a = ud;
    a->calls++;
    a->status = status;
    a->n = n;
    if (n) snprintf(a->id, sizeof a->id, "%s", nodes[0].id);
}

static void on_closed(void *arg) { (*(int *)arg)++; }

static bus_t *open_local(uv_loop_t *loop) {
    bus_t *b = NULL;
    char err[128] = "";
    bus_callbacks_t cb = {.on_message = on_msg, .on_state = on_state};
    if (bus_open(&b, loop, "local", &cb, err, sizeof err) != 0) return NULL;
    return b;
}

/* The answer comes on a later turn, and lists this node once it has a heartbeat. */
static void test_list_nodes(void) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    bus_t *b = open_local(&loop);
    CHECK(b);
    bus_node_t self = {.connections = 3};
    snprintf(self.id, sizeof self.id, "%s", b->instance);
    CHECK_INT(bus_heartbeat(b, &self, 3000), 0);
    answer_t a = {0};
    CHECK_INT(bus_list_nodes(b, on_nodes, &a), 0);
    CHECK_INT(a.calls, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(a.calls, 1);
    CHECK_INT(a.status, 0);
    CHECK_INT(a.n, 1);
    CHECK_STR(a.id, b->instance);
    int closed = 0;
    bus_close(b, on_closed, &closed);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(closed, 1);
    CHECK_INT(uv_loop_close(&loop), 0);
}

/* Closed while two answers are queued: each still comes exactly once (saying the bus is
 * closed), the bus is freed only after them, and done runs once. */
static void test_close_with_list_queued(void) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    bus_t *b = open_local(&loop);
    CHECK(b);
    answer_t a1 = {0}, a2 = {0};
    CHECK_INT(bus_list_nodes(b, on_nodes, &a1), 0);
    CHECK_INT(bus_list_nodes(b, on_nodes, &a2), 0);
    int closed = 0;
    bus_close(b, on_closed, &closed);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(a1.calls, 1);
    CHECK_INT(a2.calls, 1);
    CHECK_INT(a1.status, CHAT_ECLOSED);
    CHECK_INT(a1.n, 0);
    CHECK_INT(closed, 1);
    CHECK_INT(uv_loop_close(&loop), 0);
}

int main(void) {
    log_set_level(CHAT_LOG_ERROR + 1);
    RUN(test_list_nodes);
    RUN(test_close_with_list_queued);
    return test_summary("test_bus_local");
}

/* test_http_server: the HTTP/1.1 connection driver (http/server.h) over a real loopback
 * socket, with the trivial handler of http_harness.h and no chat: pipelining, answers that
 * come later, HEAD, 100-continue, errors, deadlines, draining, the upgrade hand-off and
 * output backpressure. */
#include "http_harness.h"
#include "test.h"

static hh_t h;
static char buf[8 << 20];

/* hh_read until the server closes (the needle never comes) */
#define UNTIL_EOF "\x01", 1

#define GET(path) "GET " path " HTTP/1.1\r\nHost: t\r\n\r\n"

static void test_pipelined_in_order(void) {
    CHECK(hh_start(&h, 1 << 20) == 0);
    int fd = hh_client(&h);
    CHECK(fd >= 0);
    const char req[] = GET("/a") GET("/b") GET("/c");
    CHECK(hh_send(&h, fd, req, sizeof req - 1) == 0);
    bool eof;
    hh_read(&h, fd, buf, sizeof buf, "HTTP/1.1 200", 3, &eof);
    const char *a = strstr(buf, "GET /a 0"), *b = strstr(buf, "GET /b 0"),
               *c = strstr(buf, "GET /c 0");
    CHECK(a && b && c && a < b && b < c);
    CHECK(!eof);
    CHECK_INT(h.answered, 3);
    hh_reset(fd);
    hh_stop(&h);
    CHECK_INT(h.n_freed, h.n_open);
}

/* A request whose answer comes later holds back the one pipelined behind it. */
static void test_waiting_answer_keeps_order(void) {
    CHECK(hh_start(&h, 1 << 20) == 0);
    int fd = hh_client(&h);
    const char req[] = GET("/wait") GET("/after");
    CHECK(hh_send(&h, fd, req, sizeof req - 1) == 0);
    bool eof;
    size_t n = hh_read(&h, fd, buf, sizeof buf, NULL, 0, &eof);
    CHECK_INT(n, 0); /* nothing answered while /wait waits */
    CHECK(h.waiting != NULL);
    hh_answer_waiting(&h);
    hh_read(&h, fd, buf, sizeof buf, "HTTP/1.1 200", 2, &eof);
    const char *w = strstr(buf, "GET /wait 0"), *a = strstr(buf, "GET /after 0");
    CHECK(w && a && w < a);
    hh_reset(fd);
    hh_stop(&h);
    CHECK_INT(h.n_freed, h.n_open);
}

/* HEAD: the head of the GET answer, Content-Length included, and no body: the next answer
 * follows the blank line at once. */
static void test_head_has_no_body(void) {
    CHECK(hh_start(&h, 1 << 20) == 0);
    int fd = hh_client(&h);
    const char req[] = "HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n" GET("/g");
    CHECK(hh_send(&h, fd, req, sizeof req - 1) == 0);
    bool eof;
    hh_read(&h, fd, buf, sizeof buf, "HTTP/1.1 200", 2, &eof);
    CHECK(strstr(buf, "Content-Length: 9\r\n") != NULL); /* "HEAD /h 0" */
    const char *end = strstr(buf, "\r\n\r\n");
    CHECK(end && strncmp(end + 4, "HTTP/1.1 200", 12) == 0);
    CHECK(strstr(buf, "HEAD /h 0") == NULL);
    CHECK(strstr(buf, "GET /g 0") != NULL);
    hh_reset(fd);
    hh_stop(&h);
}

static void test_expect_continue(void) {
    CHECK(hh_start(&h, 1 << 20) == 0);
    int fd = hh_client(&h);
    const char head[] = "POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                        "Expect: 100-continue\r\n\r\n";
    CHECK(hh_send(&h, fd, head, sizeof head - 1) == 0);
    bool eof;
    hh_read(&h, fd, buf, sizeof buf, "\r\n\r\n", 1, &eof);
    CHECK(strncmp(buf, "HTTP/1.1 100 Continue\r\n\r\n", 25) == 0);
    CHECK(hh_send(&h, fd, "hello", 5) == 0);
    hh_read(&h, fd, buf, sizeof buf, "POST /p 5", 1, &eof);
    CHECK(strstr(buf, "HTTP/1.1 200") && strstr(buf, "POST /p 5"));
    hh_reset(fd);
    hh_stop(&h);
}

/* Malformed bytes: 400 with a JSON body, then the connection closes. */
static void test_malformed_is_400_and_close(void) {
    CHECK(hh_start(&h, 1 << 20) == 0);
    int fd = hh_client(&h);
    const char req[] = "NOT HTTP AT ALL\r\n\r\n";
    CHECK(hh_send(&h, fd, req, sizeof req - 1) == 0);
    bool eof;
    hh_read(&h, fd, buf, sizeof buf, UNTIL_EOF, &eof); /* until the close */
    CHECK(eof);
    CHECK(strncmp(buf, "HTTP/1.1 400", 12) == 0);
    CHECK(strstr(buf, "\"error\":\"bad_request\"") != NULL);
    CHECK(strstr(buf, "Connection: close") != NULL);
    close(fd);
    hh_stop(&h);
    CHECK_INT(h.n_freed, h.n_open);
}

static void test_connection_close_and_draining(void) {
    CHECK(hh_start(&h, 1 << 20) == 0);
    int fd = hh_client(&h);
    const char req[] = "GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    CHECK(hh_send(&h, fd, req, sizeof req - 1) == 0);
    bool eof;
    hh_read(&h, fd, buf, sizeof buf, UNTIL_EOF, &eof);
    CHECK(eof && strstr(buf, "GET /x 0"));
    close(fd);
    /* the owner drains: a keep-alive request is answered, then the connection closes */
    h.draining = true;
    fd = hh_client(&h);
    CHECK(hh_send(&h, fd, GET("/y"), sizeof GET("/y") - 1) == 0);
    hh_read(&h, fd, buf, sizeof buf, UNTIL_EOF, &eof);
    CHECK(eof && strstr(buf, "GET /y 0"));
    close(fd);
    hh_stop(&h);
    CHECK_INT(h.n_freed, h.n_open);
}

/* A head that never completes: the sweep answers 408 past header_timeout_ms (the time is
 * the sweep's argument, so no waiting); an idle connection is closed. */
static void test_sweep_deadlines(void) {
    CHECK(hh_start(&h, 1 << 20) == 0);
    int fd = hh_client(&h);
    CHECK(hh_send(&h, fd, "GET /slow HTTP/1.1\r\nHo", 22) == 0);
    bool eof;
    hh_read(&h, fd, buf, sizeof buf, NULL, 0, &eof);
    CHECK(h.last != NULL);
    uint64_t now = uv_now(&h.loop);
    http_conn_sweep(h.last, now, 1u << 30); /* within its deadline: nothing */
    hh_read(&h, fd, buf, sizeof buf, NULL, 0, &eof);
    CHECK(!eof && buf[0] == '\0');
    http_conn_sweep(h.last, now + 1001, 1u << 30);
    hh_read(&h, fd, buf, sizeof buf, UNTIL_EOF, &eof);
    CHECK(eof && strncmp(buf, "HTTP/1.1 408", 12) == 0);
    CHECK(strstr(buf, "request_timeout") != NULL);
    close(fd);

    fd = hh_client(&h);
    CHECK(hh_send(&h, fd, GET("/i"), sizeof GET("/i") - 1) == 0);
    hh_read(&h, fd, buf, sizeof buf, "GET /i 0", 1, &eof);
    http_conn_sweep(h.last, uv_now(&h.loop) + 5000, 5000);
    hh_read(&h, fd, buf, sizeof buf, UNTIL_EOF, &eof);
    CHECK(eof && buf[0] == '\0');
    close(fd);
    hh_stop(&h);
    CHECK_INT(h.n_freed, h.n_open);
}

/* The upgrade: the owner takes the connection with the bytes that followed the head. */
static void test_detach_hands_over_rest(void) {
    CHECK(hh_start(&h, 1 << 20) == 0);
    int fd = hh_client(&h);
    const char req[] = "GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                       "Upgrade: raw\r\n\r\nNEWPROTO";
    CHECK(hh_send(&h, fd, req, sizeof req - 1) == 0);
    bool eof;
    hh_read(&h, fd, buf, sizeof buf, UNTIL_EOF, &eof);
    CHECK(eof);
    CHECK_STR(buf, "UP:NEWPROTO");
    close(fd);
    hh_stop(&h);
    CHECK_INT(h.n_freed, h.n_open);
}

/* A client that pipelines and does not read: parsing stops at half the output limit and
 * goes on as the answers drain, every answer arriving in order. */
static void test_backpressure_pauses_then_resumes(void) {
    CHECK(hh_start(&h, 4 * HH_BIG) == 0);
    int fd = hh_client(&h);
    /* 100 answers of 64 KiB: more than the kernel holds for a client that does not read
     * (a send buffer grows to 4 MiB at most, a receive buffer not at all while unread) */
    char req[100 * sizeof GET("/big")];
    size_t n = 0;
    for (int i = 0; i < 100; i++) {
        memcpy(req + n, GET("/big"), sizeof GET("/big") - 1);
        n += sizeof GET("/big") - 1;
    }
    CHECK(hh_send(&h, fd, req, n) == 0);
    for (int i = 0; i < 200; i++) hh_pump(&h);
    CHECK(h.last != NULL);
    CHECK(h.answered < 100);
    CHECK(conn_read_paused(h.last->conn));
    bool eof;
    size_t got = hh_read(&h, fd, buf, sizeof buf, "HTTP/1.1 200", 100, &eof);
    CHECK(!eof);
    CHECK_INT(h.answered, 100);
    /* every answer whole: 99 full bodies before the last head */
    CHECK(got >= 99 * (size_t)HH_BIG);
    hh_reset(fd);
    hh_stop(&h);
    CHECK_INT(h.n_freed, h.n_open);
}

int main(void) {
    log_set_level(CHAT_LOG_ERROR);
    RUN(test_pipelined_in_order);
    RUN(test_waiting_answer_keeps_order);
    RUN(test_head_has_no_body);
    RUN(test_expect_continue);
    RUN(test_malformed_is_400_and_close);
    RUN(test_connection_close_and_draining);
    RUN(test_sweep_deadlines);
    RUN(test_detach_hands_over_rest);
    RUN(test_backpressure_pauses_then_resumes);
    return test_summary("test_http_server");
}

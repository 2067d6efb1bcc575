"""A connection accepted while memory runs out must not stop the node from accepting.

libuv stops polling a listener until the pending connection is taken; if chatd returned
without taking it (no memory for its connection state), it would never accept again. The
allocation failure is real: a small LD_PRELOAD library makes calloc of exactly the size of a
connection fail once, when the test asks for it (a trigger file), and the test then checks that
the node still answers."""

import os
import socket
import subprocess
import time
from pathlib import Path

from conftest import CHATD, REPO
from helpers import HttpConn, wait_until

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void *(*real_calloc)(size_t, size_t);
static char arena[4096]; /* for calloc calls made while dlsym itself runs */
static size_t arena_used;

void *calloc(size_t n, size_t size) {
    if (!real_calloc) {
        static int resolving;
        if (resolving) {
            size_t need = (n * size + 15) & ~(size_t)15;
            if (arena_used + need > sizeof arena) return NULL;
            void *p = arena + arena_used;
            arena_used += need;
            return p;
        }
        resolving = 1;
        real_calloc = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "calloc");
        resolving = 0;
    }
    static long fail_size = -1;
    static const char *trigger;
    if (fail_size < 0) {
        const char *s = getenv("TEST_CALLOC_FAIL_SIZE");
        fail_size = s ? atol(s) : 0;
        trigger = getenv("TEST_CALLOC_FAIL_FILE");
    }
    if (n == 1 && (long)size == fail_size && trigger && unlink(trigger) == 0) return NULL;
    return real_calloc(n, size);
}
"""

SIZEOF = r"""
#include <stdio.h>
#include "core/conn_internal.h"
int main(void) { printf("%zu\n", sizeof(conn_t)); return 0; }
"""


def build(tmp_path):
    shim = tmp_path / "failcalloc.so"
    src = tmp_path / "failcalloc.c"
    src.write_text(SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(shim), str(src), "-ldl"], check=True)
    prog = tmp_path / "sizeof_conn"
    src2 = tmp_path / "sizeof_conn.c"
    src2.write_text(SIZEOF)
    subprocess.run(["cc", "-std=c11", "-D_GNU_SOURCE", "-I", str(REPO / "src"), "-o", str(prog),
                    str(src2)], check=True)
    size = int(subprocess.run([str(prog)], check=True, capture_output=True, text=True).stdout)
    return shim, size


def test_node_keeps_accepting_after_an_allocation_failure_in_accept(chatd, tmp_path):
    shim, size = build(tmp_path)
    trigger = tmp_path / "fail-next-connection"
    env = {"LD_PRELOAD": str(shim), "TEST_CALLOC_FAIL_SIZE": str(size),
           "TEST_CALLOC_FAIL_FILE": str(trigger)}
    if "asan" in str(CHATD):
        # the sanitizer runtime wants to come first; the shim forwards to it
        env["ASAN_OPTIONS"] = os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0"
    srv = chatd(env=env)
    c = HttpConn(srv.port)
    assert c.request("GET", "/healthz").status == 200
    c.close()

    trigger.write_text("")
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    wait_until(lambda: not trigger.exists(), what="the connection's allocation failed")
    # that connection is refused: closed (or reset) without an answer
    s.settimeout(5)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass
    s.close()
    assert "accept_refused reason=out_of_memory" in srv.log

    # and the node goes on accepting
    for _ in range(3):
        c = HttpConn(srv.port, timeout=5)
        r = c.request("GET", "/healthz")
        assert r.status == 200, r
        c.close()

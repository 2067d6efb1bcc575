"""Fan-out under load: 200 members of one chat each send 50 messages; every member must
receive all 10,000 exactly once, each sender's messages in that sender's order."""

import asyncio
import json
import time

import websockets.asyncio.client

CLIENTS = 200
PER_CLIENT = 50
TOTAL = CLIENTS * PER_CLIENT
SAFETY_TIMEOUT = 120


async def run_load(srv):
    canonical = {}  # (sender, seq) -> message_id, as first seen anywhere
    problems = []
    done_count = [0]
    start = asyncio.Event()
    connected = [0]
    all_connected = asyncio.Event()

    sem = asyncio.Semaphore(50)  # limits the connect burst only
    progress = {}

    async def member(i):
        user = f"u{i:03d}"
        url = srv.ws_url("load", token=srv.token(user))
        async with sem:
            ws = await websockets.asyncio.client.connect(
                url, compression=None, proxy=None, max_size=None, max_queue=None,
                ping_interval=None, open_timeout=30, close_timeout=5)
        async with ws:
            connected[0] += 1
            if connected[0] == CLIENTS:
                all_connected.set()
            await start.wait()

            next_seq = {}  # sender -> next expected seq
            received = 0
            acks = asyncio.Queue()

            async def sender():
                for seq in range(PER_CLIENT):
                    await ws.send(json.dumps({"event": "message:message",
                                              "message": f"{user}:{seq}",
                                              "client_id": f"{user}-{seq}"}))
                    await acks.get()  # one outstanding message per sender

            task = asyncio.create_task(sender())
            try:
                while received < TOTAL:
                    ev = json.loads(await ws.recv())
                    if ev.get("event") != "message:message":
                        problems.append(f"{user}: unexpected {ev}")
                        continue
                    sender_user, _, seq_s = ev["message"].partition(":")
                    seq = int(seq_s)
                    if ev["user_from"] != sender_user:
                        problems.append(f"{user}: user_from {ev['user_from']} for {ev['message']}")
                    if seq != next_seq.get(sender_user, 0):
                        problems.append(f"{user}: from {sender_user} got seq {seq}, "
                                        f"expected {next_seq.get(sender_user, 0)}")
                    next_seq[sender_user] = seq + 1
                    key = (sender_user, seq)
                    mid = canonical.setdefault(key, ev["message_id"])
                    if mid != ev["message_id"]:
                        problems.append(f"{user}: {key} has id {ev['message_id']} and {mid}")
                    received += 1
                    progress[user] = received
                    if sender_user == user:
                        acks.put_nowait(seq)
                    if len(problems) > 20:
                        raise AssertionError("\n".join(problems))
                await task
            finally:
                task.cancel()
            if any(v != PER_CLIENT for v in next_seq.values()) or len(next_seq) != CLIENTS:
                problems.append(f"{user}: incomplete {len(next_seq)} senders")
            done_count[0] += 1

    tasks = [asyncio.create_task(member(i)) for i in range(CLIENTS)]
    waiter = asyncio.create_task(all_connected.wait())
    done, _ = await asyncio.wait([waiter, *tasks], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if not all_connected.is_set():
        for t in done:
            if t is not waiter and t.exception():
                raise t.exception()
        raise AssertionError(f"only {connected[0]} of {CLIENTS} members connected")
    t0 = time.monotonic()
    start.set()
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), SAFETY_TIMEOUT)
    except TimeoutError:
        counts = sorted(progress.values())
        raise AssertionError(
            f"not done after {SAFETY_TIMEOUT}s: {done_count[0]} members finished; received "
            f"min {counts[0] if counts else 0} max {counts[-1] if counts else 0} of {TOTAL}; "
            f"problems: {problems[:5]}")
    return canonical, problems, time.monotonic() - t0


def test_200_clients_50_messages_each(chatd):
    srv = chatd()
    canonical, problems, elapsed = asyncio.run(run_load(srv))
    print(f"load: {TOTAL} messages, {TOTAL * CLIENTS} deliveries in {elapsed:.1f}s")
    assert not problems, "\n".join(problems[:20])
    assert len(canonical) == TOTAL
    assert len(set(canonical.values())) == TOTAL, "message ids are not distinct"
    hist = srv.all_history("load")
    assert len(hist) == TOTAL
    assert {m["message_id"] for m in hist} == set(canonical.values())

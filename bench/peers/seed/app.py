"""The seed's design, rebuilt as a benchmark baseline: the FastAPI + Redis + Cassandra chat
server this project grew from (see /work/shared/seed/Scalable-Chat.md), so that bench/run can
measure chatd against what its users had before.

The one idea: keep the seed's costs, not improve them. Every WebSocket connection gets its
own Redis subscription (one pubsub connection each); every message is inserted into Cassandra
with the DataStax driver's blocking ``session.execute`` called inside the async handler (the
event loop stops for the round trip: the seed's own TODO says the driver "can't be used with
async/await syntax"), then published to Redis; one uvicorn worker. The insert is the seed's
unprepared statement at QUORUM.

What differs from the seed, and why (each in the seed's favour or needed to drive it):
- the token is a real HS256 JWT (``sub``), checked like chatd checks it, instead of the seed's
  stand-in that accepted any token: both servers pay for authentication;
- chat ids are names (``bench-3``): one that is not a UUID is mapped to a UUID (uuid5), so the
  seed's uuid partition key stays; the user (``sub``) likewise;
- the row has a timeuuid ``message_id`` beside the seed's columns, and the event carries it:
  with only ``created_at`` as clustering key two messages of one millisecond overwrite each
  other, and the event needs an id to be an acknowledgement;
- the subscription is made before the upgrade is accepted, so a client that sends at once
  still receives its own message (the seed subscribed in a task started after ``accept``);
- the subscriber waits in ``pubsub.listen()``; the seed polled ``get_message()`` without a
  timeout in a loop. ``SEED_CONSUMER=poll`` restores the polling loop;
- the Redis pool has no practical connection cap (the seed's 128, like redis-py's default
  of 100, would refuse the WebSockets beyond it, since each holds a pubsub connection);
  ``SEED_REDIS_MAX_CONNECTIONS`` sets one.

Protocol, close enough for ``chat-bench --target chatd``: ``/ws/chat/{chat_id}?token=...``,
client frames ``{"event": "message:message", "message": "..."}`` (the seed's ChatMessage), and
every member, the sender included, receives the stored event as compact JSON
``{"event":..,"message":..,"chat_id":..,"created_at":..,"user_from":..,"message_id":..}``;
the sender's own copy is its acknowledgement.

Environment: SEED_JWT_SECRET (required), SEED_REDIS_URL (redis://127.0.0.1:6379/0),
SEED_CASSANDRA_HOST (127.0.0.1), SEED_CASSANDRA_PORT (9042), SEED_KEYSPACE (seed_chat),
SEED_STORE (cassandra, or none: no storage at all, for when no Cassandra can run; the
benchmark must then say so), SEED_CONSUMER (listen or poll), SEED_REDIS_MAX_CONNECTIONS.

    python app.py create-models      # keyspace and table, idempotent (the seed's make target)
    uvicorn app:app --workers 1 ...  # the server
"""

import asyncio
import contextlib
import datetime
import json
import os
import sys
import uuid

import jwt
import redis.asyncio as aioredis
from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import RoundRobinPolicy
from cassandra.query import dict_factory
from fastapi import FastAPI, WebSocket, WebSocketDisconnect, status
from pydantic import BaseModel, ValidationError

SECRET = os.environ.get("SEED_JWT_SECRET", "")
REDIS_URL = os.environ.get("SEED_REDIS_URL", "redis://127.0.0.1:6379/0")
CASSANDRA_HOST = os.environ.get("SEED_CASSANDRA_HOST", "127.0.0.1")
CASSANDRA_PORT = int(os.environ.get("SEED_CASSANDRA_PORT", "9042"))
KEYSPACE = os.environ.get("SEED_KEYSPACE", "seed_chat")
STORE = os.environ.get("SEED_STORE", "cassandra")
CONSUMER = os.environ.get("SEED_CONSUMER", "listen")
REDIS_MAX = int(os.environ.get("SEED_REDIS_MAX_CONNECTIONS") or 2**31 - 1)

# Names that are not UUIDs (chat-bench's "bench-3", a JWT "sub") map to fixed UUIDs.
ID_NAMESPACE = uuid.UUID("6f3c1f3e-6a43-4c1e-9a55-2b3f7f0d9a10")

SCHEMA = [
    f"""CREATE KEYSPACE IF NOT EXISTS {KEYSPACE}
        WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}""",
    f"""CREATE TABLE IF NOT EXISTS {KEYSPACE}.messages_by_chat (
        chat_id uuid,
        created_at timestamp,
        message_id timeuuid,
        user_from uuid,
        message text,
        PRIMARY KEY ((chat_id), created_at, message_id)
    ) WITH CLUSTERING ORDER BY (created_at DESC, message_id DESC)""",
]

# Unprepared, with the driver's client-side %(name)s binding, as the seed had it: Cassandra
# parses the statement on every insert.
INSERT = """
    INSERT INTO messages_by_chat (chat_id, created_at, message_id, user_from, message)
    VALUES (%(chat_id)s, %(created_at)s, %(message_id)s, %(user_from)s, %(message)s)
"""


class ChatMessage(BaseModel):
    event: str
    message: str


class ChatMessageExtended(ChatMessage):
    chat_id: uuid.UUID
    created_at: datetime.datetime
    user_from: uuid.UUID
    message_id: uuid.UUID


def as_uuid(name: str) -> uuid.UUID:
    try:
        return uuid.UUID(name)
    except ValueError:
        return uuid.uuid5(ID_NAMESPACE, name)


class State:
    redis = None
    cluster = None
    session = None


state = State()


def cassandra_cluster() -> Cluster:
    profile = ExecutionProfile(
        load_balancing_policy=RoundRobinPolicy(),
        consistency_level=ConsistencyLevel.QUORUM,
        row_factory=dict_factory,
    )
    return Cluster(
        [CASSANDRA_HOST],
        port=CASSANDRA_PORT,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
    )


def save_message_to_cassandra(message: ChatMessageExtended) -> None:
    # Blocking: the whole event loop, every other connection included, waits for Cassandra.
    if state.session is not None:
        state.session.execute(INSERT, message.model_dump())


async def chat_consumer_listen(ws: WebSocket, pubsub) -> None:
    async for item in pubsub.listen():
        if item["type"] != "message" or not item["data"].strip():
            continue
        await ws.send_json(json.loads(item["data"]))


async def chat_consumer_poll(ws: WebSocket, pubsub) -> None:
    # The seed's loop: get_message() returns at once when nothing is there, and the loop asks
    # again; each idle connection keeps the event loop busy.
    while True:
        item = await pubsub.get_message(ignore_subscribe_messages=True)
        if not item or not item["data"].strip():
            continue
        await ws.send_json(json.loads(item["data"]))


async def chat_consumer(ws: WebSocket, pubsub) -> None:
    try:
        if CONSUMER == "poll":
            await chat_consumer_poll(ws, pubsub)
        else:
            await chat_consumer_listen(ws, pubsub)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # sending to a closed socket: the producer ends the connection


async def chat_producer(ws: WebSocket, chat_id: uuid.UUID, user_id: uuid.UUID) -> None:
    channel = str(chat_id)
    while True:
        try:
            raw = await ws.receive_json()
            message = ChatMessage(event=raw["event"], message=raw["message"])
        except (WebSocketDisconnect, RuntimeError):
            return  # RuntimeError: the consumer found the socket closed first
        except (ValidationError, KeyError, TypeError, ValueError):
            await ws.close(code=status.WS_1008_POLICY_VIOLATION)
            return
        extended = ChatMessageExtended(
            **message.model_dump(),
            chat_id=chat_id,
            user_from=user_id,
            created_at=datetime.datetime.now(datetime.timezone.utc),
            message_id=uuid.uuid1(),
        )
        save_message_to_cassandra(extended)
        await state.redis.publish(channel, extended.model_dump_json())


def user_from_token(token: str):
    if not token:
        return None
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    except jwt.InvalidTokenError:
        return None
    sub = claims.get("sub")
    return as_uuid(sub) if isinstance(sub, str) and sub else None


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    if not SECRET:
        raise RuntimeError("SEED_JWT_SECRET is required")
    pool = aioredis.ConnectionPool.from_url(REDIS_URL, max_connections=REDIS_MAX)
    state.redis = aioredis.Redis(connection_pool=pool)
    await state.redis.ping()
    if STORE == "cassandra":
        state.cluster = cassandra_cluster()
        state.session = state.cluster.connect(KEYSPACE)
    elif STORE != "none":
        raise RuntimeError(f"SEED_STORE must be cassandra or none, not {STORE}")
    print(f"seed: ready store={STORE} consumer={CONSUMER} redis={REDIS_URL}", file=sys.stderr,
          flush=True)
    yield
    await state.redis.aclose()
    if state.cluster is not None:
        state.cluster.shutdown()


app = FastAPI(lifespan=lifespan)


@app.websocket("/ws/chat/{chat_id}")
async def websocket_endpoint(websocket: WebSocket, chat_id: str, token: str = ""):
    user_id = user_from_token(token)
    if user_id is None:
        await websocket.close(code=status.WS_1008_POLICY_VIOLATION)  # refused at the upgrade
        return
    chat_uuid = as_uuid(chat_id)
    pubsub = state.redis.pubsub()  # this connection's own Redis subscription
    await pubsub.subscribe(str(chat_uuid))
    try:
        await websocket.accept()
        consumer = asyncio.create_task(chat_consumer(websocket, pubsub))
        producer = asyncio.create_task(chat_producer(websocket, chat_uuid, user_id))
        await asyncio.wait({consumer, producer}, return_when=asyncio.FIRST_COMPLETED)
        for task in (consumer, producer):
            task.cancel()
        for result in await asyncio.gather(consumer, producer, return_exceptions=True):
            if isinstance(result, Exception):  # Redis or Cassandra failed: worth seeing
                print(f"seed: connection ended by {result!r}", file=sys.stderr, flush=True)
    finally:
        await pubsub.aclose()


def create_models() -> None:
    cluster = cassandra_cluster()
    try:
        session = cluster.connect()
        for statement in SCHEMA:
            session.execute(statement, timeout=60)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    if sys.argv[1:] == ["create-models"]:
        create_models()
    else:
        sys.exit("usage: app.py create-models   (serve with: uvicorn app:app --workers 1)")

"""Work queues the classifier workers poll: Redis (local) and SQS (AWS).

Delivery is at least once. A worker *takes* a message, which hides it for ``lease``
seconds; it *acknowledges* the message once the row is written; a message whose lease ran
out (its worker died or hung) is delivered again. With a results table keyed by document,
that is exactly one row per document in the end.

A message carries a batch of documents (up to ``DOCS_PER_MESSAGE``, under SQS's size
limit): one round trip to the queue and one lease per hundred documents, instead of per
document, which is what keeps the queue form near the cluster form's speed.

A queue is described by a URL, so a worker on any engine can open it:
``redis://127.0.0.1:6379/0?name=docs`` or ``sqs://QUEUE-URL`` (``endpoint`` for a
non-AWS endpoint such as moto_server).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from .corpus import Document

LEASE = 30.0  # seconds a taken message stays hidden
DOCS_PER_MESSAGE = 100
MESSAGE_BYTES = 200_000  # SQS takes messages of up to 256 KiB
BATCH_BYTES = 256 * 1024  # and batches of up to 256 KiB in all (1 MiB since 2025)
_FIELDS = tuple(f.name for f in dataclasses.fields(Document))  # a message's order


@dataclass(frozen=True)
class Message:
    body: str
    receipt: str  # what acknowledges it


class RedisQueue:
    """Message ids in a list (``NAME:pending``), bodies in a hash (``NAME:bodies``), taken
    ids in a sorted set (``NAME:leased``) scored by lease expiry. Lua scripts make taking
    and returning atomic; an acknowledged message's body is deleted, so a copy of it still
    pending (its lease ran out just before) is skipped when taken."""

    TAKE = """
    local taken = {}
    while #taken < 2 * tonumber(ARGV[2]) do
        local id = redis.call('LPOP', KEYS[1])
        if not id then break end
        local body = redis.call('HGET', KEYS[3], id)
        if body then
            redis.call('ZADD', KEYS[2], ARGV[1], id)
            taken[#taken + 1] = id
            taken[#taken + 1] = body
        end
    end
    return taken
    """
    RETURN_EXPIRED = """
    local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
    for _, id in ipairs(expired) do
        redis.call('ZREM', KEYS[2], id)
        redis.call('RPUSH', KEYS[1], id)
    end
    return #expired
    """

    def __init__(self, url: str, lease: float = LEASE):
        import redis

        parts = urlsplit(url)
        self.url, self.lease = url, lease
        self.name = parse_qs(parts.query).get("name", ["cloudlab"])[0]
        self.keys = [f"{self.name}:pending", f"{self.name}:leased", f"{self.name}:bodies"]
        self.redis = redis.Redis.from_url(url.split("?")[0], socket_timeout=10)
        self._take = self.redis.register_script(self.TAKE)
        self._return = self.redis.register_script(self.RETURN_EXPIRED)

    def put(self, bodies: list[str]) -> None:
        import uuid

        pending, _, stored = self.keys
        for start in range(0, len(bodies), 100):
            batch = {uuid.uuid4().hex: body for body in bodies[start:start + 100]}
            with self.redis.pipeline() as pipe:  # one transaction: no id without its body
                pipe.hset(stored, mapping=batch)  # type: ignore[arg-type]  # (redis's stubs)
                pipe.rpush(pending, *batch)
                pipe.execute()

    def take(self, count: int) -> list[Message]:
        self._return(keys=self.keys, args=[time.time()])
        taken = self._take(keys=self.keys, args=[time.time() + self.lease, count])
        return [Message(body.decode(), id.decode()) for id, body in zip(taken[::2], taken[1::2])]

    def acknowledge(self, messages: list[Message]) -> None:
        if messages:
            _, leased, stored = self.keys
            ids = [m.receipt for m in messages]
            with self.redis.pipeline() as pipe:
                pipe.zrem(leased, *ids)
                pipe.hdel(stored, *ids)
                pipe.execute()

    def waiting(self) -> int:
        """Messages not yet acknowledged (pending or leased)."""
        return self.redis.hlen(self.keys[2])

    def clear(self) -> None:
        self.redis.delete(*self.keys)


class SqsQueue:
    """An SQS queue; its visibility timeout is the lease."""

    def __init__(self, url: str, lease: float = LEASE):
        import boto3

        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.url, self.lease = url, lease
        self.queue_url = query["queue"][0]
        endpoint = query.get("endpoint", [None])[0]
        region = query.get("region", ["us-east-1"])[0]
        self.sqs = boto3.client("sqs", endpoint_url=endpoint, region_name=region)

    @staticmethod
    def create(name: str, endpoint: str | None = None, region: str = "us-east-1") -> str:
        """Create (or find) queue ``name``; its cloudlab URL."""
        import boto3

        sqs = boto3.client("sqs", endpoint_url=endpoint, region_name=region)
        queue_url = sqs.create_queue(QueueName=name)["QueueUrl"]
        url = f"sqs://{name}?queue={queue_url}&region={region}"
        return url + (f"&endpoint={endpoint}" if endpoint else "")

    @staticmethod
    def delete(url: str) -> None:
        """Delete the queue of ``url`` (from :meth:`create`)."""
        queue = SqsQueue(url)
        queue.sqs.delete_queue(QueueUrl=queue.queue_url)

    def put(self, bodies: list[str]) -> None:
        batch: list[str] = []
        for body in bodies:  # at most 10 messages, and BATCH_BYTES, a call
            if batch and (len(batch) == 10 or _size(batch) + _size([body]) > BATCH_BYTES):
                self._send(batch)
                batch = []
            batch.append(body)
        if batch:
            self._send(batch)

    def _send(self, batch: list[str]) -> None:
        self.sqs.send_message_batch(QueueUrl=self.queue_url, Entries=[
            {"Id": str(k), "MessageBody": body} for k, body in enumerate(batch)])

    def take(self, count: int) -> list[Message]:
        taken: list[Message] = []
        while len(taken) < count:  # SQS hands out at most 10 a call
            reply = self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=min(count - len(taken), 10),
                VisibilityTimeout=max(1, round(self.lease)), WaitTimeSeconds=0)
            messages = reply.get("Messages", [])
            if not messages:
                break
            taken += [Message(m["Body"], m["ReceiptHandle"]) for m in messages]
        return taken

    def acknowledge(self, messages: list[Message]) -> None:
        for start in range(0, len(messages), 10):
            batch = messages[start:start + 10]
            self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=[
                {"Id": str(k), "ReceiptHandle": m.receipt} for k, m in enumerate(batch)])

    def waiting(self) -> int:
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["ApproximateNumberOfMessages",
                                                     "ApproximateNumberOfMessagesNotVisible"])
        a = attributes["Attributes"]
        return int(a["ApproximateNumberOfMessages"]) + int(a["ApproximateNumberOfMessagesNotVisible"])

    def clear(self) -> None:
        self.sqs.purge_queue(QueueUrl=self.queue_url)


def _size(bodies: list[str]) -> int:
    return sum(len(body.encode()) for body in bodies)


def open_queue(url: str, lease: float = LEASE):
    scheme = urlsplit(url).scheme
    if scheme == "redis":
        return RedisQueue(url, lease)
    if scheme == "sqs":
        return SqsQueue(url, lease)
    raise ValueError(f"Unknown queue {url!r}: use redis://HOST:PORT/DB?name=NAME or an "
                     f"sqs:// URL from SqsQueue.create.")


def pack(docs: list) -> list[str]:
    """Message bodies for ``docs``: batches of at most ``DOCS_PER_MESSAGE`` documents and
    ``MESSAGE_BYTES``, each a compact JSON list of the documents' fields."""
    batch: list[str]
    bodies, batch, size = [], [], 0
    for doc in docs:
        fields = json.dumps([getattr(doc, name) for name in _FIELDS], separators=(",", ":"))
        if batch and (len(batch) == DOCS_PER_MESSAGE or size + len(fields) > MESSAGE_BYTES):
            bodies.append("[" + ",".join(batch) + "]")
            batch, size = [], 0
        batch.append(fields)
        size += len(fields) + 1
    if batch:
        bodies.append("[" + ",".join(batch) + "]")
    return bodies


def unpack(body: str) -> list:
    """The documents of one message body."""
    return [Document(*fields) for fields in json.loads(body)]



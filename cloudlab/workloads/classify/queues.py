"""Work queues the classifier workers poll: Redis (local) and SQS (AWS).

Delivery is at least once. A worker *takes* a message, which hides it for ``lease``
seconds; it *acknowledges* the message once the row is written; a message whose lease ran
out (its worker died or hung) is delivered again. With a results table keyed by document,
that is exactly one row per document in the end.

A queue is described by a URL, so a worker on any engine can open it:
``redis://127.0.0.1:6379/0?name=docs`` or ``sqs://QUEUE-URL`` (``endpoint`` for a
non-AWS endpoint such as moto_server).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

LEASE = 30.0  # seconds a taken message stays hidden


@dataclass(frozen=True)
class Message:
    body: str
    receipt: str  # what acknowledges it


class RedisQueue:
    """Messages in a list (``NAME:pending``); taken ones in a sorted set (``NAME:leased``)
    scored by lease expiry. Lua scripts make taking, returning and acknowledging atomic."""

    TAKE = """
    local taken = {}
    for i = 1, tonumber(ARGV[2]) do
        local body = redis.call('LPOP', KEYS[1])
        if not body then break end
        redis.call('ZADD', KEYS[2], ARGV[1], body)
        taken[#taken + 1] = body
    end
    return taken
    """
    RETURN_EXPIRED = """
    local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
    for _, body in ipairs(expired) do
        redis.call('ZREM', KEYS[2], body)
        redis.call('RPUSH', KEYS[1], body)
    end
    return #expired
    """

    def __init__(self, url: str, lease: float = LEASE):
        import redis

        parts = urlsplit(url)
        self.url, self.lease = url, lease
        self.name = parse_qs(parts.query).get("name", ["cloudlab"])[0]
        self.pending, self.leased = f"{self.name}:pending", f"{self.name}:leased"
        self.redis = redis.Redis.from_url(url.split("?")[0], socket_timeout=10)
        self._take = self.redis.register_script(self.TAKE)
        self._return = self.redis.register_script(self.RETURN_EXPIRED)

    def put(self, bodies: list[str]) -> None:
        for start in range(0, len(bodies), 1000):
            self.redis.rpush(self.pending, *bodies[start:start + 1000])

    def take(self, count: int) -> list[Message]:
        self._return(keys=[self.pending, self.leased], args=[time.time()])
        bodies = self._take(keys=[self.pending, self.leased],
                            args=[time.time() + self.lease, count])
        return [Message(b.decode(), b.decode()) for b in bodies]

    def acknowledge(self, messages: list[Message]) -> None:
        if messages:
            self.redis.zrem(self.leased, *[m.receipt for m in messages])

    def waiting(self) -> int:
        """Messages not yet acknowledged (pending or leased)."""
        return self.redis.llen(self.pending) + self.redis.zcard(self.leased)

    def clear(self) -> None:
        self.redis.delete(self.pending, self.leased)


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

    def put(self, bodies: list[str]) -> None:
        for start in range(0, len(bodies), 10):
            batch = bodies[start:start + 10]
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


def open_queue(url: str, lease: float = LEASE):
    scheme = urlsplit(url).scheme
    if scheme == "redis":
        return RedisQueue(url, lease)
    if scheme == "sqs":
        return SqsQueue(url, lease)
    raise ValueError(f"Unknown queue {url!r}: use redis://HOST:PORT/DB?name=NAME or an "
                     f"sqs:// URL from SqsQueue.create.")


def encode(doc) -> str:
    from dataclasses import asdict

    return json.dumps(asdict(doc))


def decode(body: str):
    from .corpus import Document

    return Document(**json.loads(body))

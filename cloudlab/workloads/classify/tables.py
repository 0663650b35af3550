"""Results tables: SQLite (local), Redis (engines on other machines) and DynamoDB (AWS),
one row per document, keyed by it.

Writing a row whose key is already there replaces it, so a document classified twice
(delivered again after its worker died) still has one row. A table is described by a URL:
``sqlite:///path/results.db``, ``redis://[:PASSWORD@]HOST:PORT/0?name=TABLE`` or
``dynamodb://TABLE?region=...&endpoint=...``.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

from .work import COLUMNS, Row


class SqliteTable:
    def __init__(self, url: str):
        import sqlite3

        self.url = url
        self.path = urlsplit(url).path
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")  # readers never block the writers
        # A commit survives the death of the process that made it, which is the failure
        # the queue form guards against; only a power cut could lose the last ones.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(f"CREATE TABLE IF NOT EXISTS results ({COLUMNS[0]} TEXT PRIMARY KEY, "
                        + ", ".join(f"{c} TEXT" for c in COLUMNS[1:]) + ")")

    def put(self, rows: list[Row]) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(f"INSERT OR REPLACE INTO results VALUES ({', '.join('?' * len(COLUMNS))})",
                                [r.values() for r in rows])

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def rows(self, limit: int | None = None) -> list[Row]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM results ORDER BY key"
        sql += f" LIMIT {int(limit)}" if limit else ""
        return [Row(*r) for r in self.db.execute(sql)]

    def close(self) -> None:
        self.db.close()


class RedisTable:
    """Rows in one Redis hash (``NAME:rows``), document key to the row's values as JSON."""

    def __init__(self, url: str):
        import redis

        self.url = url
        self.key = parse_qs(urlsplit(url).query).get("name", ["cloudlab"])[0] + ":rows"
        self.redis = redis.Redis.from_url(url.split("?")[0], socket_timeout=10)

    def put(self, rows: list[Row]) -> None:
        if rows:
            self.redis.hset(self.key, mapping={r.key: json.dumps(r.values()) for r in rows})

    def count(self) -> int:
        return self.redis.hlen(self.key)

    def rows(self, limit: int | None = None) -> list[Row]:
        rows = sorted((Row(*json.loads(v)) for v in self.redis.hvals(self.key)),
                      key=lambda r: r.key)
        return rows[:limit] if limit else rows

    def close(self) -> None:
        self.redis.close()


class DynamoTable:
    def __init__(self, url: str):
        import boto3

        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.url, self.name = url, parts.netloc
        self.client = boto3.client("dynamodb", endpoint_url=query.get("endpoint", [None])[0],
                                   region_name=query.get("region", ["us-east-1"])[0])

    @staticmethod
    def create(name: str, endpoint: str | None = None, region: str = "us-east-1") -> str:
        """Create table ``name`` (pay per request, keyed by ``key``); its cloudlab URL."""
        import boto3

        client = boto3.client("dynamodb", endpoint_url=endpoint, region_name=region)
        client.create_table(TableName=name, BillingMode="PAY_PER_REQUEST",
                            AttributeDefinitions=[{"AttributeName": "key", "AttributeType": "S"}],
                            KeySchema=[{"AttributeName": "key", "KeyType": "HASH"}])
        client.get_waiter("table_exists").wait(TableName=name)
        return f"dynamodb://{name}?region={region}" + (f"&endpoint={endpoint}" if endpoint else "")

    @staticmethod
    def delete(url: str) -> None:
        """Delete the table of ``url`` (from :meth:`create`)."""
        table = DynamoTable(url)
        table.client.delete_table(TableName=table.name)

    def put(self, rows: list[Row]) -> None:
        # A batch may hold a document twice (SQS delivers at least once), which DynamoDB's
        # BatchWriteItem refuses: keep the last row per key, as a replacing write would.
        rows = list({r.key: r for r in rows}.values())
        for start in range(0, len(rows), 25):
            self.client.batch_write_item(RequestItems={self.name: [
                {"PutRequest": {"Item": {c: {"S": v} for c, v in zip(COLUMNS, r.values())}}}
                for r in rows[start:start + 25]]})

    def count(self) -> int:
        total, kwargs = 0, {"TableName": self.name, "Select": "COUNT"}
        while True:
            page = self.client.scan(**kwargs)
            total += page["Count"]
            if "LastEvaluatedKey" not in page:
                return total
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def rows(self, limit: int | None = None) -> list[Row]:
        items, kwargs = [], {"TableName": self.name}
        while True:
            page = self.client.scan(**kwargs)
            items += page["Items"]
            if "LastEvaluatedKey" not in page or (limit and len(items) >= limit):
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        rows = sorted((Row(*(i[c]["S"] for c in COLUMNS)) for i in items), key=lambda r: r.key)
        return rows[:limit] if limit else rows

    def close(self) -> None:
        pass


def open_table(url: str):
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return SqliteTable(url)
    if scheme == "redis":
        return RedisTable(url)
    if scheme == "dynamodb":
        return DynamoTable(url)
    raise ValueError(f"Unknown table {url!r}: use sqlite:///PATH, redis://HOST:PORT/0?name="
                     f"NAME or a dynamodb:// URL from DynamoTable.create.")

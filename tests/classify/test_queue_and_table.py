"""At-least-once queues and idempotent tables: Redis and SQLite here, SQS and DynamoDB
against moto_server; then the whole queue form with a worker killed mid-run. (The queue
form on ssh hosts and EC2 VMs: tests/remote/test_workloads_over_ssh.py and
tests/cloud/test_ec2_backend.py.)"""

import dataclasses
import os
import signal
import threading
import time

import pytest

import cloudlab
from cloudlab.workloads.classify import queues, run_corpus, services, tables
from cloudlab.workloads.classify.work import Row
from conftest import launched, wait_until_gone


def _row(key, predicted="math"):
    return Row(key, "host:1", "math", predicted, f"title {key}", "2020-01-01")


def _check_queue(queue):
    queue.put([f"doc-{k}" for k in range(25)])
    assert queue.waiting() == 25
    first = queue.take(10)
    assert [m.body for m in first] == [f"doc-{k}" for k in range(10)]
    second = queue.take(100)
    assert len(second) == 15  # taken messages are hidden from other takers
    assert queue.take(5) == []
    queue.acknowledge(second)
    assert queue.waiting() == 10  # the first ten are leased, not acknowledged


def test_redis_queue_hides_taken_messages_and_delivers_them_again_after_the_lease(redis_url):
    queue = queues.open_queue(redis_url + "?name=t1", lease=0.5)
    _check_queue(queue)
    time.sleep(0.6)  # the taker of the first ten "died": their lease runs out
    again = queue.take(100)
    assert sorted(m.body for m in again) == sorted(f"doc-{k}" for k in range(10))
    queue.acknowledge(again)
    assert queue.waiting() == 0 and queue.take(5) == []


def test_an_acknowledged_message_is_not_delivered_again_after_its_lease_ran_out(redis_url):
    queue = queues.open_queue(redis_url + "?name=t2", lease=0.2)
    queue.put(["slow"])
    [slow] = queue.take(1)
    time.sleep(0.3)
    assert queue.take(0) == []  # a look at the queue returns the expired message...
    queue.acknowledge([slow])  # ...and then its slow worker finishes it after all
    assert queue.waiting() == 0 and queue.take(5) == []


def test_a_message_carries_a_batch_of_documents_under_the_sqs_size_limit(corpus):
    bodies = queues.pack(corpus[:1000])
    assert len(bodies) == 1000 // queues.DOCS_PER_MESSAGE
    assert [doc for body in bodies for doc in queues.unpack(body)] == corpus[:1000]
    long = [dataclasses.replace(corpus[0], abstract="x" * 50_000)] * 10
    assert [len(queues.unpack(body)) for body in queues.pack(long)] == [3, 3, 3, 1]
    assert max(len(body) for body in queues.pack(long)) <= queues.MESSAGE_BYTES


def test_sqlite_table_keeps_one_row_per_document(tmp_path):
    table = tables.open_table(f"sqlite:///{tmp_path}/r.db")
    table.put([_row("a"), _row("b")])
    table.put([_row("a", predicted="cs")])  # delivered twice: replaced, not added
    assert table.count() == 2
    assert [(r.key, r.predicted) for r in table.rows()] == [("a", "cs"), ("b", "math")]


def test_a_redis_for_other_machines_answers_to_its_password_and_keeps_rows(redis_url):
    import psutil
    import redis

    with services.redis_server(password="pw-for-this-test") as url:
        assert url.startswith("redis://:pw-for-this-test@127.0.0.1:")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(url.replace(":pw-for-this-test@", "")).ping()
        on_command_lines = [p.pid for p in psutil.process_iter(["cmdline"])
                            if "pw-for-this-test" in " ".join(p.info["cmdline"] or [])]
        assert on_command_lines == []  # (the password came on its stdin)
        table = tables.open_table(f"{url}?name=rows")
        table.put([_row("a"), _row("b")])
        table.put([_row("a", predicted="cs")])
        assert table.count() == 2
        assert [(r.key, r.predicted) for r in table.rows()] == [("a", "cs"), ("b", "math")]


def test_unknown_queue_or_table_urls_say_what_to_use():
    with pytest.raises(ValueError, match="Unknown queue 'kafka://x': use redis://"):
        queues.open_queue("kafka://x")
    with pytest.raises(ValueError, match="Unknown table 'mysql://x': use sqlite:///PATH"):
        tables.open_table("mysql://x")


def test_sqs_and_dynamodb_through_a_real_http_endpoint(moto_endpoint):
    queue = queues.open_queue(queues.SqsQueue.create("docs", moto_endpoint), lease=1)
    _check_queue(queue)
    time.sleep(1.5)
    again = queue.take(10)
    assert sorted(m.body for m in again) == sorted(f"doc-{k}" for k in range(10))
    queue.acknowledge(again)
    big = [f"{k:02d}" + "x" * (queues.MESSAGE_BYTES - 2) for k in range(12)]
    queue.put(big)  # (SQS takes batches of up to 256 KiB, here one message each)
    assert sorted(m.body[:2] for m in queue.take(20)) == [f"{k:02d}" for k in range(12)]
    table = tables.open_table(tables.DynamoTable.create("results", moto_endpoint))
    table.put([_row(f"k{k}") for k in range(60)])
    table.put([_row("k5", predicted="cs")])
    assert table.count() == 60
    assert [r.predicted for r in table.rows() if r.key == "k5"] == ["cs"]


def _kill_a_worker_when(cluster, progress, at: int, killed: list):
    """Kill -9 one engine once ``at`` documents are done."""

    def watch():
        while progress[0] < at:
            time.sleep(0.05)
        victim = next(p for p in launched(cluster.name) if "engine-" in " ".join(p.cmdline()))
        killed.append(victim.pid)
        os.kill(victim.pid, signal.SIGKILL)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_queue_form_over_the_whole_corpus_survives_a_killed_worker(corpus, engine, redis_url,
                                                                   tmp_path):
    """Issue 7: a worker killed mid-document loses nothing; exactly one row per document."""
    progress, killed = [0], []
    with cloudlab.Cluster(2, engine=engine) as c:
        def seen(done, _seconds):
            progress[0] = done

        watcher = _kill_a_worker_when(c, progress, 8_000, killed)
        result = run_corpus(c, corpus, mode="queue", queue_url=redis_url + "?name=kill",
                            table_url=f"sqlite:///{tmp_path}/results.db", on_progress=seen,
                            lease=3.0)
        watcher.join(5)
        deaths = c.deaths
    assert wait_until_gone(c.name, 5) == []
    assert killed and any("signal 9" in str(d) for d in deaths)
    table = tables.open_table(f"sqlite:///{tmp_path}/results.db")
    assert table.count() == 25_000 == result.rows
    assert {r.key for r in table.rows()} == {d.id for d in corpus}
    assert result.accuracy >= 0.85
    # The dead worker's acknowledged rows stay; what it held was done again by others.
    assert any(w.endswith(f":{killed[0]}") for w in result.workers)
    assert len(result.workers) >= 2


def test_queue_form_through_sqs_into_dynamodb(corpus, moto_endpoint):
    """The AWS form end to end: engines take documents from SQS and write DynamoDB rows
    (moto_server on loopback stands in for AWS; the engines get its dummy credentials)."""
    docs = corpus[:500]
    queue_url = queues.SqsQueue.create("abstracts", moto_endpoint)
    table_url = tables.DynamoTable.create("classified", moto_endpoint)
    with cloudlab.Cluster(2) as c:
        result = run_corpus(c, docs, mode="queue", queue_url=queue_url, table_url=table_url,
                            lease=5.0)
    assert wait_until_gone(c.name, 5) == []
    table = tables.open_table(table_url)
    assert table.count() == 500 == result.rows
    assert {r.key for r in table.rows()} == {d.id for d in docs}
    assert len(result.workers) == 2 and result.accuracy > 0.8
    table.put([table.rows()[0]] * 2)  # the same document twice in one batch: still one row
    assert table.count() == 500

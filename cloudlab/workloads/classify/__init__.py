"""Scientific document classifier: arXiv abstracts in, a topic per document out, many tasks.

    from cloudlab.workloads import classify
    docs = classify.load_arxiv("arxiv-abstracts-25k.jsonl.gz")
    run = classify.run_corpus(cluster, docs, mode="cluster")    # or mode="queue"
    run.accuracy, run.docs_per_s

Two forms over one classify function (``work.classify``):

- ``cluster``: the cluster's own scheduler is the queue; batches of documents go to
  whichever engine is free (``c.map``), rows come back as they finish.
- ``queue``: a real queue and a real table. The documents go into a queue (Redis here, SQS
  on AWS); one worker per engine takes them, writes rows to a results table (SQLite here,
  DynamoDB on AWS) and acknowledges them. Delivery is at least once and rows are keyed by
  document, so a worker killed mid-batch loses nothing and duplicates nothing.

Modules: ``corpus`` (reading and labelling), ``model`` (hashed TF-IDF + linear SVM),
``work`` (what engines run), ``queues`` and ``tables`` (Redis/SQS, SQLite/DynamoDB),
``services`` (a local Redis for notebooks and tests).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .corpus import SHARED_CORPUS, Document, default_corpus, load_arxiv, load_newsgroups, split

__all__ = ["Document", "load_arxiv", "load_newsgroups", "default_corpus", "split", "train",
           "run_corpus", "Run", "SHARED_CORPUS"]

BATCH = 500  # documents per task in cluster mode, at most (see _ranges)
SMALLEST_BATCH = 50  # a task costs the engine about a millisecond besides its documents


@dataclass
class Run:
    """What classifying a corpus gave: accuracy on the held-out split, throughput, rows."""

    mode: str
    documents: int
    rows: int
    accuracy: float
    seconds: float  # classification only (the model was trained before)
    train_seconds: float
    engines: int
    workers: dict[str, int] = field(default_factory=dict)  # documents per worker
    confusion: dict = field(default_factory=dict)  # (truth, predicted) -> count
    head: list = field(default_factory=list)  # the first rows of the results table

    @property
    def docs_per_s(self) -> float:
        return self.documents / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {"mode": self.mode, "accuracy": self.accuracy, "documents": self.documents,
                "rows": self.rows, "docs_per_s": self.docs_per_s, "seconds": self.seconds,
                "train_seconds": self.train_seconds, "engines": self.engines,
                "workers": len(self.workers)}


def _shards(items: list, count: int) -> list[list]:
    size = -(-len(items) // max(count, 1))
    return [items[k:k + size] for k in range(0, len(items), size)]


def train(cluster, docs: list[Document]):
    """Fit the model on ``docs``: the engines count and vectorize their shares in parallel."""
    import scipy.sparse

    from . import model as model_module
    from . import work

    shards = _shards(docs, 2 * len(cluster.engine_ids))
    frequencies = sum(cluster.map(work.document_frequencies, shards, chunksize=1))
    idf = model_module.idf_from(frequencies, len(docs))
    parts = cluster.map(_features, [(shard, idf) for shard in shards], chunksize=1)
    x = scipy.sparse.vstack(parts).tocsr()
    return model_module.fit(x, [d.label for d in docs], idf)


def _features(item):
    from . import work

    docs, idf = item
    return work.features(docs, idf)


def run_corpus(cluster, docs: list[Document], mode: str = "cluster",
               queue_url: str | None = None, table_url: str | None = None,
               on_progress: Callable[[int, float], None] | None = None,
               lease: float = 30.0, model=None) -> Run:
    """Train on the training split, then classify every document of ``docs`` on
    ``cluster``; accuracy is measured on the held-out split's rows.

    ``mode="queue"`` takes ``queue_url`` and ``table_url`` (see ``queues``/``tables``);
    without them, a queue and a table every engine reaches are made for the run and
    removed after it (``services``: Redis, SQLite, or SQS and DynamoDB on EC2).
    ``model`` (from :func:`train`) skips the training. ``on_progress(done, seconds)``
    sees the count of documents classified so far. In the
    queue form, a document a worker took is delivered again if it is not acknowledged
    within ``lease`` seconds (the worker died).
    """
    from .corpus import held_out

    if mode not in ("cluster", "queue"):
        raise ValueError(f"Unknown mode {mode!r}: choose cluster or queue.")
    if (queue_url is None) != (table_url is None):
        raise ValueError("queue_url and table_url go together: give both, or neither for a "
                         "queue and table made for the run.")
    if mode == "queue" and queue_url is None:
        from .services import check_place

        check_place(cluster.service_place())  # before the training, not after
    training, _ = split(docs)
    t0 = time.perf_counter()
    if model is None:
        model = train(cluster, training)
    train_seconds = time.perf_counter() - t0
    with _pushed(cluster, "model", model) as ref:
        cluster.run(_warm_up, ref)  # every engine has the model before the clock starts
        if mode == "cluster":
            rows, seconds = _in_cluster(cluster, ref, model.classes, docs, on_progress)
        else:
            rows, seconds = _through_queue(cluster, ref, docs, queue_url, table_url, on_progress,
                                           lease)
    test = {d.id for d in docs if held_out(d)}
    scored = [r for r in rows if r.key in test]
    confusion: dict = {}
    workers: dict = {}
    for r in rows:
        confusion[(r.truth, r.predicted)] = confusion.get((r.truth, r.predicted), 0) + 1
        workers[r.worker] = workers.get(r.worker, 0) + 1
    accuracy = sum(r.truth == r.predicted for r in scored) / max(len(scored), 1)
    return Run(mode, len(docs), len(rows), accuracy, seconds, train_seconds,
               len(cluster.engine_ids), workers, confusion, sorted(rows, key=lambda r: r.key)[:10])


def _in_cluster(cluster, ref, classes, docs, on_progress):
    """The cluster form: the documents go to the engines once (pushed); each task names a
    range of them and returns label indices, so the client does almost nothing per
    document."""
    from . import work

    with _pushed(cluster, "corpus", docs) as corpus:
        ranges = _ranges(len(docs), len(cluster.engine_ids))
        done, t0 = 0, time.perf_counter()

        def arrived(index, _result) -> None:
            nonlocal done
            done += ranges[index][1] - ranges[index][0]
            if on_progress is not None:
                on_progress(done, time.perf_counter() - t0)

        results = cluster.map(_predict_range, [(ref, corpus, a, b) for a, b in ranges],
                              chunksize=1, on_result=arrived)
        seconds = time.perf_counter() - t0
    rows = [work.Row(d.id, worker, d.label, classes[k], d.title, d.date)
            for (a, b), (worker, labels) in zip(ranges, results)
            for d, k in zip(docs[a:b], labels)]
    return rows, seconds


def _ranges(total: int, engines: int) -> list[tuple[int, int]]:
    """Guided self-scheduling: tasks of ``BATCH`` documents while there is plenty left,
    then each a share of what remains (down to ``SMALLEST_BATCH``), so the engines finish
    together instead of one waiting out the other's last large task."""
    ranges, start = [], 0
    while start < total:
        share = -(-(total - start) // (2 * max(engines, 1)))
        size = min(BATCH, max(SMALLEST_BATCH, share))
        ranges.append((start, min(start + size, total)))
        start += size
    return ranges


def _predict_range(item):
    from . import work

    return work.predict_range(*item)


def _warm_up(ref) -> None:
    ref.get().predict(["warm up"])


def _through_queue(cluster, ref, docs, queue_url, table_url, on_progress, lease):
    import contextlib
    import threading

    from . import queues, services, tables

    with contextlib.ExitStack() as stack:
        if queue_url is None:
            (queue_url, table_url), engines_reach = stack.enter_context(
                services.queue_and_table(cluster.service_place()))
        else:
            engines_reach = queue_url, table_url
        queue, table = queues.open_queue(queue_url, lease), tables.open_table(table_url)
        stack.callback(table.close)
        bodies = queues.pack(docs)
        queue.put(bodies)
        per_message = -(-len(docs) // max(len(bodies), 1))
        t0 = time.perf_counter()
        finished = threading.Event()

        def report() -> None:  # documents done, to within a message
            if on_progress is not None:
                done = max(0, len(docs) - queue.waiting() * per_message)
                on_progress(done, time.perf_counter() - t0)

        def watch() -> None:
            while not finished.wait(0.5):
                report()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            slots = [(ref, *engines_reach, lease) for _ in cluster.engine_ids]
            cluster.map(_serve, slots, chunksize=1)
        finally:
            finished.set()
            watcher.join()
        seconds = time.perf_counter() - t0
        report()
        return table.rows(), seconds


def _serve(slot):
    from . import work

    ref, queue_url, table_url, lease = slot
    return work.serve(ref, queue_url, table_url, lease=lease)


class _pushed:
    """``value`` pushed to every engine under a fresh name while the block runs (a
    :class:`work.Pushed` names it to tasks), then forgotten there."""

    def __init__(self, cluster, what: str, value):
        self.cluster, self.value = cluster, value
        self.name = f"_cloudlab_{what}_{uuid.uuid4().hex[:12]}"

    def __enter__(self):
        from .work import Pushed

        self.cluster.push(**{self.name: self.value})
        return Pushed(self.name)

    def __exit__(self, *exc):
        if self.cluster.state == "running":
            self.cluster.forget(self.name)


# ------------------------------------------------------------ `cloudlab run classify`
def add_arguments(parser) -> None:
    parser.add_argument("--corpus", default=None,
                        help="arXiv metadata file, JSON lines (default: the shared 25k "
                             "corpus, or 20 Newsgroups where it is absent)")
    parser.add_argument("--mode", default="cluster", choices=["cluster", "queue"],
                        help="cluster: the cluster's scheduler is the queue; queue: a Redis "
                             "queue and table the engines reach, SQS and DynamoDB on EC2 "
                             "(default cluster)")
    parser.add_argument("--limit", type=int, default=None, help="read only the first N documents")
    parser.add_argument("--queue-url", default=None,
                        help="queue mode: a queue the engines reach (redis://... or sqs://...) "
                             "instead of one made for the run")
    parser.add_argument("--table-url", default=None,
                        help="queue mode: the results table (sqlite:///..., redis://... or "
                             "dynamodb://...) that goes with --queue-url")


def prepare(args) -> tuple[list[Document], str]:
    """The documents, read before any engine starts (so a bad path starts nothing)."""
    if args.corpus is None:
        docs, about = default_corpus()
        if args.limit is not None and args.limit < len(docs):
            return docs[:args.limit], f"the first {args.limit:,} of {about}"
        return docs, about
    return load_arxiv(args.corpus, limit=args.limit), str(args.corpus)


def run(cluster, args) -> dict:
    docs, corpus = args.inputs
    return {"corpus": corpus, **run_corpus(cluster, docs, mode=args.mode,
                                           queue_url=args.queue_url,
                                           table_url=args.table_url).to_dict()}


def summary(figures: dict) -> str:
    return (f"classified {figures['documents']:,} documents on {figures['engines']} engines "
            f"({figures['mode']} mode): accuracy {figures['accuracy']:.3f} on the held-out "
            f"split, {figures['docs_per_s']:,.0f} docs/s, {figures['rows']:,} rows.")

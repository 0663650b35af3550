"""The engines' side of classification: a model per engine, batches of documents in, rows
of the results table out.

A row is what the table holds per document: its key (the arXiv id), the worker (host and
process) that classified it, the true and the predicted label, title and date. Rows are
keyed by the document, so writing one twice (a document delivered again after its worker
died) leaves one row.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from .corpus import Document


@dataclass(frozen=True)
class Pushed:
    """A value the client pushed to every engine under ``name`` (``c.push``): a task names
    it instead of carrying it, and an engine that replaces a dead one is given it too. No
    path of the client's is involved: engines need not share its files."""

    name: str

    def get(self):
        from ...onhost.calls import fetch

        return fetch(self.name)


@dataclass(frozen=True)
class Row:
    key: str
    worker: str
    truth: str
    predicted: str
    title: str
    date: str

    def values(self) -> tuple:
        return (self.key, self.worker, self.truth, self.predicted, self.title, self.date)


COLUMNS = ("key", "worker", "truth", "predicted", "title", "date")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def predict_range(model: Pushed, corpus: Pushed, start: int, stop: int) -> tuple:
    """(worker, label indices) for documents ``start..stop-1`` of ``corpus``."""
    docs = corpus.get()[start:stop]
    return worker_name(), model.get().predict_index([d.text for d in docs]).astype("uint8")


def classify(model: Pushed, docs: list[Document]) -> list[Row]:
    """Rows for ``docs``, predicted by this engine's copy of the model."""
    predicted = model.get().predict([d.text for d in docs])
    worker = worker_name()
    return [Row(d.id, worker, d.label, p, d.title, d.date) for d, p in zip(docs, predicted)]


def document_frequencies(docs: list[Document]):
    from .model import document_frequencies as frequencies

    return frequencies([d.text for d in docs])


def features(docs: list[Document], idf):
    from .model import counts, tfidf

    return tfidf(counts([d.text for d in docs]), idf)


def serve(model: Pushed, queue_url: str, table_url: str, messages: int = 2,
          lease: float = 30.0, patience: float = 0.0) -> dict:
    """A worker: take ``messages`` batches of documents from the queue, classify them,
    write their rows, then acknowledge them; until nothing is left unacknowledged, for
    ``patience`` seconds more (for a queue still being filled). The batches other workers
    hold count as unacknowledged: their leases may run out, and then this worker takes
    them. Returns what it did."""
    import time

    from .queues import open_queue, unpack
    from .tables import open_table

    queue, table = open_queue(queue_url, lease), open_table(table_url)
    done, idle_since = 0, None
    try:
        while True:
            taken = queue.take(messages)
            if not taken:
                if queue.waiting() == 0:
                    if idle_since is None:
                        idle_since = time.monotonic()
                    if time.monotonic() - idle_since >= patience:
                        break
                time.sleep(0.05)
                continue
            idle_since = None
            docs = [doc for message in taken for doc in unpack(message.body)]
            table.put(classify(model, docs))
            queue.acknowledge(taken)
            done += len(docs)
    finally:
        table.close()
    return {"worker": worker_name(), "documents": done}

"""Classifier throughput on 1 and 2 engines, against the same work in bare processes.

    .venv/bin/python benchmarks/classify_scaling.py [--engine ipyparallel] [--reps 3]

Trains once, then, ``reps`` times and interleaved: classifies the whole corpus with
``run_corpus`` in the cluster form and in the queue form (local Redis and SQLite) on fresh
clusters of 1 and of 2 engines, and the same prediction in a bare process pool of 1 and 2
processes (no cluster, no queue: what this machine gives two processes at that moment).
Prints docs/s medians, the speed-up of 2 over 1 for each, and per-document latency.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time

import cloudlab
from cloudlab.workloads import classify
from cloudlab.workloads.classify import model as model_module

_model = None


def _init(path: str) -> None:
    global _model
    _model = model_module.Model.load(path)
    _model.predict(["warm up"])


def _predict(texts: list[str]) -> int:
    return len(_model.predict_index(texts))


def bare(path: str, texts: list[str], processes: int) -> float:
    """Docs/s of a pool of ``processes`` predicting ``texts`` in tasks of BATCH."""
    batches = [texts[a:a + classify.BATCH] for a in range(0, len(texts), classify.BATCH)]
    with multiprocessing.get_context("spawn").Pool(processes, _init, (path,)) as pool:
        pool.map(_predict, [["warm up"]] * processes)
        t0 = time.perf_counter()
        done = sum(pool.map(_predict, batches, chunksize=1))
        return done / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="ipyparallel")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    docs, about = classify.default_corpus()
    with cloudlab.Cluster(2, engine=args.engine) as c:
        fitted = classify.train(c, classify.split(docs)[0])
    path = tempfile.mkdtemp(prefix="cloudlab-bench-") + "/model.npz"
    fitted.save(path)
    texts = [d.text for d in docs]
    rates: dict[str, dict[int, list[float]]] = {k: {1: [], 2: []} for k in ("bare", "cluster", "queue")}
    accuracy = None
    for _ in range(args.reps):
        for n in (1, 2):
            rates["bare"][n].append(bare(path, texts, n))
            for mode in ("cluster", "queue"):
                with cloudlab.Cluster(n, engine=args.engine) as c:
                    run = classify.run_corpus(c, docs, mode=mode, model=fitted)
                assert run.rows == len(docs), (mode, n, run.rows)
                accuracy = run.accuracy
                rates[mode][n].append(run.docs_per_s)
    print(f"{about}\n{args.engine}, {args.reps} repetitions, held-out accuracy {accuracy:.3f}\n")
    print("| form | 1 engine (docs/s) | 2 engines (docs/s) | speed-up | ms per document, 1 engine |")
    print("|---|---|---|---|---|")
    for form, label in (("cluster", "cluster (c.map, batches of %d)" % classify.BATCH),
                        ("queue", "queue (Redis + SQLite)"), ("bare", "bare processes")):
        one, two = (statistics.median(rates[form][n]) for n in (1, 2))
        print(f"| {label} | {one:,.0f} | {two:,.0f} | {two / one:.2f} | {1000 / one:.3f} |")
    print("\nall runs (docs/s):", {f: {n: [round(v) for v in r[n]] for n in r} for f, r in rates.items()})


if __name__ == "__main__":
    main()

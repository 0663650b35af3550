"""Classifier throughput on 1 and 2 engines, against the same work in bare processes.

    .venv/bin/python benchmarks/classify_scaling.py [--engine ipyparallel] [--rounds 5]

Trains once, then, in each round, classifies the whole corpus on 1 and then on 2 engines
(fresh clusters) in the cluster form and in the queue form (local Redis and SQLite), and
predicts it in a bare process pool of 1 and of 2 processes (no cluster, no queue). Each
round also times a pure-Python loop in 1 and in 2 processes: what this machine gives two
processes at that moment. The forms run in a different order each round, and each pair
(1, then 2) back to back, so a speed-up compares moments close together. Prints docs/s
medians, the median and range of each form's speed-up, and per-document cost.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
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


def _spin(count: int) -> int:
    total = 0
    for k in range(count):
        total += k
    return total


def bare(path: str, texts: list[str], processes: int) -> float:
    """Docs/s of a pool of ``processes`` predicting ``texts`` in the cluster form's tasks."""
    ranges = classify._ranges(len(texts), processes)
    with multiprocessing.get_context("spawn").Pool(processes, _init, (path,)) as pool:
        pool.map(_predict, [["warm up"]] * processes)
        t0 = time.perf_counter()
        done = sum(pool.map(_predict, [texts[a:b] for a, b in ranges], chunksize=1))
        return done / (time.perf_counter() - t0)


def loop(processes: int, count: int = 30_000_000) -> float:
    """Loop steps/s of ``processes`` processes each counting to ``count``."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_spin, [1000] * processes)
        t0 = time.perf_counter()
        pool.map(_spin, [count] * processes, chunksize=1)
        return processes * count / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="ipyparallel")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    docs, about = classify.default_corpus()
    with cloudlab.Cluster(2, engine=args.engine) as c:
        fitted = classify.train(c, classify.split(docs)[0])
    path = tempfile.mkdtemp(prefix="cloudlab-bench-") + "/model.npz"
    fitted.save(path)
    texts = [d.text for d in docs]
    accuracy = None

    def measure(form: str, n: int) -> float:
        nonlocal accuracy
        if form == "bare":
            return bare(path, texts, n)
        if form == "loop":
            return loop(n)
        with cloudlab.Cluster(n, engine=args.engine) as c:
            run = classify.run_corpus(c, docs, mode=form, model=fitted)
        assert run.rows == len(docs), (form, n, run.rows)
        accuracy = run.accuracy
        return run.docs_per_s

    forms = ["cluster", "queue", "bare", "loop"]
    rates: dict[str, dict[int, list[float]]] = {f: {1: [], 2: []} for f in forms}
    for _ in range(args.rounds):
        for form in random.sample(forms, len(forms)):
            for n in (1, 2):
                rates[form][n].append(measure(form, n))
    print(f"{about}\n{args.engine}, {args.rounds} rounds, held-out accuracy {accuracy:.3f}\n")
    print("| form | 1 engine (docs/s) | 2 engines (docs/s) | speed-up, median (range) "
          "| ms per document, 1 engine |")
    print("|---|---|---|---|---|")
    labels = {"cluster": f"cluster (c.map, tasks of {classify.SMALLEST_BATCH}-{classify.BATCH})",
              "queue": "queue (Redis + SQLite)", "bare": "bare processes",
              "loop": "pure-Python loop, bare processes (steps/s)"}
    for form in forms:
        one, two = (statistics.median(rates[form][n]) for n in (1, 2))
        ratios = [b / a for a, b in zip(rates[form][1], rates[form][2])]
        cost = f"{1000 / one:.3f}" if form != "loop" else "-"
        print(f"| {labels[form]} | {one:,.0f} | {two:,.0f} | {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {cost} |")
    print("\nall runs, 1 engine; 2 engines:")
    for form in forms:
        print(f"  {form}: " + "; ".join(" ".join(f"{v:,.0f}" for v in rates[form][n]) for n in (1, 2)))


if __name__ == "__main__":
    main()

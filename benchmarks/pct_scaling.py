"""pCT throughput per stage on 1 and 2 engines: histories/s per core and the efficiency.

    .venv/bin/python benchmarks/pct_scaling.py [--size small] [--engine ipyparallel]

Runs ``cloudlab run pct --json`` on 1 engine and on 2 (fresh clusters, one after the other),
and prints a Markdown table: for each stage, histories per second per core (histories the
stage handled over its seconds times the engine count) and the efficiency of 2 engines
(time on 1 / (2 x time on 2)). It checks that both runs scored the same figures (to 1e-5 relative).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

STAGES = ("simulate", "cuts", "fbp", "system", "solve", "solve_tv")


def run(size: str, engine: str, engines: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "cloudlab.cli", "run", "pct", "--size", size,
                          "--engine", engine, "--engines", str(engines), "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--engine", default="ipyparallel")
    args = parser.parse_args()
    one, two = run(args.size, args.engine, 1), run(args.size, args.engine, 2)
    for key in ("max_insert_error_pct", "rmse", "kept", "rows"):
        if abs(one[key] - two[key]) > 1e-5 * max(1.0, abs(one[key])):  # float32 products
            raise SystemExit(f"1 and 2 engines disagree on {key}: {one[key]} vs {two[key]}")
    n = one["histories"]
    print(f"pCT {one['size']}, {n:,} histories, {args.engine}\n")
    print("| stage | 1 engine (s) | 2 engines (s) | histories/s per core, 1 | per core, 2 | efficiency |")
    print("|---|---|---|---|---|---|")
    rows = [*STAGES, "excluding simulation"]
    for stage in rows:
        if stage == "excluding simulation":
            a, b = one["seconds_excluding_simulation"], two["seconds_excluding_simulation"]
        else:
            a, b = one["seconds"].get(stage), two["seconds"].get(stage)
            if a is None or b is None:
                continue
        print(f"| {stage} | {a:.2f} | {b:.2f} | {n / a:,.0f} | {n / (2 * b):,.0f} | "
              f"{100 * a / (2 * b):.0f} % |")
    print(f"\npeak memory: {one['peak_memory_gb']:.2f} GB on 1 engine, "
          f"{two['peak_memory_gb']:.2f} GB on 2 (engines plus client)")


if __name__ == "__main__":
    main()

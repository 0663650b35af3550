"""GPU figures: pi samples/s and the large pCT reconstruction on the GPUs of this machine.

    .venv/bin/python -m pip install -e '.[gpu]'
    .venv/bin/python benchmarks/gpu_figures.py [--samples 1e12] [--pct-size large]

Prints the GPUs (NVML), then, on a cluster with one engine per GPU (``--gpus all``):

- pi: the fused CUDA kernel's samples/s over ``--samples`` points, and a check that the GPUs
  count exactly the points the CPU kernel counts (1e8 samples, same seed);
- pCT at ``--pct-size`` (docs/pct.md section 7's large: CTP404 320 x 320 at 0.5 mm, 1.5e7
  protons) with rows and DROP on the GPUs: seconds per stage, excluding simulation against the
  issue's 60 s, and every figure against its threshold.

Without a GPU it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

import cloudlab
from cloudlab import gpus

#: The issue's targets and docs/pct.md section 7's thresholds for the large size.
PI_TARGET = 200e9  # samples/s on one H100
PCT_SECONDS = 60.0
THRESHOLDS = {"max_insert_error_pct": 1.0, "air_max_abs": 0.03, "body_error_pct": 0.5,
              "noise_pct": 1.5, "noise_tv_pct": 1.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=float, default=1e12)
    parser.add_argument("--pct-size", default="large")
    parser.add_argument("--engine", default="ipyparallel")
    args = parser.parse_args()
    found, why = gpus.detect()
    if not found:
        print(f"No GPU here ({why}): nothing to measure.", file=sys.stderr)
        return 2
    from cloudlab.workloads import pct, pi

    print("GPUs:", "; ".join(f"{g.index}: {g.name}, {g.memory_mb / 1e3:.0f} GB" for g in found))
    with cloudlab.Cluster(gpus="all", engine=args.engine) as c:
        same = (pi.estimate(c, 1e8, seed=9, device="gpu").inside
                == pi.estimate(c, 1e8, seed=9, device="cpu").inside)
        pi.estimate(c, 1e10, seed=1)  # the kernels compiled and the GPUs awake
        result = pi.estimate(c, args.samples, seed=2)
        per_gpu = result.samples_per_s / len(found)
        print(f"\npi, {result.samples:.3g} samples on {len(found)} GPUs: "
              f"{result.samples_per_s / 1e9:,.1f} G samples/s, {per_gpu / 1e9:,.1f} per GPU "
              f"(target {PI_TARGET / 1e9:.0f}: {'met' if per_gpu >= PI_TARGET else 'MISSED'}); "
              f"estimate {result.estimate:.8f} +/- {result.stderr:.1e}; the GPU counted "
              f"{'exactly the CPU points' if same else 'OTHER POINTS THAN THE CPU'}.")
        run = pct.reconstruct(c, args.pct_size, device="gpu").to_dict()
    print(f"\npCT {run['size']}, {run['histories']:,} histories, rows and DROP on the GPUs:")
    print("| stage | seconds |\n|---|---|")
    for stage, seconds in run["seconds"].items():
        print(f"| {stage} | {seconds:.2f} |")
    total = run["seconds_excluding_simulation"]
    print(f"| excluding simulation | {total:.2f} (target < {PCT_SECONDS:.0f}: "
          f"{'met' if total < PCT_SECONDS else 'MISSED'}) |\n")
    print("| figure | value | threshold |\n|---|---|---|")
    for key, limit in THRESHOLDS.items():
        print(f"| {key} | {run[key]:.4f} | <= {limit} {'' if run[key] <= limit else 'MISSED'} |")
    for key, fbp_key in (("rmse", "rmse_fbp"), ("edge_mm", "edge_fbp_mm")):
        fbp = run[fbp_key]
        print(f"| {key} | {run[key]:.4f} | below the FBP's {fbp:.4f} "
              f"{'' if run[key] < fbp else 'MISSED'} |")
    print("\n" + json.dumps(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())

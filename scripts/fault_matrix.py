"""The fault matrix as a user meets it: kill -9 and SIGSTOP x map, submit, run, execute x both
engine kinds, each cell in a fresh process with the default profile (heartbeat_timeout 10 s),
2 local engines, engine 1 struck one second into the call. Prints a Markdown table: each
cell's outcome and its seconds from the call's start. (tests/chaos/test_fault_matrix.py
asserts the same cells, quicker, in the suite.)

    python scripts/fault_matrix.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

FAULTS = {"kill -9": "SIGKILL", "SIGSTOP": "SIGSTOP"}
CALLS = ["map", "submit", "run", "execute"]
BOUND = 40  # seconds a cell may take before it counts as a hang


def slow_square(x: int) -> int:
    time.sleep(0.5)
    return x * x


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def cell(engine: str, fault: str, call: str) -> dict:
    """One cell, in this process."""
    import cloudlab

    with cloudlab.Cluster(2, engine=engine) as c:
        pid = c._members.processes[c.engine_ids[1]].pid
        threading.Timer(1.0, os.kill, (pid, getattr(signal, FAULTS[fault]))).start()
        t0 = time.monotonic()
        try:
            if call == "map":
                exact = c.map(slow_square, range(12), chunksize=1) == [x * x for x in range(12)]
            elif call == "submit":
                futures = [c.submit(slow_square, x) for x in range(6)]
                exact = [f.result() for f in futures] == [x * x for x in range(6)]
            elif call == "run":
                c.run(pid_after, 3)
                exact = False  # (an engine was lost: a whole answer would be wrong)
            else:
                c.execute("import time; time.sleep(3)")
                exact = False
            outcome = "exact results" if exact else "WRONG: returned"
        except cloudlab.CloudlabError as error:
            outcome = f"{type(error).__name__}: {str(error).split(';')[0]}"
        except Exception as error:
            outcome = f"RAW {type(error).__module__}.{type(error).__name__}: {error}"
        return {"outcome": outcome, "seconds": round(time.monotonic() - t0, 2)}


def main() -> None:
    if len(sys.argv) == 4:
        print(json.dumps(cell(*sys.argv[1:])))
        return
    print("| engine | fault | call | outcome | seconds |\n|---|---|---|---|---|")
    for engine in ("ipyparallel", "dask"):
        for fault in FAULTS:
            for call in CALLS:
                try:
                    done = subprocess.run([sys.executable, __file__, engine, fault, call],
                                          capture_output=True, text=True, timeout=BOUND)
                    got = json.loads(done.stdout.strip().splitlines()[-1])
                except (subprocess.TimeoutExpired, IndexError, ValueError):
                    got = {"outcome": f"HANG (no answer within {BOUND} s)", "seconds": "-"}
                print(f"| {engine} | {fault} | {call} | {got['outcome']} | {got['seconds']} |",
                      flush=True)


if __name__ == "__main__":
    main()

"""cloudlab inside a container, as on Binder or a JupyterHub: a real cgroup of 1 core and
2 GiB (cgroup v1 here, made below the test's own groups; TESTING.md, "Containers").

The default engine count comes from the container's core, the memory guard's limit from
its memory, and an engine that allocates 1.5 GiB beside a second one is ended with
cloudlab's memory sentence while the client lives (the guard ends it; where the kernel's
OOM killer comes first, the sentence names the container's memory instead)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

V1 = Path("/sys/fs/cgroup")
GIB = 1 << 30


def _own_v1_group(controller: str) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    raise LookupError(controller)


@contextlib.contextmanager
def container(cores: float, memory: int):
    """A prefix of argv that runs a command in a fresh cgroup of ``cores`` and ``memory``
    bytes, below this process's own (so the test's own limits still hold); removed after."""
    if not (V1 / "memory" / "memory.limit_in_bytes").exists() or os.geteuid() != 0:
        pytest.skip("cgroup v1's memory and cpu controllers, as root, are needed here")
    name = f"cloudlab-test-{uuid.uuid4().hex[:8]}"
    groups = {c: V1 / c / _own_v1_group(c).lstrip("/") / name for c in ("memory", "cpu")}
    for group in groups.values():
        group.mkdir()
    try:
        (groups["memory"] / "memory.limit_in_bytes").write_text(str(memory))
        period = int((groups["cpu"] / "cpu.cfs_period_us").read_text())
        (groups["cpu"] / "cpu.cfs_quota_us").write_text(str(int(cores * period)))
        enter = "; ".join(f"echo $$ > {g / 'cgroup.procs'}" for g in groups.values())
        yield ["sh", "-c", f'{enter}; exec "$@"', "in-container"]
    finally:
        for group in groups.values():
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            for _ in range(100):
                try:
                    group.rmdir()
                    break
                except OSError:  # (its last processes are being reaped)
                    import time

                    time.sleep(0.05)


def _run_inside(prefix: list[str], code: str, timeout: float = 240) -> dict:
    done = subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_one_core_container_gets_one_engine_and_its_memory_share():
    with container(1, 2 * GIB) as inside:
        seen = _run_inside(inside, """
            import json, cloudlab
            from cloudlab.container import share
            c = cloudlab.Cluster()
            limit = c._backend.auto_memory_limit(2)
            print(json.dumps({"n": c.n, "source": share().source, "limit": limit}))
        """)
    assert seen["n"] == 1
    assert seen["source"] == "a cgroup's 1 CPU and 2.0 GiB"
    assert seen["limit"] == int(2 * GIB * 0.9 / 2)  # 90 % of the container's, for 2 engines


def _hog_in_container(mib: int, cluster: str) -> dict:
    """In a 1-CPU, 2 GiB container: a map item that holds ``mib`` MiB (a MiB at a time), on
    ``Cluster(2, <cluster>, task_retries=0)``; what it raised, and a map run after it."""
    with container(1, 2 * GIB) as inside:
        return _run_inside(inside, f"""
            import json, cloudlab

            def hog(_):
                held = [bytearray(1 << 20) for _ in range({mib})]
                return len(held)

            with cloudlab.Cluster(2, {cluster}, task_retries=0) as c:
                try:
                    c.map(hog, [0])
                    outcome = "returned"
                except cloudlab.CloudlabError as error:
                    outcome = str(error)
                alive = c.map(abs, [-1, -2])
            print(json.dumps({{"outcome": outcome, "after": alive}}))
        """)


@pytest.mark.parametrize("engine", ["ipyparallel", "dask"])
def test_an_engine_allocating_past_the_container_gets_the_memory_sentence(engine):
    seen = _hog_in_container(1536, f"engine={engine!r}")  # 1.5 GiB
    assert seen["after"] == [1, 2]  # the client lives, and the cluster works on
    assert seen["outcome"].startswith("item 0 of map hog was lost with 1 engine (engine ")
    assert ("ran out of memory: it held" in seen["outcome"]
            and "over its memory_limit of 966 MB" in seen["outcome"]
            or "the container's 2.0 GiB" in seen["outcome"]), seen["outcome"]


def test_without_the_guard_the_kernels_oom_kill_is_named_with_the_containers_memory():
    seen = _hog_in_container(3072, 'memory_limit="none"')  # 3 GiB: past the container
    assert seen["after"] == [1, 2]
    assert seen["outcome"].startswith(
        "item 0 of map hog was lost with 1 engine (engine 0 ran out of memory (killed by the "
        "kernel's out-of-memory killer: the container's 2.0 GiB))"), seen["outcome"]

"""Stopping a running map for real: c.cancel(), Ctrl-C in a script, the stop button of a kernel."""

from __future__ import annotations

import _thread
import signal
import threading
import time

import pytest
from jupyter_client.manager import start_new_kernel

import cloudlab
from chaos_helpers import wait_for
from conftest import wait_until_gone
from kernels import KernelError, execute


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def busy_engines(c: cloudlab.Cluster) -> list[int]:
    return sorted(e for e, held in _jobs_running(c).items() if held)


def _jobs_running(c):
    running = {}
    for job in list(c._jobs):
        for eid, held in job.running.items():
            running.setdefault(eid, []).extend(held)
    return running


def test_cancel_stops_tasks_already_running_and_leaves_the_cluster_usable(engine, reliability):
    with cloudlab.Cluster(2, engine=engine) as c:
        before = set(c.engine_ids)
        outcome: dict = {}

        def run_map() -> None:
            try:
                c.map(nap, [30] * 8, chunksize=1)
            except BaseException as error:  # noqa: BLE001 - the test inspects it
                outcome["error"], outcome["at"] = error, time.monotonic()

        thread = threading.Thread(target=run_map)
        thread.start()
        wait_for(lambda: len(busy_engines(c)) == 2, 30)
        time.sleep(0.5)  # the tasks are running on both engines now
        t0 = time.monotonic()
        assert c.cancel() == 1
        thread.join(10)
        assert not thread.is_alive()
        stopped = outcome["at"] - t0
        assert isinstance(outcome["error"], cloudlab.Cancelled), outcome
        assert stopped < 2, f"the map stopped {stopped:.2f} s after cancel"
        assert "\n" not in str(outcome["error"])
        # The engines that ran the 30 s tasks were ended and replaced.
        assert [d.ordered for d in c.deaths] == [True, True]
        recovered = wait_for(lambda: len(c._members.usable()) == 2, 30)
        assert not set(c.engine_ids) & before
        assert c.map(nap, [0, 0]) == [0, 0]
        reliability("cancel of a map of 30 s tasks (c.cancel)", engine,
                    f"map stopped in {stopped:.2f} s; engines replaced", stopped + recovered)
    assert wait_until_gone(c.name, 10) == []


def test_ctrl_c_in_a_script_stops_the_running_map(engine):
    # As in a script run from a terminal (a background job of a shell ignores SIGINT, and
    # interrupt_main then does nothing).
    default = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_stops_the_running_map(engine)
    finally:
        signal.signal(signal.SIGINT, default)


def _ctrl_c_stops_the_running_map(engine):
    with cloudlab.Cluster(2, engine=engine) as c:
        before = set(c.engine_ids)
        timer = threading.Timer(1.0, _thread.interrupt_main)  # what Ctrl-C does
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            c.map(nap, [30] * 4, chunksize=1)
        assert time.monotonic() - t0 < 3
        wait_for(lambda: not set(c.engine_ids) & before, 5)  # both engines ended
        wait_for(lambda: len(c._members.usable()) == 2, 30)
        assert c.map(nap, [0]) == [0]


@pytest.mark.slow
def test_the_kernel_stop_button_stops_a_map_of_30_s_tasks_within_2_s(engine, reliability):
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        execute(client, f"%load_ext cloudlab\n%cluster start 2 --engine {engine}")
        execute(client, "import time\ndef nap(s):\n    time.sleep(s)\n    return s")
        msg_id = client.execute("cluster.map(nap, [30] * 4, chunksize=1)")
        time.sleep(2)  # the tasks run on both engines
        t0 = time.monotonic()
        manager.interrupt_kernel()  # the notebook's stop button
        while True:
            msg = client.get_iopub_msg(timeout=10)
            if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "idle"):
                break
        stopped = time.monotonic() - t0
        assert stopped < 2, f"the cell ended {stopped:.2f} s after the interrupt"
        out = execute(client, "print(cluster.map(nap, [0, 0]))", timeout=60)
        assert out.strip() == "[0, 0]"
        reliability("kernel interrupt (stop button) during a map of 30 s tasks", engine,
                    "cell ended; next map ran", stopped)
        with pytest.raises(KernelError, match="ZeroDivisionError"):
            execute(client, "cluster.map(lambda x: 1 / x, [0])")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert wait_until_gone(timeout=10) == []

"""A real Jupyter kernel owns the cluster: %cluster start 16, then kill -9 of the kernel."""

import os
import signal
import time

import pytest
from jupyter_client.manager import start_new_kernel

from conftest import launched, wait_until_gone
from kernels import KernelError, execute


@pytest.mark.slow
def test_kill_9_of_a_kernel_running_16_engines_leaves_nothing(engine):
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        execute(client, "%load_ext cloudlab")
        out = execute(client, f"%cluster start 16 --engine {engine}\n%cluster status")
        assert "16 engines (16 idle)" in out, out
        name = execute(client, "print(cluster.name)").strip()
        # An error on all 16 engines is shown once, with the count and one traceback.
        with pytest.raises(KernelError) as error:
            execute(client, "%%everywhere\nraise ValueError('boom')")
        shown = "\n".join(error.value.traceback)
        assert shown.count("ValueError: boom on 16 engines [0-15]") == 1
        assert shown.count("Traceback (most recent call last)") == 1
        assert len(launched(name)) == 17  # controller + 16 engines
        os.kill(manager.provisioner.process.pid, signal.SIGKILL)  # no atexit, no cleanup
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    t0 = time.monotonic()
    survivors = wait_until_gone(name, 10)
    assert survivors == [], [p.cmdline() for p in survivors]
    assert wait_until_gone(timeout=5) == []  # the kernel's fork server went with it
    print(f"{engine}: 17 processes gone {time.monotonic() - t0:.2f} s after kill -9 of the kernel")

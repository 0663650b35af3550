"""Nothing outlives its owner: stop, with-blocks, exceptions, exit, kill -9, failed starts."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import cloudlab
from cloudlab.backends.base import Command
from cloudlab.registry import records_dir
from cloudlab.security import runtime_dir
from conftest import launched, our_processes, wait_until_gone


def run_script(body: str, tmp_path: Path, wait: bool = True, **kwargs):
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(body))
    args = [sys.executable, str(script)]
    if wait:
        return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              **kwargs)
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, **kwargs)


def test_with_block_exception_stops_everything(engine):
    with pytest.raises(RuntimeError, match="user code failed"):
        with cloudlab.Cluster(2, engine=engine) as c:
            assert len(launched(c.name)) == 3  # controller + 2 engines
            raise RuntimeError("user code failed")
    assert our_processes(c.name) == []
    assert c.state == "stopped"
    assert not (records_dir() / f"{c.name}.json").exists()
    c.stop()  # stopping twice is harmless


def test_submits_still_running_at_stop_end_in_one_sentence(engine):
    """Their tasks went with the cluster: each future says so, rather than waiting for
    ever (ipyparallel's) or raising the engine kind's own cancellation (Dask's)."""
    c = cloudlab.Cluster(2, engine=engine).start()
    before_code = c.submit(time.sleep, 30)  # (sent once the user's code is on the engines)
    c.submit(abs, -1).result()
    direct = c.submit(time.sleep, 30)  # (sent at once)
    time.sleep(0.5)
    c.stop()
    for future in (before_code, direct):
        with pytest.raises(cloudlab.ClusterStateError,
                           match=rf"^submit sleep did not finish: cluster {c.name} was stopped$"):
            future.result(timeout=10)
    assert direct.cancel() is False  # (a sent task cannot be withdrawn by its future)


def test_a_stop_of_fresh_interpreters_leaves_their_groups_empty(engine):
    """Each runs under a lease keeper (its group's leader) that reaps its engine; nothing
    of a group is left when stop returns, not even a zombie. (How soon stop returns is
    the benchmark's stop2 measure: an engine killed beside its keeper is left to init,
    and waiting for init to reap it took seconds.)"""
    import psutil

    c = cloudlab.Cluster(2, engine=engine, fork_server=False).start()
    groups = {p.pid for p in launched(c.name)}
    assert len(groups) == 3
    c.stop()
    left = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) in groups:
                left.append((p.pid, p.info["status"]))
        except ProcessLookupError:
            pass
    assert left == []


def test_interpreter_exit_without_stop_leaves_nothing(engine, tmp_path):
    result = run_script(f"""
        import cloudlab
        c = cloudlab.Cluster(2, engine={engine!r}).start()
        print(c.name, c.map(abs, [-1, -2]))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    name, rest = result.stdout.split(" ", 1)
    assert rest.strip() == "[1, 2]"
    assert wait_until_gone(name, 10) == []


def test_kill_9_of_the_owning_script_ends_every_process_within_10_s(engine, tmp_path):
    owner = run_script(f"""
        import time, cloudlab
        c = cloudlab.Cluster(3, engine={engine!r}).start()
        print(c.name, flush=True)
        time.sleep(600)
    """, tmp_path, wait=False)
    name = owner.stdout.readline().strip()
    assert len(launched(name)) == 4, f"cluster {name!r} did not start"
    workdirs = list(runtime_dir().glob(f"{name}-*"))
    assert len(workdirs) == 1
    owner.kill()
    owner.wait()
    t0 = time.monotonic()
    survivors = wait_until_gone(name, 10)
    assert survivors == [], [p.cmdline() for p in survivors]
    print(f"{engine}: all processes gone {time.monotonic() - t0:.2f} s after kill -9")
    assert not workdirs[0].exists()  # the agent cleans the cluster's files too
    assert not (records_dir() / f"{name}.json").exists()


def test_script_without_main_guard_works(tmp_path):
    # No `if __name__ == "__main__":` - engines are started by command, never by
    # re-importing the user's script, so this is fine.
    result = run_script("""
        import cloudlab
        with cloudlab.Cluster(2, engine="dask") as c:
            print(sum(c.map(lambda x: x * 2, range(100))))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "9900"
    assert "Traceback" not in result.stderr


def test_failed_engine_start_raises_one_error_and_leaves_nothing(engine, monkeypatch):
    engine_cls = cloudlab.Cluster(1, engine=engine)._engine_cls
    original = engine_cls.engine_command

    def broken(self, engine_id):
        command = original(self, engine_id)
        if engine_id == 1:
            return Command(command.name, "cloudlab_no_such_module:main", command.args, command.env)
        return command

    monkeypatch.setattr(engine_cls, "engine_command", broken)
    c = cloudlab.Cluster(3, engine=engine)
    with pytest.raises(cloudlab.StartError) as e:
        c.start()
    message = str(e.value)
    assert "engine-1" in message and "nothing is left running" in message
    assert "No module named 'cloudlab_no_such_module'" in message
    assert c.state == "failed"
    assert our_processes(c.name) == []
    assert not (records_dir() / f"{c.name}.json").exists()
    assert not list(runtime_dir().glob(f"{c.name}-*"))


def test_start_timeout_is_a_typed_error_and_cleans_up(monkeypatch):
    c = cloudlab.Cluster(2, engine="dask", start_timeout=0.01)
    with pytest.raises(cloudlab.StartError):
        c.start()
    assert our_processes(c.name) == []


def test_two_clusters_in_one_process_do_not_interfere():
    with cloudlab.Cluster(2) as a, cloudlab.Cluster(2, engine="dask") as b:
        a.push(who="a")
        b.push(who="b")
        assert set(a.pull("who").values()) == {"a"}
        assert set(b.pull("who").values()) == {"b"}
        assert {p.pid for p in our_processes(a.name)}.isdisjoint(
            {p.pid for p in our_processes(b.name)})
        a.stop()
        assert our_processes(a.name) == []
        assert b.map(abs, [-5]) == [5]
        assert cloudlab.running_clusters() == [b]
    assert our_processes(b.name) == []


def test_scale_up_and_down_keeps_processes_in_step(engine):
    with cloudlab.Cluster(1, engine=engine) as c:
        c.scale(3)
        assert c.engine_ids == [0, 1, 2]
        assert len(launched(c.name)) == 4
        assert c.map(lambda x: x + 1, range(6)) == [1, 2, 3, 4, 5, 6]
        c.scale(1)
        assert c.engine_ids == [0]
        assert wait_until_gone_count(c.name, 2) == 2
        assert [r.state for r in c.status()] == ["idle"]
        with pytest.raises(cloudlab.ConfigError, match="at least 1"):
            c.scale(0)


def wait_until_gone_count(name, expected, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(launched(name)) != expected:
        time.sleep(0.05)
    return len(launched(name))


def test_operations_on_a_stopped_cluster_say_what_to_do():
    c = cloudlab.Cluster(1)
    with pytest.raises(cloudlab.ClusterStateError, match="start it first"):
        c.map(abs, [1])
    with pytest.raises(cloudlab.ClusterStateError, match="start it first"):
        c.scale(2)


def test_cluster_stopped_from_outside_says_so():
    from cloudlab.registry import read_records, stop_record

    with cloudlab.Cluster(1, engine="dask") as c:
        [record] = [r for r in read_records() if r.name == c.name]
        stop_record(record)  # what `cloudlab stop --all` does from another process
        with pytest.raises(cloudlab.ClusterStateError,
                           match="is dead: its controller (was killed|exited)"):
            c.map(abs, [1])
        assert wait_until_gone(c.name, 5) == []
    assert c.state == "dead"
    assert "stopped from outside" in c.why_not_running()


def test_interrupting_a_start_stops_what_it_had_started(engine):
    from cloudlab import _aio

    c = cloudlab.Cluster(3, engine=engine)
    future = _aio.submit(c._start())  # what Ctrl-C during c.start() cancels
    deadline = time.monotonic() + 30
    while len(launched(c.name)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(launched(c.name)) >= 2, "the start never launched an engine"
    future.cancel()
    assert wait_until_gone(c.name, 10) == []
    assert c.state == "failed"


def test_a_failed_scale_up_leaves_the_cluster_as_it_was(engine, monkeypatch):
    with cloudlab.Cluster(1, engine=engine) as c:
        original = type(c._engine).engine_command

        def broken(self, engine_id):
            command = original(self, engine_id)
            if engine_id == 2:
                return Command(command.name, "cloudlab_no_such_module:main", command.args,
                               command.env)
            return command

        monkeypatch.setattr(type(c._engine), "engine_command", broken)
        with pytest.raises(cloudlab.StartError, match=f"engine-2 .*{c.name} keeps its other 1 engines"):
            c.scale(3)
        assert c.state == "running" and c.engine_ids == [0]
        assert len(launched(c.name)) == 2  # controller + engine 0
        assert c.map(abs, [-1, -2]) == [1, 2]

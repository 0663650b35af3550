"""Secure by default: loopback only, private files, a second user locked out, TLS when remote.

The second-user test creates a real Unix user (``cloudlab-other``; it needs
root, as in CI) and runs ``tests/attacker.py`` as that user with Debian's
Python and python3-zmq: it knows the ports and even an engine's identity, as
a port scan and luck might tell it, but not the keys.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

import cloudlab
from conftest import ROOT, launched

OTHER = "cloudlab-other"
SYSTEM_PYTHON = "/usr/bin/python3"


def cluster_pids(c: cloudlab.Cluster) -> set[int]:
    pids = set()
    for proc in launched(c.name):
        pids.add(proc.pid)
        pids.update(child.pid for child in proc.children(recursive=True))
    return pids


def test_everything_listens_on_loopback_only(engine):
    with cloudlab.Cluster(2, engine=engine) as c:
        pids = cluster_pids(c)
        listening = [conn for conn in psutil.net_connections(kind="inet")
                     if conn.pid in pids and conn.status == psutil.CONN_LISTEN]
        assert listening, "found no listening socket of the cluster"
        assert {conn.laddr.ip for conn in listening} <= {"127.0.0.1", "::1"}, listening


def test_connection_files_keys_and_logs_are_the_owners_only(engine):
    with cloudlab.Cluster(2, engine=engine) as c:
        c.map(abs, range(10))
        workdir = c._workdir
        for folder in (workdir.parent, workdir):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
            assert folder.stat().st_uid == os.getuid()
        # Connection files, keys, certificates and logs: the owner's only. (Everything else,
        # IPython's startup READMEs say, sits behind the 0700 directory too.)
        ours = [p for p in workdir.rglob("*")
                if p.is_file() and p.suffix in (".json", ".pem", ".log", ".last-words")]
        assert any(p.suffix in (".json", ".pem") for p in ours), f"no key in {workdir}"
        assert any(p.suffix == ".log" for p in ours), f"no log in {workdir}"
        loose = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in ours
                 if stat.S_IMODE(p.stat().st_mode) & 0o077}
        assert loose == {}


def test_remote_dask_engines_use_mutual_tls_and_refuse_a_client_without_the_certificate(
        monkeypatch):
    """What remote backends get (checked here on local processes, told they are remote)."""
    import distributed

    from cloudlab.engines import dask as dask_engine

    init = dask_engine.DaskEngine.__init__
    monkeypatch.setattr(dask_engine.DaskEngine, "__init__",
                        lambda self, *a, **k: init(self, *a, **{**k, "remote": True}))
    with cloudlab.Cluster(2, engine="dask") as c:
        address = c.client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert c.map(abs, [-1, -2]) == [1, 2]
        key = c._engine.tls.key
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        with pytest.raises((OSError, TimeoutError)):
            distributed.Client(address.replace("tls://", "tcp://"), timeout=2)
        with pytest.raises((OSError, TimeoutError, TypeError)):
            distributed.Client(address, timeout=2)


def test_remote_ipyparallel_engines_use_curvezmq(monkeypatch):
    """What remote backends get (checked here on local processes, told they are remote)."""
    from cloudlab.engines import ipp

    init = ipp.IPyParallelEngine.__init__
    monkeypatch.setattr(ipp.IPyParallelEngine, "__init__",
                        lambda self, *a, **k: init(self, *a, **{**k, "remote": True}))
    with cloudlab.Cluster(2, engine="ipyparallel") as c:
        connection = json.loads(next(c._workdir.rglob("ipcontroller-*-client.json")).read_text())
        assert len(connection.get("curve_serverkey") or "") == 40  # a Z85 public key
        assert c.client.curve_serverkey  # the client speaks CurveZMQ
        assert c.map(abs, [-1, -2, -3]) == [1, 2, 3]


@pytest.fixture(scope="module")
def other_user() -> str:
    """A second Unix user, created if needed (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to create a second Unix user (useradd)")
    if not (shutil.which("useradd") and shutil.which("runuser") and Path(SYSTEM_PYTHON).exists()):
        pytest.skip("needs useradd, runuser and /usr/bin/python3 (Debian's python3)")
    if subprocess.run([SYSTEM_PYTHON, "-c", "import zmq"], capture_output=True).returncode:
        pytest.skip("needs Debian's python3-zmq (apt-get install python3-zmq)")
    if subprocess.run(["id", OTHER], capture_output=True).returncode:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", OTHER], check=True)
    return OTHER


@pytest.fixture(scope="module")
def attacker_script() -> Path:
    """attacker.py where any user can read it (the checkout may be in a private home)."""
    folder = Path(tempfile.mkdtemp(prefix="cloudlab-attacker-"))
    folder.chmod(0o755)
    script = folder / "attacker.py"
    shutil.copy(ROOT / "tests" / "attacker.py", script)
    script.chmod(0o644)
    yield script
    shutil.rmtree(folder, ignore_errors=True)


def attack(script: Path, *args: str, user: str | None) -> dict:
    command = [SYSTEM_PYTHON, str(script), *args]
    if user is not None:
        command = ["runuser", "-u", user, "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_for_file(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return path.exists()


def test_a_second_user_can_neither_read_nor_drive_an_ipyparallel_cluster(other_user,
                                                                         attacker_script):
    with cloudlab.Cluster(1, engine="ipyparallel") as c:
        connection = next(c._workdir.rglob("ipcontroller-*-client.json"))
        info = json.loads(connection.read_text())
        files = attack(attacker_script, "files", str(connection), user=other_user)
        assert files == {str(connection): "PermissionError"}
        engine_ident = c.client._engines[0]
        target = Path(tempfile.gettempdir(), f"cloudlab-pwned-{uuid.uuid4().hex}")
        forged = attack(attacker_script, "ipp", str(info["mux"]), engine_ident,
                        uuid.uuid4().hex, str(target), user=other_user)
        assert not wait_for_file(target, 3), "an engine ran code from a message without the key"
        assert forged == {"reply": False}
        # The same message signed with the cluster's key does run: the attack was real.
        attack(attacker_script, "ipp", str(info["mux"]), engine_ident, info["key"],
               str(target), user=None)
        assert wait_for_file(target, 10), "the control attempt, with the key, did not run"
        target.unlink()


def test_a_second_user_cannot_connect_to_a_dask_cluster(other_user, attacker_script):
    with cloudlab.Cluster(1, engine="dask") as c:
        scheduler = int(c.client.scheduler.address.rsplit(":", 1)[1])
        worker = int(next(iter(c._engine._address.values())).rsplit(":", 1)[1])
        files = attack(attacker_script, "files", str(c._engine.scheduler_file), user=other_user)
        assert set(files.values()) == {"PermissionError"}
        for port in (scheduler, worker):
            answer = attack(attacker_script, "dask", str(port), user=other_user)
            assert answer["result"] == "closed", (port, answer)
            # The same connection from the owner's user is answered: the refusal was real.
            assert attack(attacker_script, "dask", str(port), user=None)["result"] == "accepted"
        assert c.map(abs, [-3]) == [3]  # and the owner's cluster is unharmed

"""The magics in a real IPython shell: what a notebook user types, and their mistakes."""

import pytest
from IPython.core.error import UsageError

import cloudlab
from cloudlab.magics import CLUSTER_HELP, ClusterMagics
from conftest import launched, our_processes


def magic(ip, line):
    name, _, rest = line.partition(" ")
    return ip.run_line_magic(name, rest)


def test_cluster_lifecycle_through_magics(ip, capsys, engine):
    magic(ip, f"cluster start 2 --engine {engine}")
    c = ip.user_ns["cluster"]
    assert isinstance(c, cloudlab.Cluster) and c.engine_kind == engine
    assert ClusterMagics.active is c
    out = capsys.readouterr().out
    assert f"Started {c.name}: 2 {engine} engines on local" in out

    magic(ip, "cluster status")
    out = capsys.readouterr().out
    assert "2 engines (2 idle)" in out
    assert out.count("idle") == 3  # summary + one per engine

    ip.user_ns["data"] = [1, 2, 3]
    magic(ip, "push data")
    assert magic(ip, "pull data") == {0: [1, 2, 3], 1: [1, 2, 3]}

    capsys.readouterr()
    ip.run_cell_magic("everywhere", "", "import os\nprint('engine', os.environ['CLOUDLAB_ENGINE_ID'])")
    out = capsys.readouterr().out
    assert sorted(out.splitlines()) == ["[0] engine 0", "[1] engine 1"]
    ip.run_cell_magic("everywhere", "--targets 1", "print('only me')")
    assert capsys.readouterr().out == "[1] only me\n"

    magic(ip, "cluster scale 3")
    assert len(launched(c.name)) == 4
    magic(ip, "cluster list")
    assert f"* {c.name}" in capsys.readouterr().out
    magic(ip, "cluster stop")
    assert our_processes(c.name) == []
    assert "cluster" not in ip.user_ns
    with pytest.raises(UsageError, match="nothing to stop"):
        magic(ip, "cluster stop")


def test_px_magics_work_on_the_active_ipyparallel_cluster(ip, capsys):
    magic(ip, "cluster start 2")
    ip.run_cell_magic("px", "", "x = 41 + 1")
    assert magic(ip, "pull x") == {0: 42, 1: 42}
    magic(ip, "cluster stop")


def test_stop_all_stops_every_cluster(ip, capsys):
    magic(ip, "cluster start 1")
    magic(ip, "cluster start 1 --engine dask")
    names = [c.name for c in cloudlab.running_clusters()]
    assert len(names) == 2
    magic(ip, "cluster stop --all")
    assert cloudlab.running_clusters() == []
    assert all(our_processes(n) == [] for n in names)


@pytest.mark.parametrize("line,message", [
    ("cluster start -3", "at least 1"),
    ("cluster start 0", "at least 1, not 0"),
    ("cluster start lots", "whole number like 4, not 'lots'"),
    ("cluster start 100000", "Cannot start 100000 engines here: each engine needs about"),
    ("cluster start 2 --engine spark", "Unknown engine 'spark': use one of dask, inprocess, "
                                       "ipyparallel"),
    ("cluster start 2 --backend moon", "Unknown backend 'moon': use one of azure, ec2, "
                                       "inprocess, local, slurm, ssh."),
    ("cluster start 2 --profile nope", "Unknown profile 'nope': use one of aws-cpu, "
                                       "aws-gpu-spot, azure, local, slurm, ssh."),
    ("cluster scale 4", "No cluster is running: start one with %cluster start N first"),
    ("cluster status", "No cluster is running"),
    ("cluster stop", "nothing to stop"),
    ("cluster", "needs a command: start, status, scale, stop, list or sync"),
    ("cluster launch 3", "invalid choice: 'launch'"),
    ("push", "needs variable names"),
    ("push undefined_name", "'undefined_name' is not defined in this notebook"),
    ("pull", "takes one variable name"),
])
def test_bad_input_is_one_sentence_and_starts_nothing(ip, line, message):
    before = our_processes()
    with pytest.raises(UsageError) as e:
        magic(ip, line)
    assert message in str(e.value)
    assert "\n" not in str(e.value).strip()
    assert our_processes() == before == []
    assert cloudlab.running_clusters() == []


def test_capacity_error_suggests_a_number(ip):
    with pytest.raises(UsageError, match=r"ask for at most \d+\.$"):
        magic(ip, "cluster start 100000")


def test_cluster_help_documents_every_command(ip):
    doc = ip.find_line_magic("cluster").__doc__
    assert doc == CLUSTER_HELP
    for word in ("start", "status", "scale", "stop", "--all", "list", "%push", "%pull",
                 "%%everywhere", "--engine", "--profile", "--backend"):
        assert word in doc


def test_extension_loads_from_ipython_config(tmp_path):
    import subprocess
    import sys

    profile = tmp_path / "profile_default"
    profile.mkdir()
    (profile / "ipython_config.py").write_text("c.InteractiveShellApp.extensions = ['cloudlab']\n")
    result = subprocess.run(
        [sys.executable, "-m", "IPython", f"--ipython-dir={tmp_path}", "--no-banner",
         "-c", "print('cluster' in get_ipython().magics_manager.magics['line'])"],
        capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("True"), result.stderr


def test_everywhere_refuses_an_unknown_engine_id(ip):
    magic(ip, "cluster start 2")
    try:
        with pytest.raises(UsageError, match=r"No engine 7 in cluster .*: engines are 0-1\."):
            ip.run_cell_magic("everywhere", "--targets 7", "print('never')")
    finally:
        magic(ip, "cluster stop")

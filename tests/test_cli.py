"""The cloudlab command, run as a user runs it."""

import json
import math
import signal
import subprocess
import sys

import pytest

from conftest import launched, wait_until_gone

CLOUDLAB = [sys.executable, "-m", "cloudlab.cli"]


def cloudlab(*args, timeout=180):
    return subprocess.run([*CLOUDLAB, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("engine", ["ipyparallel", "dask"])
def test_run_pi_json_is_within_five_standard_errors(engine):
    result = cloudlab("run", "pi", "--engines", "2", "--samples", "1e9", "--engine", engine,
                      "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["engine"] == engine and figures["engines"] == 2
    assert figures["samples"] == 10**9
    assert abs(figures["estimate"] - math.pi) < 5 * figures["stderr"]
    assert 0 < figures["stderr"] < 1e-4
    assert figures["samples_per_s"] == pytest.approx(figures["samples"] / figures["seconds"])
    print(f"{engine}: {figures['samples_per_s'] / 1e9:.2f} G samples/s on 2 engines")


def test_run_pi_is_reproducible_for_a_seed_across_engine_kinds():
    results = [json.loads(cloudlab("run", "pi", "--engines", n, "--samples", "1e7", "--seed",
                                   "7", "--engine", e, "--json").stdout)
               for n, e in (("1", "ipyparallel"), ("3", "dask"))]
    assert results[0]["inside"] == results[1]["inside"]


@pytest.mark.parametrize("engine", ["ipyparallel", "dask"])
def test_start_list_and_stop_all_from_other_processes(engine):
    owner = subprocess.Popen([*CLOUDLAB, "start", "2", "--engine", engine], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        line = owner.stdout.readline()
        assert "Press Ctrl-C to stop" in line, line
        name = line.split(":")[0]
        listed = cloudlab("list").stdout
        assert name in listed and "2 engines" in listed
        stopped = cloudlab("stop", "--all")
        assert f"Stopped {name}." in stopped.stdout
        assert wait_until_gone(name, 10) == []
        assert "No clusters are running." in cloudlab("list").stdout
        # The foreground owner notices, says so and exits (with its fork server).
        rest = owner.communicate(timeout=10)[0]
        assert owner.returncode == 1, rest
        assert rest.startswith(f"{name} ended from outside: its controller "), rest
        assert wait_until_gone(timeout=10) == []
    finally:
        owner.kill()
        owner.wait()


def test_ctrl_c_stops_the_foreground_cluster_cleanly():
    owner = subprocess.Popen([*CLOUDLAB, "start", "2"], text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    line = owner.stdout.readline()
    name = line.split(":")[0]
    assert len(launched(name)) == 3, line
    owner.send_signal(signal.SIGINT)
    rest = owner.communicate(timeout=30)[0]
    assert owner.returncode == 0
    assert f"Stopped {name}." in rest
    assert "Traceback" not in rest
    assert wait_until_gone(name, 1) == []


@pytest.mark.parametrize("args,message", [
    (["run", "pi", "--engines", "0"], "at least 1"),
    (["run", "pi", "--engine", "spark"], "Unknown engine 'spark'"),
    (["start", "lots"], "whole number like 4"),
    (["stop"], "name a cluster to stop, or use --all"),
    (["stop", "nope"], "no running cluster named 'nope'"),
    (["run", "classify", "--corpus", "/nonexistent/corpus.jsonl"],
     "No corpus at /nonexistent/corpus.jsonl: give the path of an arXiv metadata file"),
    (["run", "classify", "--corpus", "/etc/hostname"], "line 1: not an arXiv metadata record"),
    (["run", "pi", "--gpus", "two"], 'option \'gpus\' must be "all", a count like 2, or "none"'),
    (["run", "pi", "--device", "gpu", "--engines", "1"],
     "device='gpu' needs engines with GPUs: start the cluster with --gpus all"),
])
def test_bad_input_is_one_line_on_stderr(args, message):
    result = cloudlab(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_profiles_lists_the_repository_profiles():
    out = cloudlab("profiles").stdout
    names = [line.split()[0] for line in out.splitlines()]
    assert names == ["aws-cpu", "aws-gpu-spot", "azure", "local", "slurm", "ssh"]  # by name, all
    assert "profiles/local.toml" in out

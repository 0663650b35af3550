"""A container's share of the machine, read as cloudlab reads it: from a root folder laid out
as /proc and /sys are, for cgroup v1 and v2, and from JupyterHub's variables."""

from __future__ import annotations

import os

import psutil

from cloudlab.container import share

RUNNABLE = len(os.sched_getaffinity(0))
MACHINE = psutil.virtual_memory().total


def lay(root, cgroup: str, files: dict[str, str]):
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        path = root / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_v2_quota_rounds_up_and_a_group_above_can_set_the_limit(tmp_path):
    """Binder and containers cap CPU by quota, not by the cores a process may run on."""
    root = lay(tmp_path, "0::/user/hub/pod\n", {
        "cgroup.controllers": "cpu memory\n",
        "user/hub/pod/cpu.max": "150000 100000\n",  # 1.5 CPUs
        "user/hub/pod/memory.max": "max\n",
        "user/hub/memory.max": f"{2 * 2**30}\n",  # the parent's 2 GiB bind the pod
    })
    found = share(root, {})
    assert (found.cores, found.memory) == (min(2, RUNNABLE), min(MACHINE, 2 * 2**30))
    assert found.source == "a cgroup's 1.5 CPUs and 2.0 GiB"
    (root / "sys/fs/cgroup/user/hub/pod/cpu.max").write_text("50000 100000\n")
    assert share(root, {}).cores == 1
    (root / "sys/fs/cgroup/user/hub/pod/cpu.max").write_text("max 100000\n")
    assert share(root, {}).cores == RUNNABLE


def test_v1_quota_and_memory_limit_and_v1s_no_limit(tmp_path):
    root = lay(tmp_path, "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        "memory/docker/abc/memory.limit_in_bytes": f"{2**30}\n",
        "memory/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "no limit"
    })
    found = share(root, {})
    assert (found.cores, found.memory) == (1, min(MACHINE, 2**30))
    (root / "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    (root / "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes").write_text(
        "9223372036854771712\n")
    assert share(root, {}) == share(tmp_path / "nothing", {})  # no limit at all: the machine


def test_a_container_seeing_its_group_as_the_mount_root(tmp_path):
    """Inside a container, /proc/self/cgroup names the group on the host; the container's
    mount shows that group as its root."""
    root = lay(tmp_path, "0::/kubepods/pod1/c1\n", {
        "cgroup.controllers": "cpu memory\n", "cpu.max": "100000 100000\n",
        "memory.max": f"{3 * 2**30}\n"})
    assert (share(root, {}).cores, share(root, {}).memory) == (1, min(MACHINE, 3 * 2**30))


def test_jupyterhubs_variables_count_and_the_smallest_share_wins(tmp_path):
    nothing = tmp_path / "nothing"
    found = share(nothing, {"CPU_LIMIT": "1.0", "MEM_LIMIT": str(2 * 2**30)})
    assert (found.cores, found.memory) == (1, min(MACHINE, 2 * 2**30))
    assert found.source == "CPU_LIMIT 1.0, MEM_LIMIT 2.0 GiB"
    assert share(nothing, {"CPU_LIMIT": "", "MEM_LIMIT": "lots"}) == share(nothing, {})
    machine = share(nothing, {})
    assert (machine.cores, machine.memory, machine.source) == (RUNNABLE, MACHINE,
                                                               "this machine")


def test_oom_kills_are_counted_in_this_process_group_v2_then_v1(tmp_path):
    from cloudlab.container import oom_kills

    v2 = lay(tmp_path / "v2", "0::/pod\n", {
        "cgroup.controllers": "memory\n",
        "pod/memory.events": "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n",
        "memory.events": "oom_kill 9\n"})  # the host's, above the pod
    assert oom_kills(v2) == 2
    v1 = lay(tmp_path / "v1", "4:memory:/pod\n0::/\n", {
        "memory/pod/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"})
    assert oom_kills(v1) == 0
    assert oom_kills(tmp_path / "nothing") is None


def test_whose_memory_ran_out_is_said():
    from cloudlab.container import Share
    from cloudlab.deaths import cause_of

    limited = Share(1, 2 * 2**30, 2**30, "a cgroup's 1 CPU and 2.0 GiB")
    assert limited.memory_words == "the container's 2.0 GiB"
    assert Share(2, 3 * 2**30, 2**30, "this machine").memory_words == "this machine's 3.0 GiB"
    assert cause_of(-9, oom_before=0, oom_now=1, memory=limited.memory_words) == (
        "ran out of memory (killed by the kernel's out-of-memory killer: the container's "
        "2.0 GiB)")


def test_one_cpu_is_said_as_one(tmp_path):
    root = lay(tmp_path, "0::/\n", {"cgroup.controllers": "cpu\n", "cpu.max": "100000 100000\n"})
    assert share(root, {}).source == "a cgroup's 1 CPU"


def test_a_containers_free_memory_is_what_its_limit_leaves(tmp_path):
    v2 = lay(tmp_path / "v2", "0::/pod\n", {
        "cgroup.controllers": "memory\n", "pod/memory.max": f"{2 * 2**30}\n",
        "pod/memory.current": f"{2**29}\n"})
    found = share(v2, {})
    assert found.available == min(psutil.virtual_memory().available, 3 * 2**29)
    v1 = lay(tmp_path / "v1", "4:memory:/pod\n", {
        "memory/pod/memory.limit_in_bytes": f"{2**30}\n",
        "memory/pod/memory.usage_in_bytes": f"{2**30 + 5}\n"})  # over: none left
    assert share(v1, {}).available == 0
    machine = share(tmp_path / "nothing", {})
    assert 0 < machine.available <= machine.memory == psutil.virtual_memory().total

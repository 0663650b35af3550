"""How an engine's end is put into words (pure: no cluster)."""

import signal

import pytest

from cloudlab.deaths import Death, cause_of, oom_kills


@pytest.mark.parametrize("code, cause", [
    (-signal.SIGKILL, "was killed by signal 9 (SIGKILL)"),
    (-signal.SIGSEGV, "was killed by signal 11 (SIGSEGV)"),
    (-signal.SIGTERM, "was killed by signal 15 (SIGTERM)"),
    (-64, "was killed by signal 64 (SIGRTMAX)"),
    (3, "exited with code 3"),
    (0, "exited with code 0"),
    (None, "stopped answering its controller"),
])
def test_exit_statuses_are_named(code, cause):
    assert cause_of(code) == cause


def test_a_sigkill_while_the_oom_killer_struck_is_out_of_memory():
    assert cause_of(-signal.SIGKILL, oom_before=2, oom_now=3) == (
        "ran out of memory (killed by the kernel's out-of-memory killer)")
    assert cause_of(-signal.SIGKILL, oom_before=3, oom_now=3) == "was killed by signal 9 (SIGKILL)"
    # Another signal is not the OOM killer's, whatever the count did.
    assert cause_of(-signal.SIGSEGV, oom_before=2, oom_now=3).endswith("(SIGSEGV)")
    assert cause_of(-signal.SIGKILL, oom_before=None, oom_now=3).endswith("(SIGKILL)")


def test_last_words_come_first_and_only_their_first_line():
    words = "ran out of memory: it held 512 MB, over its memory_limit of 400 MB\nmore"
    assert cause_of(-signal.SIGKILL, words) == words.splitlines()[0]
    assert cause_of(-signal.SIGKILL, "  \n") == "was killed by signal 9 (SIGKILL)"


def test_a_death_reads_as_a_sentence_about_its_engine():
    assert str(Death(3, "exited with code 3")) == "engine 3 exited with code 3"
    assert not Death(3, "x").ordered


def test_oom_kills_reads_this_machines_cgroup_or_says_it_cannot():
    count = oom_kills()
    assert count is None or count >= 0

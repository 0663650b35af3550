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


def test_an_ended_process_is_quoted_by_its_last_line_or_its_error_box():
    from cloudlab.backends.base import Launched

    class Ended(Launched):
        def __init__(self, text: str):
            self.text = text

        def log_tail(self, lines: int = 20) -> str:
            return self.text

        def exit_code(self) -> int:
            return 1

    rule = "-" * 74
    box = (f"ssh: connect to host 10.0.0.2 port 22: Connection refused\n{rule}\n"
           f"ORTE was unable to reliably start one or more daemons.\nThis usually is caused "
           f"by:\n\n* not finding the required libraries\n  and network routing requirements)."
           f"\n{rule}\n")
    assert Ended(box).last_line() == "ORTE was unable to reliably start one or more daemons."
    assert Ended(box + "Traceback ... Error: later\n").last_line() == "Traceback ... Error: later"
    assert Ended("first\nlast\n\n").last_line() == "last"
    assert Ended("").last_line() == "(no output)"

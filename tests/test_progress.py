"""Progress: the model's counting and wording, the text bar, and where each view appears."""

import io
import os
import subprocess
import sys
import textwrap

from cloudlab.progress import CANCELLED, DONE, FAILED, Progress
from cloudlab.widgets.progress import TextProgress


class Counting(Progress):
    def __init__(self, *args):
        super().__init__(*args)
        self.draws = 0

    def draw(self):
        self.draws += 1


def test_progress_counts_throttles_and_ends_once():
    p = Counting("map f", 1000)
    for _ in range(1000):
        p.advance(1)
    assert p.done == 1000
    assert p.draws <= 3  # throttled: a fast loop does not redraw a thousand times
    p.finish(DONE)
    p.finish(FAILED, "ignored: the first final state wins")
    assert p.state == DONE
    assert p.text().startswith("map f: 1,000/1,000 (100%) done in ")


def test_progress_wording_for_each_state():
    running = Progress("map g", 10)
    running.advance(4)
    assert running.text().startswith("map g: 4/10 (40%), ") and "ETA" in running.text()
    failed = Progress("map g", 10)
    failed.finish(FAILED, "ZeroDivisionError: division by zero on 16 engines [0-15]")
    assert failed.text() == ("map g: 0/10 (0%) failed: ZeroDivisionError: division by zero "
                             "on 16 engines [0-15]")
    cancelled = Progress("map g", 10)
    cancelled.finish(CANCELLED)
    assert "cancelled after" in cancelled.text()


def test_text_bar_redraws_in_place_and_ends_with_a_newline():
    out = io.StringIO()
    bar = TextProgress("map h", 4, stream=out)
    bar.advance(2)
    bar.advance(2)
    bar.finish(DONE)
    text = out.getvalue()
    assert text.startswith("\r[") and text.endswith("\n") and text.count("\n") == 1
    assert "[########################] map h: 4/4 (100%) done in" in text


def test_a_script_on_a_terminal_shows_a_text_bar(tmp_path):
    script = tmp_path / "bar.py"
    script.write_text(textwrap.dedent("""
        import time, cloudlab
        with cloudlab.Cluster(2, engine="dask") as c:
            c.map(time.sleep, [0.1] * 20)
    """))
    primary, secondary = os.openpty()
    proc = subprocess.run([sys.executable, str(script)], stderr=secondary,
                          stdout=subprocess.PIPE, timeout=120)
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    assert proc.returncode == 0
    text = output.decode()
    assert "map sleep: 20/20 (100%) done in" in text
    assert "\r[" in text


def test_a_script_in_a_pipe_stays_quiet(tmp_path):
    script = tmp_path / "quiet.py"
    script.write_text("import cloudlab\nwith cloudlab.Cluster(1) as c:\n    c.map(abs, [1, -2])\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "map abs" not in proc.stderr


def test_a_cancelled_map_ends_its_progress_as_cancelled(cluster):
    import time

    from cloudlab import _aio

    progress = Progress("map sleep", 8)
    future = _aio.submit(cluster._map(time.sleep, [1.0] * 8, 1, progress))
    time.sleep(0.5)
    future.cancel()
    deadline = time.monotonic() + 5
    while progress.state is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert progress.state == CANCELLED
    assert "cancelled after" in progress.text()
    time.sleep(3)  # let the engines finish the sleeps already running (issue: cancel on engines)

"""The live cluster widget in a real JupyterLab, in a real browser (Debian's chromium).

A person opens a notebook, starts a cluster, maps work over it and stops it; the
test asserts on what that person sees: engine rows that become idle, states that
turn busy, task counts that keep moving while the cell still runs, a progress bar
that ends "done", and an empty table after the stop. A screenshot taken during
the map is kept as test-artifacts/cluster-widget.png (docs/cluster-widget.png is a copy).

Needs ``apt-get install chromium`` and ``pip install playwright`` (no browser
download); without them the test skips, which CI (CLOUDLAB_NO_SKIP=1) fails.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from conftest import ROOT, our_processes, wait_until_gone
from jupyterlab_support import (
    cell,
    cell_errors,
    cell_output,
    chromium_page,
    dismiss_popups,
    lab_for_a_test,
    open_notebook,
    poll,
    run_cell,
    wait_cell_done,
    write_notebook,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NOTEBOOK = "widget.ipynb"
ENGINES = 4
ITEMS, SLEEP = 320, 0.25  # 320 x 0.25 s over 4 engines: 20 s of work
MIN_MAP_S = ITEMS * SLEEP / ENGINES
CELLS = [
    "%load_ext cloudlab",
    f"%cluster start {ENGINES}",
    # chunksize=1: every finished item moves a count (the default makes 16 big chunks).
    f"import time\nresults = cluster.map(time.sleep, [{SLEEP}] * {ITEMS}, chunksize=1)\n"
    "len(results)",
    "cluster.map(time.sleep, [30] * 8, chunksize=1)",
    "from cloudlab.workloads import pi\nr = pi.estimate(cluster, 4e8, seed=1, plot=True)",
    "%cluster stop",
]
SCREENSHOT = ROOT / "test-artifacts" / "cluster-widget.png"

# Everything a person sees of the cluster widget and the progress bar, in one read.
SEEN = """() => {
  const widget = document.querySelector('.cloudlab-widget');
  const rows = widget ? [...widget.querySelectorAll('tr.cl-engine')] : [];
  const text = (el, sel) => { const c = el.querySelector(sel); return c ? c.innerText.trim() : null; };
  const bar = document.querySelector('.widget-hbox.cloudlab-progress');
  const fill = bar ? bar.querySelector('.progress-bar') : null;
  return {
    widget: !!widget,
    rows: rows.length,
    states: rows.map(r => text(r, '.cl-state')),
    tasks: rows.map(r => text(r, '.cl-tasks')),
    buttons: widget ? [...widget.querySelectorAll('button')].map(b => b.innerText.trim()) : [],
    caption: bar ? bar.innerText.trim() : null,
    fill: fill ? fill.style.width : null,
  };
}"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server with our notebook."""
    with lab_for_a_test(tmp_path_factory.mktemp("jupyterlab")) as server:
        write_notebook(server.root / NOTEBOOK, CELLS)
        yield server
    assert server.proc.poll() is not None


@pytest.fixture
def page(lab, tmp_path):
    with chromium_page(tmp_path / "chromium-profile", viewport=(1280, 760)) as page:
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        try:
            yield page
        finally:
            if problems:
                print("\n".join(problems))


def seen(page) -> dict:
    return page.evaluate(SEEN)


def test_live_cluster_widget_in_jupyterlab(lab, page, tmp_path):
    t0 = time.monotonic()
    try:
        _drive(lab, page, t0)
    except BaseException:
        shot = tmp_path / "failure.png"
        with contextlib.suppress(Exception):
            page.screenshot(path=str(shot), full_page=True)
        print(f"\nfailure screenshot: {shot}\nJupyterLab log:\n{lab.log_tail()}")
        raise
    finally:
        print(f"\nbrowser test took {time.monotonic() - t0:.1f} s")


def _drive(lab, page, t0):
    open_notebook(page, lab, NOTEBOOK, cells=len(CELLS))
    dismiss_popups(page)
    # Fold the file browser away, as a person would for room (only the screenshot cares).
    with contextlib.suppress(Exception):
        page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").first.click(
            timeout=2000)

    # (1) %load_ext cloudlab
    run_cell(page, 0)
    wait_cell_done(page, 0, timeout=30)

    # (2) %cluster start 4: a line of text and the live widget, 4 engines that become idle
    run_cell(page, 1)
    wait_cell_done(page, 1, timeout=60)
    assert f"{ENGINES} ipyparallel engines" in cell_output(page, 1) or \
        f"{ENGINES} dask engines" in cell_output(page, 1), cell_output(page, 1)
    view = poll(lambda: (s := seen(page))["widget"] and s["rows"] == ENGINES
                and all(st == "idle" for st in s["states"]) and s,
                timeout=30, what=f"{ENGINES} idle engine rows in the cluster widget")
    assert view["buttons"][-2:] == ["Scale", "Stop"], view
    assert view["tasks"] == ["0"] * ENGINES, view
    assert len(our_processes()) >= ENGINES  # the widget shows real engines

    # (3) the map: states turn busy, counts move while the cell runs, the bar ends "done"
    run_cell(page, 2)
    started = time.monotonic()
    samples, states_seen, captions = [], set(), []
    shot_taken = False
    while time.monotonic() - started < MIN_MAP_S + 30:
        s = seen(page)
        samples.append(tuple(s["tasks"]))
        states_seen.update(s["states"])
        if s["caption"]:
            captions.append(s["caption"])
        if (not shot_taken and "busy" in s["states"] and s["caption"]
                and time.monotonic() - started > MIN_MAP_S / 2):
            SCREENSHOT.parent.mkdir(exist_ok=True)
            cell(page, 1).scroll_into_view_if_needed()
            page.screenshot(path=str(SCREENSHOT))
            shot_taken = True
        if s["caption"] and "done" in s["caption"]:
            break
        time.sleep(0.5)
    map_s = time.monotonic() - started
    wait_cell_done(page, 2, timeout=30)

    changes = sum(a != b for a, b in zip(samples, samples[1:]))
    print(f"\nmap: {map_s:.1f} s, {len(samples)} samples, {changes} changes of the task counts, "
          f"states seen {sorted(states_seen)}; last caption {captions[-1] if captions else None!r}")
    assert "busy" in states_seen, states_seen
    assert changes >= 10, f"task counts changed only {changes} times while the map ran: {samples}"
    assert any("ETA" in c and f"/{ITEMS} (" in c for c in captions), \
        f"no in-progress caption (... ETA ...) was seen: {captions[:5]}"
    final = poll(lambda: (s := seen(page))["caption"] and "done" in s["caption"] and s,
                 timeout=10, what="the progress caption saying done")
    assert f"{ITEMS}/{ITEMS} (100%) done" in final["caption"], final
    assert final["fill"] == "100%", final
    assert str(ITEMS) in cell_output(page, 2)  # len(results)
    done = poll(lambda: (s := seen(page))["tasks"] and
                sum(int(t) for t in s["tasks"]) == ITEMS and s,
                timeout=10, what=f"the task counts adding up to {ITEMS}")
    assert all(int(t) > 0 for t in done["tasks"]), done  # every engine did some of it
    assert shot_taken, "no screenshot: the map never showed busy engines with a progress bar"

    # (4) a map of 30 s tasks, stopped with its progress bar's Stop button while the cell
    # runs: the cell ends within 2 s saying why, and the next map (pi, below) works
    run_cell(page, 3)
    poll(lambda: "busy" in seen(page)["states"], timeout=30, what="engines busy with 30 s tasks")
    time.sleep(1)
    stop = cell(page, 3).locator(".cloudlab-progress button", has_text="Stop")
    clicked = time.monotonic()
    stop.click(timeout=5000)
    wait_cell_done(page, 3, timeout=10)
    stopped = time.monotonic() - clicked
    said = cell_output(page, 3)
    print(f"\nStop button: the cell ended {stopped:.2f} s after the click")
    assert stopped < 2, f"the cell ended {stopped:.2f} s after Stop was clicked"
    assert "Cancelled: map sleep stopped because its Stop button was pressed" in said, said

    # (5) the live pi plot: an image in the cell, drawn (not a broken link)
    run_cell(page, 4)
    wait_cell_done(page, 4, timeout=60)
    assert cell_errors(page, 4) == []
    image = cell(page, 4).locator(".jp-OutputArea-output img").first
    image.wait_for(state="visible", timeout=15_000)
    assert image.evaluate("img => img.complete && img.naturalWidth > 300"), "pi plot not drawn"

    # (6) %cluster stop: the table empties, the engines are gone
    run_cell(page, 5)
    wait_cell_done(page, 5, timeout=60)
    assert "Stopped" in cell_output(page, 5), cell_output(page, 5)
    poll(lambda: (s := seen(page))["widget"] and s["rows"] == 0 and s, timeout=15,
         what="the cluster widget showing no engines after %cluster stop")
    assert wait_until_gone(timeout=15, servers=False) == []  # the kernel's fork server stays

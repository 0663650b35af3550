"""The cluster view: a live table of engines with Scale and Stop, and its text/HTML forms.

The view observes a :class:`~cloudlab.Cluster`; the cluster knows nothing of it.
A :class:`Snapshot` is taken from the cluster (the only I/O), then rendered by
pure functions as text (terminals, plain IPython), HTML (nbconvert, frontends
without the widget manager) or inside the ipywidgets view, which refreshes
itself from a background thread about once a second and sends nothing when
nothing changed.
"""

from __future__ import annotations

import html
import threading
import time
import weakref
from dataclasses import dataclass, field

from ..cluster import Cluster, EngineStatus
from ..errors import CloudlabError

REFRESH_S = 1.0


@dataclass(frozen=True)
class Snapshot:
    name: str
    engine: str
    backend: str
    state: str
    uptime_s: float
    rows: tuple[EngineStatus, ...] = ()
    #: Filled by cloud backends: dollars per hour now, spent so far, and VMs running.
    cost_per_hour: float | None = None
    cost_so_far: float | None = None
    instances: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    #: The user's own modules the engines have (cloudlab.usercode), described.
    code: str | None = None

    @property
    def tasks_done(self) -> int:
        return sum(r.tasks_done for r in self.rows)


def snapshot(cluster: Cluster) -> Snapshot:
    """The cluster's state now; a stopped or failed cluster gives an empty table."""
    rows: tuple[EngineStatus, ...] = ()
    if cluster.state == "running":
        try:
            rows = tuple(cluster.status())
        except CloudlabError:
            pass
    uptime = time.time() - cluster.started_at if cluster.started_at and rows else 0.0
    counts = {s: sum(r.state == s for r in rows) for s in ("idle", "busy", "queued", "starting",
                                                              "dead")}
    cost = cluster._backend.cost()  # (cloud backends: what the VMs cost)
    return Snapshot(cluster.name, cluster.engine_kind, cluster.backend_kind,
                    cluster.state if cluster.state != "running" or rows else "stopped",
                    uptime, rows, counts=counts,
                    instances=cost and cost.instances,
                    cost_per_hour=cost and cost.dollars_per_hour,
                    cost_so_far=cost and cost.dollars_so_far,
                    code=cluster.code.describe() if cluster.code is not None else None)


def _fmt(value: float | None, unit: str = "", digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _uptime(seconds: float) -> str:
    """Minute resolution: a view of an idle cluster should not change every second."""
    minutes = int(seconds) // 60
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else (f"{m} min" if m else "<1 min")


def _cpu(percent: float | None) -> str:
    """CPU % in steps of 5, so background noise (heartbeats) does not redraw the table."""
    return "-" if percent is None else str(5 * round(percent / 5))


def summary_line(s: Snapshot) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in s.counts.items() if v) or "no engines"
    cost = "" if s.instances is None else f", {s.instances} VMs"
    if s.cost_per_hour is not None:
        cost += f", ${s.cost_per_hour:.2f}/h, ${s.cost_so_far or 0:.2f} so far"
    code = f"; your code synced: {s.code}" if s.code else ""
    return (f"{s.name}: {s.engine} on {s.backend}, {s.state}, {len(s.rows)} engines ({counts}), "
            f"{s.tasks_done} tasks done, up {_uptime(s.uptime_s)}{cost}{code}")


COLUMNS = ("id", "host", "pid", "state", "CPU %", "memory MB", "tasks done")
GPU_COLUMNS = ("GPU", "GPU %", "GPU memory MB")  # shown when engines have GPUs


def columns(s: Snapshot) -> tuple[str, ...]:
    return COLUMNS + (GPU_COLUMNS if any(r.gpu for r in s.rows) else ())


def _cells(r: EngineStatus, gpu: bool) -> tuple[str, ...]:
    state = r.note if r.state == "queued" and r.note else r.state  # and why it waits
    cells: tuple[str, ...] = (str(r.id), r.host, str(r.pid or "-"), state,
                              _cpu(r.cpu_percent), _fmt(r.memory_mb), str(r.tasks_done))
    if gpu:
        cells += (r.gpu or "-", _cpu(r.gpu_percent), _fmt(r.gpu_memory_mb))
    return cells


def render_text(s: Snapshot) -> str:
    lines = [summary_line(s)]
    names = columns(s)
    if s.rows:
        table = [names, *(_cells(r, len(names) > len(COLUMNS)) for r in s.rows)]
        widths = [max(len(row[i]) for row in table) for i in range(len(names))]
        for row in table:
            lines.append("  ".join(c.rjust(w) if names[i] not in ("host", "GPU") else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _css(column: str) -> str:
    """A column's class: cl-cpu, cl-memory, cl-gpu, cl-gpu-percent, cl-gpu-memory..."""
    words = column.replace("%", "percent").lower().split()
    return "-".join(words[:2]) if words[0] == "gpu" and len(words) > 1 else words[0]


STATE_COLOURS = {"idle": "#2e7d32", "busy": "#ef6c00", "queued": "#6a1b9a", "starting": "#1565c0",
                 "dead": "#c62828"}


def render_html(s: Snapshot) -> str:
    names = columns(s)
    head = "".join(f"<th style='text-align:right;padding:0 8px'>{c}</th>" for c in names)
    body = []
    for r in s.rows:
        cells = _cells(r, len(names) > len(COLUMNS))
        tds = []
        for i, c in enumerate(cells):
            style = "text-align:right;padding:0 8px"
            if names[i] == "state":
                style += f";color:{STATE_COLOURS.get(r.state, 'inherit')};font-weight:bold"
            tds.append(f"<td class='cl-{_css(names[i])}' style='{style}'>"
                       f"{html.escape(c)}</td>")
        body.append(f"<tr class='cl-engine' data-engine='{r.id}'>{''.join(tds)}</tr>")
    return (f"<div class='cloudlab-cluster' data-cluster='{html.escape(s.name)}'>"
            f"<div class='cl-summary'><b>{html.escape(s.name)}</b> "
            f"{html.escape(summary_line(s).split(': ', 1)[1])}</div>"
            f"<table class='cl-engines'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


class ClusterWidget:
    """The live view of one cluster (ipywidgets), refreshed from a background thread."""

    def __init__(self, cluster: Cluster):
        import ipywidgets as w

        self.cluster = cluster
        self.table = w.HTML()
        self.cost = w.HTML(layout=w.Layout(display="none"))  # cloud backends fill it
        self.message = w.HTML()
        self.size = w.BoundedIntText(value=max(len(cluster.engine_ids), 1), min=1, max=4096,
                                     description="Engines", layout=w.Layout(width="170px"))
        self.scale_button = w.Button(description="Scale", icon="arrows-alt-v")
        self.stop_button = w.Button(description="Stop", icon="stop", button_style="danger")
        self.scale_button.on_click(lambda _: self._act(self._scale))
        self.stop_button.on_click(lambda _: self._act(self._stop))
        controls = w.HBox([self.size, self.scale_button, self.stop_button])
        self.box = _TextFallbackVBox([self.table, self.cost, controls, self.message], view=self)
        self.box.add_class("cloudlab-widget")
        self.updates = 0  # messages actually sent to the frontend
        self._last: str | None = None
        self.refresh()
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cloudlab-view-{cluster.name}",
                                        daemon=True)
        self._thread.start()

    def refresh(self) -> Snapshot:
        s = snapshot(self.cluster)
        rendered = render_html(s)
        if rendered != self._last:  # throttle: no message when nothing changed
            self.table.value = self._last = rendered
            self.updates += 1
        disabled = s.state != "running"
        self.scale_button.disabled = self.stop_button.disabled = self.size.disabled = disabled
        return s

    def _run(self) -> None:
        while not self._stop_event.wait(REFRESH_S):
            try:
                s = self.refresh()
            except Exception:  # a view must never take the kernel down
                continue
            if s.state in ("stopped", "failed"):
                break

    def close(self) -> None:
        self._stop_event.set()

    def _act(self, action) -> None:
        self.message.value = ""
        try:
            action()
        except CloudlabError as e:
            self.message.value = f"<span style='color:#c62828'>{html.escape(str(e))}</span>"
        self.refresh()

    def _scale(self) -> None:
        self.cluster.scale(self.size.value)

    def _stop(self) -> None:
        self.cluster.stop()
        self.message.value = f"Stopped {html.escape(self.cluster.name)}."


def _TextFallbackVBox(children, view: ClusterWidget):
    """A VBox whose mimebundle also carries a readable text and HTML table."""
    import ipywidgets as w

    class View(w.VBox):
        def _repr_mimebundle_(self, **kwargs):
            bundle = super()._repr_mimebundle_(**kwargs) or {}
            s = snapshot(view.cluster)
            bundle["text/plain"] = render_text(s)
            bundle["text/html"] = render_html(s)
            return bundle

    return View(children)


_views: weakref.WeakKeyDictionary[Cluster, ClusterWidget] = weakref.WeakKeyDictionary()


def view(cluster: Cluster) -> ClusterWidget:
    """The one live view of ``cluster`` (created on first use)."""
    if cluster not in _views:
        _views[cluster] = ClusterWidget(cluster)
    return _views[cluster]

"""What a benchmark run found: rows of medians, ratios to the raw engine, targets, regressions.

Pure logic and drawing, no cluster: the table, the JSON and the chart are made
from the one-line results of the measuring processes (see
:mod:`cloudlab.bench.measures`), so they can be tested with made-up numbers.

A row compares cloudlab with the raw engine it wraps, on one engine kind. Its
ratio is ``cloudlab / raw`` of the medians; whether that is good depends on
the unit (seconds: below 1 is faster; items/s: above 1 is faster). A row is a
*regression* when cloudlab is slower than the raw engine by more than the row's
``limit`` (1.0: any slower), or when cloudlab gave no number where the raw
engine did (a crash is not fast). Targets are absolute and only reported:
absolute times drift with the machine and its load, ratios measured side by
side in one run do not.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field

LOWER, HIGHER = "lower", "higher"

#: Round trips may cost up to 10% more than the raw engine's: the target.
RTT_ALLOWANCE = 1.10
#: On top of that, the noise one run on a shared machine has: 200 timed round
#: trips (full) move their median by a few percent, 50 (quick) by up to ~20%.
RTT_NOISE = {"full": 1.10, "quick": 1.25}
#: A cold start is mostly Python importing ipyparallel or Dask in fresh processes, on both
#: sides. On this machine the medians of 3 raw Dask cold starts of 2 moved from 0.92 to 1.26 s
#: between full runs, so a cold row, which has no target, regresses only beyond that spread.
COLD_START_NOISE = {"full": 1.25, "quick": 1.25}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass(frozen=True)
class Target:
    """``cloudlab <op> value`` (``value * raw median`` when ``relative``)."""

    op: str  # "<=" or ">="
    value: float
    relative: bool = False

    def bound(self, raw: float | None) -> float | None:
        if not self.relative:
            return self.value
        return None if raw is None else self.value * raw

    def met(self, cloudlab: float | None, raw: float | None) -> bool | None:
        bound = self.bound(raw)
        if cloudlab is None or bound is None:
            return None
        return cloudlab <= bound if self.op == "<=" else cloudlab >= bound

    def text(self, unit: str) -> str:
        if self.relative:
            return f"{self.op} raw x {self.value:g}"
        return f"{self.op} {_number(self.value)} {unit}"


@dataclass
class Row:
    """One measure on one engine kind: raw samples, cloudlab samples, and what they mean."""

    measure: str  # "start16", "map", ...
    engine: str  # "ipyparallel" or "dask"
    unit: str
    better: str  # LOWER or HIGHER
    raw: list[float] = field(default_factory=list)
    cloudlab: list[float] = field(default_factory=list)
    variant: str = ""  # "warm": cloudlab after cloudlab.prewarm() (raw stays cold)
    raw_label: str = "raw"  # what the raw column holds: "raw" engine, or "numpy" baseline
    target: Target | None = None
    limit: float | None = 1.0  # cloudlab/raw beyond which it is a regression; None: no comparison
    errors: list[str] = field(default_factory=list)
    paired: bool = False  # raw and cloudlab measured in one process (see measures.measure_rtt)

    @property
    def name(self) -> str:
        return f"{self.measure} {self.variant}".strip()

    @property
    def raw_median(self) -> float | None:
        return median(self.raw)

    @property
    def cloudlab_median(self) -> float | None:
        return median(self.cloudlab)

    @property
    def ratio(self) -> float | None:
        """``cloudlab / raw`` of the medians (None without both, or with a raw of 0)."""
        raw, ours = self.raw_median, self.cloudlab_median
        if raw is None or ours is None or raw == 0:
            return None
        return ours / raw

    @property
    def speedup(self) -> float | None:
        """How many times faster cloudlab is (below 1: slower), whatever the unit."""
        ratio = self.ratio
        if ratio is None or ratio == 0:
            return None
        return 1 / ratio if self.better == LOWER else ratio

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.cloudlab_median,
                                                                self.raw_median)

    @property
    def regression(self) -> str | None:
        """Why this row fails the run, or None."""
        if self.limit is None:
            return None
        what = f"{self.name} on {self.engine}"
        if self.cloudlab_median is None:
            # Both failed: not cloudlab's fault, unless both were measured by cloudlab's
            # measuring process (paired), which then crashed.
            if self.raw_median is None and not (self.paired and self.errors):
                return None
            cause = _short(self.errors[-1]) if self.errors else "no result"
            return (f"{what}: cloudlab gave no number ({cause}); " +
                    ("it measured the raw engine too." if self.paired else "the raw engine did."))
        speedup = self.speedup
        if speedup is None or speedup * self.limit >= 1:
            return None
        return (f"{what}: cloudlab {_number(self.cloudlab_median)} {self.unit} vs raw "
                f"{_number(self.raw_median)} {self.unit}, {1 / speedup:.2f}x slower "
                f"(allowed: {self.limit:.2f}x).")

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(name=self.name, raw_median=self.raw_median,
                    cloudlab_median=self.cloudlab_median, ratio=self.ratio,
                    speedup=self.speedup, met=self.met, regression=self.regression,
                    target=None if self.target is None else {**asdict(self.target),
                                                             "text": self.target.text(self.unit)})
        return data


@dataclass
class Report:
    """A benchmark run: rows, the machine, and every measuring process's raw result."""

    rows: list[Row]
    machine: dict
    mode: str  # "full" or "quick"
    reps: int
    sizes: dict
    runs: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    files: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what each subject and measure was

    @property
    def regressions(self) -> list[str]:
        return [r.regression for r in self.rows if r.regression]

    def to_json(self) -> str:
        return json.dumps({
            "mode": self.mode, "reps": self.reps, "machine": self.machine, "sizes": self.sizes,
            "seconds": self.seconds, "regressions": self.regressions, "notes": self.notes,
            "rows": [r.to_dict() for r in self.rows], "runs": self.runs,
        }, indent=1)

    def table(self) -> str:
        return format_table(self)

    def __str__(self) -> str:
        return self.table()

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows the table, not the fields
        printer.text(self.table())


# ------------------------------------------------------------------------- table
def _number(x: float | None) -> str:
    """Three significant figures, thousands separated; '-' for nothing."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 0.01:
        return f"{x:.3g}"
    return f"{x:.2e}"


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _ratio_text(row: Row) -> str:
    ratio, speedup = row.ratio, row.speedup
    if ratio is None or speedup is None:
        return "-"
    word = f"{_times(speedup)} faster" if speedup >= 1 else f"{_times(1 / speedup)} slower"
    return f"{ratio:.3g} ({word})"


def _times(x: float) -> str:
    return f"{x:.0f}x" if x >= 10 else f"{x:.1f}x" if x >= 1.1 else f"{x:.2f}x"


def _met_text(row: Row) -> str:
    if row.target is None:
        return ""
    return {True: "met", False: "NOT MET", None: "?"}[row.met]


def format_table(report: Report) -> str:
    """The report as aligned plain text: machine, one line per row, then the verdict."""
    m = report.machine
    lines = [
        f"cloudlab bench ({report.mode}, {report.reps} rep{'s' * (report.reps != 1)}, medians) "
        f"on {m.get('date', '?')}",
        f"machine: {m.get('cores', '?')} cores, {m.get('cpu', '?')}, Python {m.get('python', '?')}, "
        f"ipyparallel {m.get('ipyparallel', '?')}, distributed {m.get('distributed', '?')}, "
        f"numpy {m.get('numpy', '?')}",
    ]
    header = ("measure", "engine", "unit", "raw", "cloudlab", "cloudlab/raw", "target", "met")
    body = [(r.name, r.engine, r.unit, _number(r.raw_median), _number(r.cloudlab_median),
             _ratio_text(r), "" if r.target is None else r.target.text(r.unit), _met_text(r))
            for r in report.rows]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    numeric = {3, 4}
    for cells in [header, *body]:
        lines.append("  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                               for i, (c, w) in enumerate(zip(cells, widths))).rstrip())
    lines += [f"  {note}" for note in report.notes]
    for row in report.rows:
        for error in dict.fromkeys(row.errors):
            lines.append(f"error in {row.name} on {row.engine}: {_short(error)}")
    for run in report.runs:
        if run.get("leaked"):
            lines.append(f"killed {len(run['leaked'])} process(es) left behind by "
                         f"{run['subject']} {run['kind']}: {_short('; '.join(run['leaked']))}")
    if report.regressions:
        lines.append(f"REGRESSIONS ({len(report.regressions)}): cloudlab slower than the raw "
                     f"engine it wraps:")
        lines += [f"  - {r}" for r in report.regressions]
    else:
        lines.append("No regression: cloudlab is at least as fast as the raw engine it wraps, "
                     "measure by measure.")
    unmet = [r for r in report.rows if r.met is False]
    if unmet:
        lines.append(f"Targets not met ({len(unmet)}): "
                     + ", ".join(f"{r.name} on {r.engine}" for r in unmet) + ".")
    return "\n".join(lines)


# ------------------------------------------------------------------------- chart
COLOURS = {"raw": "#9e9e9e", "cloudlab": "#1f77b4", "warm": "#7fbfff"}


def write_chart(report: Report, path) -> None:
    """A PNG, one panel per measure: raw and cloudlab bars per engine, the target dashed.

    Drawn on a bare Agg canvas, so a notebook's matplotlib backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measures = list(dict.fromkeys(r.measure for r in report.rows if r.unit != "procs"))
    cols = min(3, max(1, len(measures)))
    nrows = max(1, -(-len(measures) // cols))
    fig = Figure(figsize=(5.2 * cols, 3.9 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for k, measure in enumerate(measures):
        ax = fig.add_subplot(nrows, cols, k + 1)
        rows = [r for r in report.rows if r.measure == measure]
        _panel(ax, measure, rows)
    if not measures:
        fig.add_subplot().text(0.5, 0.5, "no measure gave a number", ha="center")
    fig.suptitle(f"cloudlab bench ({report.mode}): medians of {report.reps} run"
                 f"{'s' * (report.reps != 1)}, {report.machine.get('cores', '?')} cores")
    fig.savefig(path, dpi=110)


def _panel(ax, measure: str, rows: list[Row]) -> None:
    bars: list[tuple[str, float | None, str, str]] = []  # (label, value or None, colour, note)
    for engine in dict.fromkeys(r.engine for r in rows):
        short = "ipp" if engine == "ipyparallel" else engine
        cold = [r for r in rows if r.engine == engine and not r.variant]
        for r in cold[:1]:
            if r.raw_median is not None:
                bars.append((f"{short}\n{r.raw_label}", r.raw_median, COLOURS["raw"], ""))
        for r in cold + [r for r in rows if r.engine == engine and r.variant]:
            label = f"{short}\ncloudlab" + (f" {r.variant}" if r.variant else "")
            speedup = r.speedup
            note = "" if speedup is None else (f"\n{_times(speedup)} faster" if speedup >= 1
                                               else f"\n{_times(1 / speedup)} SLOWER")
            bars.append((label, r.cloudlab_median, COLOURS["warm" if r.variant else "cloudlab"],
                         note))
    unit, better = rows[0].unit, rows[0].better
    values = [v for _, v, _, _ in bars if v is not None]
    floor = min(values) if values else 1.0
    drawn = ax.bar(range(len(bars)), [floor if v is None else v for _, v, _, _ in bars],
                   color=[c for _, _, c, _ in bars])
    ax.set_xticks(range(len(bars)), [label for label, _, _, _ in bars], fontsize=8)
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    for bar, (_, v, _, note) in zip(drawn, bars):
        if v is None:
            bar.set_color("white")
            bar.set_edgecolor("#d62728")
            bar.set_hatch("//")
        ax.annotate("no result" if v is None else _number(v) + note,
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    target = rows[0].target
    if target is not None and not target.relative:
        ax.axhline(target.value, color="#d62728", linestyle="--", linewidth=1,
                   label=f"target {target.text(unit)}")
        ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{measure} ({unit}, {better} is better)", fontsize=10)
    ax.margins(y=0.25)

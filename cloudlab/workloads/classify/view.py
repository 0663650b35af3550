"""Pictures of classification runs for notebooks: live throughput, the confusion matrix,
the head of the results table."""

from __future__ import annotations

import numpy as np


class Throughput:
    """Documents done against time, one line per run, updating live: pass
    ``plot.track(label)`` as ``run_corpus(..., on_progress=...)``."""

    def __init__(self) -> None:
        from ...widgets.liveplot import LivePlot

        self.runs: dict[str, tuple[list[float], list[int]]] = {}
        self._plot = LivePlot(self._draw, figsize=(7, 3.2), min_interval=0.25)

    def track(self, label: str):
        seconds, done = self.runs.setdefault(label, ([0.0], [0]))

        def progress(count: int, elapsed: float) -> None:
            seconds.append(elapsed)
            done.append(count)
            self._plot.update()

        return progress

    def close(self) -> None:
        self._plot.close()

    def _draw(self, fig) -> None:
        ax = fig.add_subplot()
        for label, (seconds, done) in self.runs.items():
            rate = done[-1] / seconds[-1] if seconds[-1] > 0 else 0.0
            ax.plot(seconds, done, marker=".", label=f"{label}: {rate:,.0f} docs/s")
        ax.set_xlabel("seconds")
        ax.set_ylabel("documents classified")
        if self.runs:
            ax.legend(loc="lower right")


def confusion(run):
    """The confusion matrix of a run's rows (rows: true label, columns: predicted), as
    fractions of each true label: a PNG image for the notebook."""
    from matplotlib.figure import Figure

    from ...widgets.liveplot import png

    labels = sorted({t for t, _ in run.confusion} | {p for _, p in run.confusion})
    counts = np.array([[run.confusion.get((t, p), 0) for p in labels] for t in labels], float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (each row sums to 1)")
    return png(fig)


def table_head(rows, limit: int = 8) -> str:
    """The first rows of a results table as Markdown."""
    lines = ["| key | worker | true | predicted | title | date |", "|---|---|---|---|---|---|"]
    for r in rows[:limit]:
        title = r.title if len(r.title) <= 60 else r.title[:57] + "..."
        lines.append(f"| {r.key} | {r.worker} | {r.truth} | {r.predicted} | {title} | {r.date} |")
    return "\n".join(lines)

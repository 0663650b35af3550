"""Pictures of a reconstruction for notebooks: the image improving live, and the results."""

from __future__ import annotations

import numpy as np

from .phantom import Grid, Phantom


class LiveImage:
    """An image that updates in place as DROP works (``reconstruct(..., on_image=view)``)."""

    def __init__(self, grid: Grid, vmin: float = 0.0, vmax: float = 2.0):
        from ...widgets.liveplot import LivePlot

        self.grid, self.vmin, self.vmax = grid, vmin, vmax
        self.label = "waiting for the FBP..."
        self.image: np.ndarray | None = None
        self.frames: list[str] = []
        self._plot = LivePlot(self._draw, figsize=(4.5, 4.0), min_interval=0.2)

    def __call__(self, label: str, image: np.ndarray) -> None:
        self.label, self.image = label, image
        self.frames.append(label)
        self._plot.update(force=True)

    def close(self) -> None:
        self._plot.close()

    def _draw(self, fig) -> None:
        ax = fig.add_subplot()
        if self.image is not None:
            shown = ax.imshow(self.image, origin="lower", cmap="gray", vmin=self.vmin,
                              vmax=self.vmax, extent=_extent(self.grid))
            fig.colorbar(shown, ax=ax, label="RSP")
        ax.set_title(self.label)
        ax.set_xlabel("x (cm)")
        ax.set_ylabel("y (cm)")


def show_phantom(ax, phantom: Phantom, grid: Grid) -> None:
    """The true RSP map with each insert named."""
    shown = ax.imshow(phantom.raster(grid), origin="lower", cmap="gray", vmin=0, vmax=2,
                      extent=_extent(grid))
    for roi in phantom.rois:
        ax.annotate(f"{roi.name.split(' (')[0]}\n{roi.rsp:g}", (roi.x, roi.y), color="tab:orange",
                    ha="center", va="center", fontsize=7)
    ax.set_title(f"{phantom.name}: true RSP")
    ax.figure.colorbar(shown, ax=ax, label="RSP")


def compare(result, vmin: float = 0.8, vmax: float = 1.9):
    """FBP, DROP and DROP + TV beside the truth, windowed on the body's contrast: a PNG
    image for the notebook."""
    from matplotlib.figure import Figure

    from ...widgets.liveplot import png

    images = [("truth", result.truth), ("FBP", result.fbp), ("DROP", result.plain),
              ("DROP + TV", result.image)]
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    axes = fig.subplots(1, len(images))
    grid = Grid(result.size.n, result.size.pixel)
    for ax, (title, image) in zip(axes, images):
        ax.imshow(image, origin="lower", cmap="gray", vmin=vmin, vmax=vmax, extent=_extent(grid))
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    return png(fig)


def insert_table(result) -> str:
    """The per-insert errors as a Markdown table."""
    lines = ["| insert | true RSP | reconstructed | error |", "|---|---|---|---|"]
    for row in result.inserts:
        error = (f"{row['mean']:+.4f} (absolute)" if row["air"]
                 else f"{row['error_pct']:+.2f} %")
        lines.append(f"| {row['insert']} | {row['true']:.4f} | {row['mean']:.4f} | {error} |")
    return "\n".join(lines)


def _extent(grid: Grid) -> tuple[float, float, float, float]:
    half = grid.size / 2
    return (-half, half, -half, half)

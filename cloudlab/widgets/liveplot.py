"""A matplotlib figure that updates in place while a workload streams partial results.

It is displayed once with a display id and re-sent as a PNG at most a few
times a second, so it renders in JupyterLab and the saved notebook keeps the
last frame as an image. The figure is built with ``matplotlib.figure.Figure``
(not pyplot) and sent as PNG bytes, so it works whatever the kernel's backend
and the inline backend does not show a second, stale copy at the end of the cell. Outside IPython the plot is drawn once at the end if ``save``
names a file, and otherwise skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class LivePlot:
    """``draw(fig)`` renders the current state; call :meth:`update` often, :meth:`close` once."""

    def __init__(self, draw: Callable, *, min_interval: float = 0.3,
                 figsize: tuple[float, float] = (6.0, 3.5), save: str | None = None):
        from matplotlib.figure import Figure

        self.draw, self.min_interval, self.save = draw, min_interval, save
        self.figure = Figure(figsize=figsize, layout="constrained")
        self.frames = 0  # frames actually sent to the frontend
        self._last = 0.0
        self._handle = None
        try:
            from IPython import get_ipython
            from IPython.display import display

            if get_ipython() is not None:
                self._handle = display(self._png(), display_id=True)
        except ImportError:
            pass

    def _render(self) -> None:
        self.figure.clear()
        self.draw(self.figure)

    def _png(self):
        self._render()
        return png(self.figure)

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._handle is None or (not force and now - self._last < self.min_interval):
            return
        self._last = now
        self._handle.update(self._png())
        self.frames += 1

    def close(self) -> None:
        """Draw the final frame (the one the saved notebook keeps)."""
        if self._handle is not None:
            self.update(force=True)
        elif self.save:
            self._render()
            self.figure.savefig(self.save)


def png(figure):
    """``figure`` as a PNG image that a notebook shows whatever matplotlib backend the
    kernel uses (a bare ``Figure`` shows only as text unless pyplot set one up)."""
    import io

    from IPython.display import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return Image(data=buffer.getvalue(), format="png")

"""Progress views: a bar widget in Jupyter, a text bar in a terminal, nothing in a pipe.

All of them are non-blocking: the operation reports from cloudlab's loop and
the view redraws at most ten times a second. A finished widget re-sends its
display so the saved notebook keeps the final state as text, not ``IntProgress(...)``.
"""

from __future__ import annotations

import html
import sys

from ..progress import CANCELLED, DONE, FAILED, Progress
from . import clickable_while_busy, widgets_available

BAR_STYLES = {DONE: "success", FAILED: "danger", CANCELLED: "warning"}


class WidgetProgress(Progress):
    def __init__(self, label: str, total: int):
        super().__init__(label, total)
        import ipywidgets as w
        from IPython.display import display

        self.bar = w.IntProgress(value=0, min=0, max=max(total, 1),
                                 layout=w.Layout(width="300px"))
        self.caption = w.HTML(html.escape(self.text()))
        self.stop_button = w.Button(description="Stop", icon="stop", button_style="warning",
                                    tooltip="Stop this job: its running tasks end, their "
                                            "engines are replaced",
                                    layout=w.Layout(width="80px"))
        self.stop_button.on_click(lambda _: self.stop())
        if not clickable_while_busy(self.stop_button):  # a click would come too late
            self.stop_button.layout.display = "none"
        outer = self

        class Box(w.HBox):
            def _repr_mimebundle_(self, **kwargs):
                bundle = super()._repr_mimebundle_(**kwargs) or {}
                bundle["text/plain"] = outer.text()
                bundle["text/html"] = f"<pre class='cloudlab-progress'>{html.escape(outer.text())}</pre>"
                return bundle

        self.box = Box([self.bar, self.stop_button, self.caption])
        self.box.add_class("cloudlab-progress")
        self.handle = display(self.box, display_id=True)

    def draw(self) -> None:
        self.bar.value = self.done
        self.caption.value = html.escape(self.text())
        if self.state is not None:
            self.bar.bar_style = BAR_STYLES[self.state]
            self.stop_button.layout.display = "none"
            if self.handle is not None:
                self.handle.update(self.box)  # the saved notebook keeps the final text


class TextProgress(Progress):
    """``[#########-----] 60/100 ...`` redrawn in place on a terminal's stderr."""

    min_interval = 0.2
    width = 24

    def __init__(self, label: str, total: int, stream=None):
        super().__init__(label, total)
        self.stream = stream or sys.stderr

    def draw(self) -> None:
        filled = self.width * self.done // self.total if self.total else self.width
        bar = "#" * filled + "-" * (self.width - filled)
        end = "\n" if self.state is not None else ""
        self.stream.write(f"\r[{bar}] {self.text()}\x1b[K{end}")
        self.stream.flush()


def auto(label: str, total: int) -> Progress:
    """The view that fits where we run; chosen in the thread that starts the operation."""
    if widgets_available():
        return WidgetProgress(label, total)
    if getattr(sys.stderr, "isatty", lambda: False)():
        return TextProgress(label, total)
    return Progress(label, total)

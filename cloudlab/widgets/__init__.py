"""Views of clusters and their work: live widgets in Jupyter, text or HTML elsewhere.

Views observe the model (a :class:`~cloudlab.Cluster`) and are registered with
IPython's display machinery from outside it; nothing here is imported until a
frontend asks for it.
"""

from __future__ import annotations

import concurrent.futures
import sys


def widgets_available(shell=None) -> bool:
    """Whether widgets can render: a Jupyter kernel (not terminal IPython) and ipywidgets."""
    if shell is None:
        if "IPython" not in sys.modules:  # not in IPython (and importing it costs 80 ms)
            return False
        shell = sys.modules["IPython"].get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def install(shell) -> None:
    """Teach ``shell`` to display clusters: a live widget in a kernel, a table elsewhere."""
    from ..cluster import Cluster
    from . import status

    formatters = shell.display_formatter.formatters
    formatters["text/plain"].for_type(
        Cluster, lambda c, p, cycle: p.text(status.render_text(status.snapshot(c))))
    formatters["text/html"].for_type(Cluster, lambda c: status.render_html(status.snapshot(c)))
    if widgets_available(shell):
        shell.display_formatter.mimebundle_formatter.for_type(
            Cluster, lambda c, include=None, exclude=None: status.view(c).box._repr_mimebundle_())


def clickable_while_busy(widget) -> bool:
    """Let ``widget``'s clicks be handled while a cell runs; False where the kernel cannot.

    A kernel handles widget events between cells, on its main thread, which a
    blocking call such as ``c.map`` holds. ipykernel 7 can run *subshells*,
    threads with event loops of their own, and routes each comm's messages to
    the subshell its ``_reply_subshell_for`` names: this widget's go to one
    subshell of cloudlab's, so its handler runs while the cell waits.
    """
    global _subshell
    try:
        kernel = sys.modules["IPython"].get_ipython().kernel
        manager = kernel.shell_channel_thread.manager
        if _subshell is None:
            created: concurrent.futures.Future[str] = concurrent.futures.Future()

            def create() -> None:
                try:
                    created.set_result(manager._create_subshell())
                except BaseException as e:  # noqa: BLE001 - reported to the waiting thread
                    created.set_exception(e)

            manager._shell_channel_io_loop.add_callback(create)
            _subshell = created.result(timeout=5)
        subshell = _subshell
        widget.comm._reply_subshell_for = lambda data, default: subshell
    except Exception:
        return False
    return True


_subshell: str | None = None

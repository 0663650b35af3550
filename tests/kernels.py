"""Driving a real Jupyter kernel from a test: run a cell, get its output or its error."""

import time


class KernelError(AssertionError):
    """The cell raised; ``traceback`` is what the notebook shows."""

    def __init__(self, traceback: list[str]):
        self.traceback = traceback
        super().__init__("\n".join(traceback))


def execute(client, code: str, timeout: float = 180) -> str:
    """Run ``code`` in the kernel; return its stdout, raise KernelError on error."""
    msg_id = client.execute(code)
    out = []
    deadline = time.monotonic() + timeout
    while True:
        msg = client.get_iopub_msg(timeout=max(1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            raise KernelError(content["traceback"])
        elif kind == "status" and content["execution_state"] == "idle":
            return "".join(out)

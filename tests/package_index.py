"""A package index on the test hosts' network, standing in for the public one.

Test hosts have no route to any index. This one serves, in the simple-index layout pip
reads (``simple/NAME/`` holding wheels), every package cloudlab's engines need, as wheels
made from this client's own environment (with what the hosts' Debian Python needs beside
them), and nothing else: not cloudlab, which the hosts must never ask an index for. It
listens on every address, so each host network reaches it at its bridge address; its log
says what was asked for (TESTING.md, "A host that shares nothing with the client").

    with PackageIndex(folder) as index:
        url = index.url(network.client_address)   # index_url for the hosts
        index.asked()                             # {"numpy", "dask", ...}
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from cloudlab import wheels
from cloudlab.onhost import hostenv
from hosts import Started

#: The hosts' Python (Debian's, with nothing installed).
HOST_PYTHON = "/usr/bin/python3"
#: Packages served beside the engines' own: what tests name in host_packages, and mpi4py
EXTRA = ("pytest", "mpi4py")  # (mpi4py: what --mpi adds)


def host_markers() -> dict:
    """The environment markers of the hosts' Python."""
    done = subprocess.run([HOST_PYTHON, "-c", Path(hostenv.__file__).read_text(), "probe",
                           "/nonexistent", "managed"], capture_output=True, text=True,
                          check=True, cwd="/")
    return json.loads(done.stdout)["markers"]


class PackageIndex(Started):
    def __init__(self, folder: Path):
        self.folder = folder
        self.log = folder / "requests.log"
        self._server: subprocess.Popen | None = None

    def _start(self) -> None:
        simple = self.folder / "simple"
        markers = host_markers()
        # The engines' packages, and pytest, which the contract suite's module imports there.
        pins = wheels.engine_pins(EXTRA, markers=markers)
        for wheel in wheels.client_wheels(pins, markers):
            name = wheels.canonical(wheel.name.split("-")[0])
            (simple / name).mkdir(parents=True, exist_ok=True)
            (simple / name / wheel.name).symlink_to(wheel)
        with socket.socket() as s:
            s.bind(("", 0))
            self.port = s.getsockname()[1]
        self._server = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "0.0.0.0", str(self.port)],
            cwd=self.folder, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the test index did not start: {self.log.read_text()}") from None
                time.sleep(0.05)

    def url(self, address: str) -> str:
        return f"http://{address}:{self.port}/simple/"

    def asked(self) -> set[str]:
        """The names of the projects pip asked this index about."""
        return set(re.findall(r'"GET /simple/([^/ ]+)/ HTTP', self.log.read_text()))

    def close(self) -> None:
        if self._server is not None:
            self._server.kill()
            self._server.wait(10)

"""The toy backend: in-process engines, and a folder of "resources" that clusters leave.

Each start leaves a file ``toy-CLUSTER`` in ``resource_dir`` (as a cloud backend leaves a VM
or a security group); ``cloudlab gc`` deletes those of clusters no longer running, and
``cloudlab doctor`` checks that the folder can be written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cloudlab.backends._doctor import Check
from cloudlab.backends.inprocess import InProcessBackend
from cloudlab.profiles import option


@dataclass(frozen=True)
class ToyOptions:
    resource_dir: str = option("", "Where clusters leave their files.")
    launch_delay: float = option(0.0, "Seconds each process takes to start.")
    pretend_gpus: int = option(0, "GPUs to pretend there are.")
    max_engines: int = option(8, "Engines at most.")


class ToyBackend(InProcessBackend):
    name = "toy"
    Options = ToyOptions

    async def provision(self, engines: int, timeout: float) -> None:
        Path(self.options.resource_dir, f"toy-{self.cluster_name}").write_text(str(engines))

    @classmethod
    def doctor(cls, options: ToyOptions, engines: int) -> list[Check]:
        folder = Path(options.resource_dir)
        return [Check("resource folder", folder.is_dir() and os.access(folder, os.W_OK),
                      f"{folder} for {engines} engines")]

    @classmethod
    def garbage_place(cls, options: ToyOptions):
        return options.resource_dir, f"toy folder {options.resource_dir}"

    @classmethod
    def collect_garbage(cls, options: ToyOptions, live: set[str], dry_run: bool) -> list[str]:
        left = [p for p in sorted(Path(options.resource_dir).glob("toy-*"))
                if p.name.removeprefix("toy-") not in live]
        if not dry_run:
            for path in left:
                path.unlink()
        return [path.name for path in left]

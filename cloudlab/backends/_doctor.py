"""What `cloudlab doctor` does for every cloud: checks, one line each, and the checks that
do not depend on the cloud (the bootstrap's size, the SSH rule's address, the ssh tools)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from typing import Callable

from . import _vm


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: could not be checked (said why), not a failure
    detail: str
    seconds: float = 0.0

    def __str__(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "--  "}[self.ok]
        return f"{mark} {self.name}: {self.detail}"


def checker(checks: list[Check], code: Callable[[Exception], str]):
    """``check(name, test)``: runs ``test`` (returning ok, detail) and records the answer; an
    unexpected error is a failed check, said plainly (with the cloud's error ``code``)."""

    def check(name: str, test) -> bool | None:
        t0 = time.monotonic()
        try:
            ok, detail = test()
        except Exception as e:
            ok, detail = False, f"{code(e)}: {e}"
        checks.append(Check(name, ok, detail, time.monotonic() - t0))
        return ok

    return check


def bootstrap_size(options, instance_id_command: str):
    script = _vm.render_bootstrap(_vm.Bootstrap(
        "doctor", options.install, options.idle_timeout, options.max_hours,
        instance_id_command))  # (raises, with the fix, when over the limit)
    return True, f"{len(script.encode()):,} bytes of {_vm.USER_DATA_LIMIT:,}"


def ssh_rule(options):
    cidr = options.client_cidr or _vm.public_cidr()
    return True, f"SSH (port 22) open to {cidr} only"


def local_tools():
    missing = [t for t in ("ssh", "ssh-keygen") if shutil.which(t) is None]
    if missing:
        return False, (f"{', '.join(missing)} not found: install OpenSSH's client "
                       f"(Debian: openssh-client).")
    return True, "ssh and ssh-keygen found"

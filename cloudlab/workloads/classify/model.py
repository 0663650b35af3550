"""The classifier: hashed word and bigram counts, TF-IDF weights, a linear model.

Hashing needs no vocabulary, so any engine turns text into features on its own and the only
statistic to share is how many documents contain each feature (the IDF), a sum. Training
therefore runs in two parallel steps: the engines count document frequencies of their
shares (summed here), then vectorize their shares with those weights and send back the
sparse rows; the linear model is fitted here, where a few seconds of one core suffice for
tens of thousands of abstracts. The fitted model is a few MB: every engine gets a copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

FEATURES = 1 << 18  # hashed features: enough that collisions cost no accuracy here
#: Tokens: words of letters (and digits after the first letter), LaTeX commands unwrapped.
TOKEN = r"(?u)\b[^\W\d_][\w-]+\b"


def vectorizer():
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=FEATURES, ngram_range=(1, 2), alternate_sign=False,
                             norm=None, token_pattern=TOKEN, lowercase=True,
                             preprocessor=_clean, dtype=np.float32)


def _clean(text: str) -> str:
    return re.sub(r"\$[^$]*\$", " ", text).lower()  # inline maths says little about topic


def counts(texts: list[str]):
    """Sparse hashed term counts of ``texts``."""
    return vectorizer().transform(texts)


def document_frequencies(texts: list[str]) -> np.ndarray:
    """How many of ``texts`` contain each feature (adds up across shares)."""
    x = counts(texts)
    return np.bincount(x.indices, minlength=FEATURES).astype(np.int64)


@dataclass
class Model:
    idf: np.ndarray  # float32 (FEATURES,)
    coef: np.ndarray  # float32 (classes, FEATURES)
    intercept: np.ndarray  # float32 (classes,)
    classes: tuple[str, ...]

    def features(self, texts: list[str]):
        """TF-IDF rows, sublinear term frequency, unit length."""
        return tfidf(counts(texts), self.idf)

    def save(self, path) -> None:
        np.savez(path, idf=self.idf, coef=self.coef, intercept=self.intercept,
                 classes=np.array(self.classes))

    @classmethod
    def load(cls, path) -> Model:
        with np.load(path) as f:
            return cls(f["idf"], f["coef"], f["intercept"], tuple(str(c) for c in f["classes"]))

    def predict_index(self, texts: list[str]) -> np.ndarray:
        """Index into ``classes`` of each text's predicted label."""
        if getattr(self, "_weights", None) is None:  # (FEATURES, classes), C order: no copy
            self._weights = np.ascontiguousarray(self.coef.T)  # per product
        scores = self.features(texts) @ self._weights + self.intercept
        return np.argmax(scores, axis=1)

    def predict(self, texts: list[str]) -> list[str]:
        return [self.classes[k] for k in self.predict_index(texts)]


def tfidf(x, idf: np.ndarray):
    """Hashed counts ``x`` weighted: sublinear term frequency times IDF, rows of unit length."""
    from sklearn.preprocessing import normalize

    x = x.astype(np.float32)
    x.data = (1.0 + np.log(x.data)) * idf[x.indices]
    return normalize(x)


def idf_from(frequencies: np.ndarray, documents: int) -> np.ndarray:
    """Smoothed IDF, as scikit-learn computes it: ln((1 + n) / (1 + df)) + 1."""
    return (np.log((1 + documents) / (1 + frequencies)) + 1).astype(np.float32)


def fit(x, labels: list[str], idf: np.ndarray) -> Model:
    """A linear SVM on TF-IDF rows ``x`` (one per label)."""
    from sklearn.svm import LinearSVC

    classes = tuple(sorted(set(labels)))
    svm = LinearSVC(C=0.5).fit(x, labels)
    order = [list(svm.classes_).index(c) for c in classes]
    return Model(idf, svm.coef_[order].astype(np.float32),
                 svm.intercept_[order].astype(np.float32), classes)

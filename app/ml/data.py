"""The labelled corpora the project carries in ``data/``: loading, cleaning and fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from app.ml.labels import LABELS

if TYPE_CHECKING:
    import pandas as pd


DATA_DIR = Path(__file__).resolve().parents[2] / "data"
ROTTEN_TOMATOES = "rotten_tomatoes_corpus_full.csv.bz2"
TWEETS = "crowdflower_tweets.csv.bz2"
CLOTHING = "WomensClothingE-CommerceReviews.parquet.brotli"


@dataclass(frozen=True)
class Corpus:
    """Texts with binary labels (0 negative, 1 positive) and where they came from."""

    name: str
    texts: list[str]
    labels: NDArray[np.int64]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int] | NDArray[np.int64], name: str | None = None) -> Corpus:
        """Rows at ``index`` as a new corpus whose fingerprint covers exactly those rows."""
        idx = np.asarray(index, dtype=np.int64)
        texts = [self.texts[i] for i in idx]
        labels = self.labels[idx]
        return Corpus(name or self.name, texts, labels, fingerprint_rows(texts, labels))


def fingerprint_rows(texts: Sequence[str], labels: NDArray[np.int64]) -> str:
    """sha256 over every (label, text) row in order: changes whenever the training data does."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        digest.update(f"{int(label)}\t{text}\n".encode())
    return digest.hexdigest()


def _corpus(name: str, frame: pd.DataFrame) -> Corpus:
    frame = frame.dropna(subset=["text"])
    frame = frame[frame["text"].str.strip().astype(bool)]
    texts = frame["text"].astype(str).str.strip().tolist()
    labels = frame["label"].to_numpy(dtype=np.int64)
    return Corpus(name, texts, labels, fingerprint_rows(texts, labels))


def load_rotten_tomatoes(data_dir: Path = DATA_DIR) -> Corpus:
    """Rotten Tomatoes critic snippets: ``fresh`` positive, ``rotten`` negative; plot synopses dropped."""
    import pandas as pd  # only training needs pandas

    frame = pd.read_csv(data_dir / ROTTEN_TOMATOES, usecols=["category", "text"])
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    frame = frame.assign(label=(frame["category"] == "fresh").astype(np.int64))
    return _corpus("rotten_tomatoes", frame)


def load_tweets(data_dir: Path = DATA_DIR) -> Corpus:
    """CrowdFlower tweets labelled positive or negative (neutral ones dropped)."""
    import pandas as pd  # only training needs pandas

    frame = pd.read_csv(data_dir / TWEETS, encoding="latin-1", usecols=["sentiment", "text"])
    frame = frame[frame["sentiment"].isin(LABELS)]
    frame = frame.assign(label=(frame["sentiment"] == "positive").astype(np.int64))
    return _corpus("tweets", frame)


def load_clothing(data_dir: Path = DATA_DIR) -> Corpus:
    """Women's clothing reviews: ratings 1-2 negative, 4-5 positive, 3 dropped."""
    import pandas as pd  # only training needs pandas

    frame = pd.read_parquet(data_dir / CLOTHING, columns=["Review Text", "Rating"])
    frame = frame.rename(columns={"Review Text": "text"})
    frame = frame[frame["Rating"] != 3]
    frame = frame.assign(label=(frame["Rating"] >= 4).astype(np.int64))
    return _corpus("clothing", frame)


CORPORA = {"rotten_tomatoes": load_rotten_tomatoes, "tweets": load_tweets, "clothing": load_clothing}

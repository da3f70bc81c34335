"""A task's train / validation / test samples drawn from its source splits as Ray Data operations.

Every record gets a content key (`content_hash` of its text) and a seeded rank, a number in [0, 1) that
depends only on the task's seed and the key. A split's sample is the records of lowest rank in each
stratum (the label, for classification), in proportion to the strata's counts. Because a rank does not
depend on where a record sits in a file, on the blocks or on the number of readers, the sample is the
same however the data is read, and it takes three passes over the data, none of them through the driver:

1. counts per source split and stratum (per-batch counts summed in the driver: a row per class and block);
2. the candidates: each stratum's records below a rank threshold sized for about 1.25x what it needs,
   collected (the only rows the driver ever holds: as many as the sizes ask for, not as the data has);
3. when the source ships several splits: which other split holds each candidate's key, so that
   validation never overlaps the source's test split and train overlaps neither.

The exact choice (dedupe by key, disjointness, carving the splits a source does not ship out of train)
is then made over the candidates; a stratum that runs short below its threshold is read again with a
larger one. Splits the source does not ship are carved from train: test first, then validation, then
train, consecutive runs of the same rank order, so they are disjoint by construction.
"""

from __future__ import annotations

import hashlib
import math
import random
import warnings
from dataclasses import dataclass, field

import numpy as np
import ray

SPLITS = ("train", "validation", "test")
MARGIN, SLACK, GROWTH = 1.25, 16, 4  # candidates per stratum: MARGIN x needed + SLACK; x GROWTH when short


class SamplingError(ValueError):
    """The data cannot give the asked-for splits; the message names the task and what was expected."""


def content_hash(text: str) -> str:
    """Identity of an input for disjointness: case- and whitespace-insensitive."""
    return hashlib.sha1(" ".join(text.split()).lower().encode("utf-8")).hexdigest()


def seeded_rank(seed: str, key: str) -> float:
    """The sampling order of the record with content key `key` under `seed`: uniform in [0, 1)."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def allocate(counts: dict[str, int], size: int) -> dict[str, int]:
    """`size` spread over the strata in proportion to `counts` (largest remainder, ties by name); all when fewer."""
    total = sum(counts.values())
    if size >= total:
        return dict(counts)
    exact = {stratum: size * n / total for stratum, n in counts.items()}
    shares = {stratum: int(x) for stratum, x in exact.items()}
    for stratum in sorted(counts, key=lambda s: (shares[s] - exact[s], s))[: size - sum(shares.values())]:
        shares[stratum] += 1
    return shares


@dataclass
class KeyRecords:
    """The map that gives every record of one source split its key, rank and stratum."""

    split: str
    seed: str
    stratified: bool
    max_chars: int | None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [content_hash(text) for text in batch["text"]]  # of the whole text, before truncation
        texts = batch["text"] if self.max_chars is None else np.array([t[: self.max_chars] for t in batch["text"]], dtype=object)
        return {"text": texts, "label": batch["label"], "key": np.array(keys, dtype=object),
                "rank": np.array([seeded_rank(self.seed, k) for k in keys], dtype=np.float64),
                "stratum": batch["label"] if self.stratified else np.full(len(keys), "", dtype=object),
                "split": np.full(len(keys), self.split, dtype=object)}


def count_strata(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch's records per (split, stratum): summed in the driver, a row per class (no shuffle, as a groupby has)."""
    if not len(batch["split"]):
        return {"split": np.array([], dtype=object), "stratum": np.array([], dtype=object), "count": np.array([], dtype=np.int64)}
    pairs, counts = np.unique(np.stack([batch["split"].astype(str), batch["stratum"].astype(str)], axis=1), axis=0, return_counts=True)
    return {"split": pairs[:, 0].astype(object), "stratum": pairs[:, 1].astype(object), "count": counts}


@dataclass
class BelowThreshold:
    """Keeps the records whose rank is below their (split, stratum)'s threshold."""

    thresholds: dict[tuple[str, str], float]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        limits = np.array([self.thresholds.get((s, t), -1.0) for s, t in zip(batch["split"], batch["stratum"])])
        keep = batch["rank"] < limits
        return {name: column[keep] for name, column in batch.items()}


@dataclass
class HoldsKey:
    """Keeps (split, key) of the records whose key is one of `keys`."""

    keys: frozenset[str]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.array([k in self.keys for k in batch["key"]], dtype=bool)
        return {"split": batch["split"][keep], "key": batch["key"][keep]}


@dataclass
class _Pool:
    """One source split's candidates of one stratum, distinct by key, in rank order."""

    records: list[dict]
    complete: bool  # the threshold was 1: every record of the stratum is here
    taken: int = 0

    def take(self, count: int, excluded: set[str]) -> list[dict] | None:
        """The next `count` records not in `excluded` (fewer when the stratum has no more); None: read more."""
        picked = []
        while len(picked) < count and self.taken < len(self.records):
            record = self.records[self.taken]
            self.taken += 1
            if record["key"] not in excluded:
                picked.append(record)
        return picked if len(picked) == count or self.complete else None


@dataclass
class Sample:
    """The sampled splits (records {"text", "label"}), what the sampling reports, and every label of the data."""

    splits: dict[str, list[dict[str, str]]]
    report: dict[str, object] = field(default_factory=dict)
    labels: set[str] = field(default_factory=set)


class _ReadMore(Exception):
    def __init__(self, pools: set[tuple[str, str]]) -> None:
        self.pools = pools


def sample_task(sources: dict[str, ray.data.Dataset], sizes: dict[str, int], seed: str, *, stratified: bool,
                classes: int | None = None, max_chars: int | None = None, where: str = "task") -> Sample:
    """Seeded, stratified, disjoint samples of `sizes` from the source splits `sources` (Datasets of text, label)."""
    keyed = [dataset.map_batches(KeyRecords(split, seed, stratified, max_chars), batch_format="numpy")
             for split, dataset in sources.items()]
    records = keyed[0].union(*keyed[1:]) if len(keyed) > 1 else keyed[0]
    counts: dict[str, dict[str, int]] = {split: {} for split in sources}
    for row in records.map_batches(count_strata, batch_format="numpy").take_all():  # a row per (block, split, stratum)
        counts[row["split"]][row["stratum"]] = counts[row["split"]].get(row["stratum"], 0) + int(row["count"])
    counts = {split: dict(sorted(by_stratum.items())) for split, by_stratum in counts.items()}  # not in read order
    labels = {stratum for by_stratum in counts.values() for stratum in by_stratum} if stratified else set()
    if classes is not None:
        train = counts["train"]
        kept = set(sorted(train, key=lambda s: (-train[s], s))[:classes])
        counts = {split: {s: n for s, n in by_stratum.items() if s in kept} for split, by_stratum in counts.items()}
    thresholds = {(split, s): min(1.0, (MARGIN * n + SLACK) / total) for split, n_by_stratum in _needs(counts, sizes).items()
                  for s, n in n_by_stratum.items() if (total := counts[split][s])}
    while True:
        candidates = records.map_batches(BelowThreshold(thresholds), batch_format="numpy").take_all()
        holders: dict[str, set[str]] = {}
        if len(sources) > 1:  # which source splits hold each candidate's key (the same key has the same rank anywhere)
            held = records.map_batches(HoldsKey(frozenset(r["key"] for r in candidates)), batch_format="numpy").take_all()
            for row in held:
                holders.setdefault(row["key"], set()).add(row["split"])
        try:
            return _choose(candidates, holders, thresholds, counts, sizes, labels, seed, where)
        except _ReadMore as short:
            thresholds |= {pool: min(1.0, thresholds[pool] * GROWTH) for pool in short.pools}


def _needs(counts: dict[str, dict[str, int]], sizes: dict[str, int]) -> dict[str, dict[str, int]]:
    """Roughly how many records each (source split, stratum) gives: its own split, plus what is carved from train."""
    needs = {split: allocate(by_stratum, sizes[split]) for split, by_stratum in counts.items()}
    carved = sizes["test"] * ("test" not in counts) + max(0, sizes["validation"] - sum(counts.get("validation", {}).values()))
    for stratum, n in allocate(counts["train"], sizes["train"] + carved).items():
        needs["train"][stratum] = n
    return needs


def _choose(candidates: list[dict], holders: dict[str, set[str]], thresholds: dict[tuple[str, str], float],
            counts: dict[str, dict[str, int]], sizes: dict[str, int], labels: set[str], seed: str, where: str) -> Sample:
    """The exact samples from the candidates, in today's priority: test, then validation, then train."""
    by_pool: dict[tuple[str, str], dict[str, dict]] = {}
    for record in sorted(candidates, key=lambda r: (r["rank"], r["key"], r["label"])):
        by_pool.setdefault((record["split"], record["stratum"]), {}).setdefault(record["key"], record)  # dedupe by key
    pools = {pool: _Pool(list(by_pool.get(pool, {}).values()), thresholds[pool] >= 1.0) for pool in thresholds}
    report: dict[str, object] = {}
    short: set[tuple[str, str]] = set()

    def take(split: str, wanted: dict[str, int], excluded: set[str]) -> list[dict]:
        picked, excluded = [], set(excluded)  # one text under two labels is taken once
        for stratum, count in wanted.items():
            got = pools[(split, stratum)].take(count, excluded)
            if got is None:
                short.add((split, stratum))
            else:
                picked += got
                excluded |= {r["key"] for r in got}
        return picked

    test_keys = {key for key, splits in holders.items() if "test" in splits}
    validation_keys = {key for key, splits in holders.items() if "validation" in splits}
    chosen: dict[str, list[dict]] = {}
    if "test" in counts:
        chosen["test"] = take("test", allocate(counts["test"], sizes["test"]), set())
    else:
        chosen["test"] = take("train", allocate(counts["train"], sizes["test"]), validation_keys)
        report["test_made_from"] = "train"
    held_out = {r["key"] for r in chosen["test"]} | test_keys
    chosen["validation"] = []
    if "validation" in counts:
        overlap = [r for r in _pool_records(pools, "validation") if r["key"] in test_keys]
        if overlap:
            report["source_validation_test_overlap"] = len(overlap)
        # all of the validation split when it has too few; the rest comes from train
        available = sum(counts["validation"].values()) - len(overlap)
        chosen["validation"] = take("validation", allocate(counts["validation"], min(sizes["validation"], available)), held_out)
    missing = sizes["validation"] - len(chosen["validation"])
    if missing > 0 and not short:
        remaining = {s: n - pools[("train", s)].taken for s, n in counts["train"].items()}
        chosen["validation"] += take("train", allocate(remaining, missing), held_out)
        report["validation_made_from"] = "train" if "validation" not in counts else "source validation + train"
    held_out |= {r["key"] for r in chosen["validation"]} | validation_keys
    train_overlap = sum(r["key"] in test_keys | validation_keys for r in _pool_records(pools, "train"))
    if train_overlap:  # of the train candidates: what the sample could have leaked
        report["source_train_heldout_overlap"] = train_overlap
    if not short:
        remaining = {s: n - pools[("train", s)].taken for s, n in counts["train"].items()}
        chosen["train"] = take("train", allocate(remaining, sizes["train"]), held_out)
    if short:
        raise _ReadMore({pool for pool in short if thresholds[pool] < 1.0})
    if report.get("source_validation_test_overlap"):
        warnings.warn(f"{where}: {report['source_validation_test_overlap']} of the source's validation records are also in its "
                      "test split; dropped from validation")
    rng = random.Random(f"{seed}:order")
    splits = {}
    for split in SPLITS:
        if sizes[split] > len(chosen[split]):
            warnings.warn(f"{where}: sizes.{split}={sizes[split]} is larger than the {len(chosen[split])} records available; capped")
            report[f"{split}_capped_to"] = len(chosen[split])
        rows = [{"text": r["text"], "label": r["label"]} for r in sorted(chosen[split], key=lambda r: (r["rank"], r["key"], r["label"]))]
        rng.shuffle(rows)
        if not rows:
            raise SamplingError(f"{where}: the {split} split is empty after filtering and sampling")
        splits[split] = rows
    return Sample(splits, report, labels)


def _pool_records(pools: dict[tuple[str, str], _Pool], split: str) -> list[dict]:
    return [r for (s, _), pool in pools.items() if s == split for r in pool.records]


def blocks_for(rows: int, per_block: int = 4096) -> int:
    """Blocks for an in-memory source of `rows` records: enough for the readers to share, not one per record."""
    return max(1, math.ceil(rows / per_block))

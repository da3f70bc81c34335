"""Task streams: schema, every source format, disjoint stratified splits, bundled streams, bad input."""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipeline.sampling import content_hash
from pipeline.streams import StreamError, default_verbalizer, load_stream, parse_stream

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "streams"


def records(count: int, labels=("pos", "neg"), prefix: str = "text") -> list[dict]:
    return [{"text": f"{prefix} number {i} about {labels[i % len(labels)]}", "label": labels[i % len(labels)]} for i in range(count)]


def write_stream(folder: Path, tasks: list[dict], orders: dict | None = None, **extra) -> Path:
    path = folder / "stream.yaml"
    names = [t["name"] for t in tasks]
    path.write_text(yaml.safe_dump({"name": "s", "seed": 1, "tasks": tasks, "orders": orders or {"main": names}} | extra))
    return path


def file_task(name: str, path: str, sizes=(10, 4, 6), **extra) -> dict:
    return {
        "name": name,
        "source": {"type": "file", "path": path} | extra.pop("source_extra", {}),
        "sizes": dict(zip(("train", "validation", "test"), sizes)),
        "instruction": "Classify.",
    } | extra


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# -- formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_each_local_file_format_loads_with_field_mapping(fmt, tmp_path):
    rows = [{"sentence": r["text"], "y": r["label"]} for r in records(40)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        # a quoted field with a newline inside: the csv module must be used, not line splitting
        rows[0]["sentence"] = "first line\nsecond line"
        lines = [f"sentence{sep}y"] + [f'"{r["sentence"]}"{sep}{r["y"]}' for r in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    task = file_task("t", path.name, source_extra={"text_field": "sentence", "label_field": "y"})
    (loaded,) = load_stream(write_stream(tmp_path, [task]))
    assert {len(v) for v in loaded.splits.values()} == {10, 4, 6}
    assert set(loaded.answers) == {"pos", "neg"}
    assert all(r["target"] in ("pos", "neg") for r in loaded.splits["train"])


def test_cl_benchmark_folder_with_dev_equal_to_test_gets_a_disjoint_validation(tmp_path):
    folder = tmp_path / "cl" / "dbpedia"
    folder.mkdir(parents=True)
    as_cl = lambda rs: [{"sentence": r["text"], "label": r["label"]} for r in rs]  # noqa: E731
    (folder / "train.json").write_text(json.dumps(as_cl(records(60, prefix="train"))))
    test = as_cl(records(20, prefix="test"))
    (folder / "dev.json").write_text(json.dumps(test))  # as O-LoRA ships it: dev == test
    (folder / "test.json").write_text(json.dumps(test))
    (folder / "labels.json").write_text(json.dumps(["pos", "neg"]))
    task = {"name": "db", "source": {"type": "cl_benchmark", "path": "cl/dbpedia"}, "sizes": {"train": 30, "validation": 10, "test": 20}}
    with pytest.warns(UserWarning, match="also in its test split"):
        (loaded,) = load_stream(write_stream(tmp_path, [task]))
    assert loaded.report["source_validation_test_overlap"] == 20
    test_hashes = {content_hash(r["text"]) for r in loaded.splits["test"]}
    assert not test_hashes & {content_hash(r["text"]) for r in loaded.splits["validation"]}
    assert len(loaded.splits["validation"]) == 10


def test_trace_folder_gives_free_form_targets(tmp_path):
    folder = tmp_path / "trace"
    folder.mkdir()
    for split, count in (("train", 12), ("eval", 5), ("test", 6)):
        rows = [{"prompt": f"{split} question {i}?", "answer": f"answer {i}"} for i in range(count)]
        (folder / f"{split}.json").write_text(json.dumps(rows))
    task = {"name": "qa", "source": {"type": "trace", "path": "trace"}, "metric": "exact_match", "sizes": {"train": 12, "validation": 5, "test": 6}}
    (loaded,) = load_stream(write_stream(tmp_path, [task]))
    assert loaded.answers == [] and loaded.splits["test"][0]["target"].startswith("answer")


# -- splits and sampling ---------------------------------------------------------------------------


def test_splits_are_disjoint_stratified_and_seeded(tmp_path):
    rows = records(200, labels=("a",)) + records(100, labels=("b",), prefix="b") + records(100, labels=("c",), prefix="c")
    write_jsonl(tmp_path / "d.jsonl", rows)
    path = write_stream(tmp_path, [file_task("t", "d.jsonl", sizes=(80, 20, 40))])
    first, second = load_stream(path)[0], load_stream(path)[0]
    assert first.splits == second.splits  # seeded
    hashes = {s: {content_hash(r["text"]) for r in rs} for s, rs in first.splits.items()}
    assert not hashes["train"] & hashes["validation"] and not hashes["train"] & hashes["test"]
    assert not hashes["validation"] & hashes["test"]
    counts = Counter(r["target"] for r in first.splits["train"])
    assert counts == {"a": 40, "b": 20, "c": 20}


def test_the_sample_does_not_depend_on_how_the_data_is_split_into_files(tmp_path):
    """Ranks come from the seed and the content: one file, a folder of parts, a glob and parquet give one sample."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = records(120, labels=("a", "b", "c"))
    write_jsonl(tmp_path / "whole.jsonl", rows)
    (tmp_path / "parts").mkdir()
    for part in range(3):  # reversed and interleaved: another order and other blocks than the whole file
        write_jsonl(tmp_path / "parts" / f"part-{part}.jsonl", rows[::-1][part::3])
    pq.write_table(pa.Table.from_pylist(rows[::2]), tmp_path / "half-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1::2]), tmp_path / "half-1.parquet")
    tasks = [file_task("whole", "whole.jsonl", sizes=(30, 9, 12), seed=7), file_task("folder", "parts", sizes=(30, 9, 12), seed=7),
             file_task("glob", "parts/part-*.jsonl", sizes=(30, 9, 12), seed=7),
             file_task("parquet", "half-*.parquet", sizes=(30, 9, 12), seed=7)]
    loaded = {task.name: task for task in load_stream(write_stream(tmp_path, tasks))}
    as_sets = {name: {split: sorted(r["text"] for r in rs) for split, rs in task.splits.items()} for name, task in loaded.items()}
    assert as_sets["folder"] == as_sets["whole"] and as_sets["glob"] == as_sets["whole"] and as_sets["parquet"] == as_sets["whole"]


def test_a_location_that_matches_no_file_names_it(tmp_path):
    with pytest.raises(StreamError, match=r"nothing\*\.jsonl: no .* files there"):
        load_stream(write_stream(tmp_path, [file_task("t", "nothing*.jsonl")]))


def test_duplicate_texts_across_source_splits_never_leak_into_train(tmp_path):
    train = records(40)
    test = records(10)  # the same texts as train's first ten
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    task = {"name": "t", "source": {"type": "file", "splits": {"train": "train.jsonl", "test": "test.jsonl"}}, "sizes": {"train": 20, "validation": 5, "test": 10}}
    (loaded,) = load_stream(write_stream(tmp_path, [task]))
    assert loaded.report["source_train_heldout_overlap"] == 10
    assert not {content_hash(r["text"]) for r in loaded.splits["train"]} & {content_hash(r["text"]) for r in loaded.splits["test"]}


def test_classes_keeps_the_most_frequent_and_verbalizers_map_labels(tmp_path):
    rows = records(30, labels=("big",)) + records(20, labels=("mid",), prefix="m") + records(5, labels=("rare",), prefix="r")
    write_jsonl(tmp_path / "d.jsonl", rows)
    task = file_task("t", "d.jsonl", sizes=(20, 5, 10), classes=2, verbalizers={"big": "large"})
    (loaded,) = load_stream(write_stream(tmp_path, [task]))
    assert loaded.answers == ["large", "mid"]


def test_sizes_larger_than_the_data_are_capped_with_a_warning(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", records(30))
    with pytest.warns(UserWarning, match=r"sizes.train=500 is larger than the 16 records available; capped"):
        (loaded,) = load_stream(write_stream(tmp_path, [file_task("t", "d.jsonl", sizes=(500, 6, 8))]))
    assert loaded.report["train_capped_to"] == 16


def test_orders_select_and_reorder_tasks(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", records(40))
    tasks = [file_task(n, "d.jsonl") for n in ("a", "b", "c")]
    path = write_stream(tmp_path, tasks, orders={"order1": ["a", "b", "c"], "order2": ["c", "a"]})
    assert [t.name for t in load_stream(path, "order2")] == ["c", "a"]
    assert [t.name for t in load_stream(path)] == ["a", "b", "c"]


def test_prompts_hold_instruction_input_and_answer_cue(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", records(40))
    (loaded,) = load_stream(write_stream(tmp_path, [file_task("t", "d.jsonl")]))
    prompt, continuation = loaded.training_texts()[0]
    assert prompt.startswith("Classify.\n\nInput: text number") and prompt.endswith("\nAnswer:")
    assert continuation in (" pos", " neg")


def test_default_verbalizer_splits_camel_case_and_underscores():
    assert default_verbalizer("FilmFestival") == "film festival"
    assert default_verbalizer("exchange_charge") == "exchange charge"


# -- bundled streams (real data from installed packages) ----------------------------------------


@pytest.mark.parametrize("stream", ["standard", "topics"])
def test_bundled_streams_parse_with_three_orders_of_the_same_tasks(stream):
    spec = parse_stream(CONFIGS / f"{stream}.yaml")
    assert sorted(spec.orders) == ["order1", "order2", "order3"]
    assert all(sorted(order) == ["amazon", "bbc", "dbpedia", "yahoo"] for order in spec.orders.values())


def test_topics_stream_loads_real_data_with_all_splits():
    tasks = load_stream(CONFIGS / "topics.yaml", "order1")
    assert [t.name for t in tasks] == ["dbpedia", "amazon", "yahoo", "bbc"]
    expected_answers = {"dbpedia": 8, "amazon": 2, "yahoo": 10, "bbc": 5}
    for task in tasks:
        assert len(task.answers) == expected_answers[task.name]
        assert {s: len(r) for s, r in task.splits.items()} == {"train": 48, "validation": 16, "test": 32}
        assert all(r["target"] in task.answers for rs in task.splits.values() for r in rs)


def test_intent_stream_loads_six_verbalized_classes_per_task():
    tasks = load_stream(CONFIGS / "intent.yaml", "order1")
    assert [t.name for t in tasks] == ["banking", "hwu", "stackoverflow"]
    assert sorted(tasks[0].answers) == ["card fee", "charged twice", "missing deposit", "unknown debit", "withdrawal fee", "wrong cash"]
    for task in tasks:
        assert len(task.answers) == 6
        assert {s: len(r) for s, r in task.splits.items()} == {"train": 192, "validation": 16, "test": 32}
        assert all(r["target"] in task.answers for rs in task.splits.values() for r in rs)


# -- bad input: one clear error naming file / field / expected ----------------------------------


def bad_stream(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        ("name: s\ntasks: []\norders: {o: []}\n", r"tasks: List should have at least 1 item"),
        ("name: s\ncolour: red\ntasks: [{name: a, source: {type: bundled, dataset: yahoo}, sizes: {train: 1, validation: 1, test: 1}}]\norders: {o: [a]}\n", r"colour: Extra inputs are not permitted"),
        ("name: s\ntasks: [{name: a, source: {type: bundled, dataset: yahoo}, sizes: {train: many, validation: 1, test: 1}}]\norders: {o: [a]}\n", r"tasks.0.sizes.train: Input should be a valid integer"),
        ("name: s\ntasks: [{name: a, source: {type: ftp}, sizes: {train: 1, validation: 1, test: 1}}]\norders: {o: [a]}\n", r"tasks.0.source: Input tag 'ftp' found using 'type' does not match"),
        ("name: s\ntasks:\n - {name: a, source: {type: bundled, dataset: yahoo}, sizes: {train: 1, validation: 1, test: 1}}\n - {name: a, source: {type: bundled, dataset: yahoo}, sizes: {train: 1, validation: 1, test: 1}}\norders: {o: [a]}\n", r"duplicate task names \['a'\]"),
        ("name: s\ntasks: [{name: a, source: {type: bundled, dataset: yahoo}, sizes: {train: 1, validation: 1, test: 1}}]\norders: {o: [a, b]}\n", r"order 'o' lists unknown tasks \['b'\]"),
        ("name: s\ntasks: [{name: a, source: {type: file}, sizes: {train: 1, validation: 1, test: 1}}]\norders: {o: [a]}\n", r"give exactly one of 'path'"),
        ("[1, 2", r"not valid YAML"),
    ],
)
def test_bad_stream_files_name_the_file_and_field(tmp_path, body, message):
    path = bad_stream(tmp_path, body)
    with pytest.raises(StreamError, match=message) as info:
        load_stream(path)
    assert str(path) in str(info.value)


def test_missing_stream_file(tmp_path):
    with pytest.raises(StreamError, match=r"nope.yaml: file not found"):
        load_stream(tmp_path / "nope.yaml")


def test_unknown_order_lists_the_defined_ones(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", records(40))
    with pytest.raises(StreamError, match=r"unknown order 'order9'; the stream defines \['main'\]"):
        load_stream(write_stream(tmp_path, [file_task("t", "d.jsonl")]), "order9")


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, r"task 't': .*missing.jsonl: file not found"),
        (lambda d: (d / "missing.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "a"}\n'), r"missing.jsonl:1: not UTF-8 text"),
        (lambda d: write_jsonl(d / "missing.jsonl", [{"body": "x", "label": "a"}]), r"record 0 has no field 'text' \(fields: \['body', 'label'\]\)"),
        (lambda d: (d / "missing.jsonl").write_text('{"text": "x", "label": "a"}\nnot json\n'), r"missing.jsonl:2: not valid JSON"),
    ],
)
def test_bad_data_files_name_the_file_and_field(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(StreamError, match=message):
        load_stream(write_stream(tmp_path, [file_task("t", "missing.jsonl")]))


def test_unknown_bundled_dataset_lists_the_choices(tmp_path):
    task = {"name": "t", "source": {"type": "bundled", "dataset": "imdb"}, "sizes": {"train": 1, "validation": 1, "test": 1}}
    with pytest.raises(StreamError, match=r"unknown bundled dataset 'imdb'; bundled datasets: \['amazon', 'banking', 'bbc'"):
        load_stream(write_stream(tmp_path, [task]))


def test_label_in_test_never_seen_in_train_is_an_error(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", records(20, labels=("a", "b")))
    write_jsonl(tmp_path / "test.jsonl", records(6, labels=("a", "z"), prefix="t"))
    task = {"name": "t", "source": {"type": "file", "splits": {"train": "train.jsonl", "test": "test.jsonl"}}, "sizes": {"train": 10, "validation": 4, "test": 6}}
    with pytest.raises(StreamError, match=r"test labels \['z'\] never occur in the train split"):
        load_stream(write_stream(tmp_path, [task]))


def test_empty_split_after_filtering_is_an_error(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", records(1))
    with pytest.raises(StreamError, match=r"the train split is empty after filtering and sampling"):
        with pytest.warns(UserWarning):
            load_stream(write_stream(tmp_path, [file_task("t", "d.jsonl", sizes=(5, 1, 1))]))


def test_empty_or_shared_answer_words_are_errors(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", records(40))
    with pytest.raises(StreamError, match=r"verbalizers for \['pos'\] are empty"):
        load_stream(write_stream(tmp_path, [file_task("t", "d.jsonl", verbalizers={"pos": " "})]))
    with pytest.raises(StreamError, match=r"two labels share an answer word"):
        load_stream(write_stream(tmp_path, [file_task("t", "d.jsonl", verbalizers={"pos": "x", "neg": "x"})]))


def test_an_answer_word_that_tokenizes_to_nothing_is_an_error(tmp_path):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pipeline.streams import check_answers_tokenize

    # a real tokenizer whose normalizer drops everything but ASCII letters (as some word-level ones do)
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "pos": 1, "neg": 2}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Replace(Regex("[^a-z ]"), "")
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    write_jsonl(tmp_path / "d.jsonl", records(40))
    (task,) = load_stream(write_stream(tmp_path, [file_task("t", "d.jsonl", verbalizers={"pos": "\U0001F600"})]))
    with pytest.raises(StreamError, match="task 't': answer word '\U0001F600' tokenizes to nothing"):
        check_answers_tokenize([task], tokenizer)

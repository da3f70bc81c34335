"""The catalogue of bad input: each case goes through the real CLI (`pipeline.cli.main`) and must exit 2
with one clear `error:` line that names what is wrong and where, before anything is written (and
before Ray starts, except for problems in data files, which Ray Data reads). The table in docs/RELIABILITY.md is generated from these cases (the test fails when it is out
of date); regenerate with `PROCL_WRITE_DOCS=1 .venv/bin/python -m pytest tests/test_bad_input.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from test_chain import write_config

from pipeline.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "RELIABILITY.md"
MEASURED: dict[str, tuple[str, str]] = {}  # case id -> (command, message), filled as the cases run


def _config(tmp: Path) -> Path:
    return write_config(tmp, "bad")


def _with_config(*args: str, command: str = "plan") -> Callable[[Path], list[str]]:
    return lambda tmp: [command, str(_config(tmp)), *args]


def _file(name: str, text: str | bytes, *args: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        path = tmp / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return ["plan", str(path), *args]
    return setup


def _stream(tasks: list[dict], orders: dict | None = None, data: tuple[str, bytes] | None = None) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        if data:
            (tmp / data[0]).write_bytes(data[1])
        stream = {"name": "s", "seed": 0, "tasks": tasks, "orders": orders or {"main": [t["name"] for t in tasks]}}
        (tmp / "bad-stream.yaml").write_text(yaml.safe_dump(stream))
        return ["plan", str(_config(tmp)), "--set", f"stream.path={tmp / 'bad-stream.yaml'}"]
    return setup


def _task(source: dict, name: str = "t") -> dict:
    return {"name": name, "source": source, "instruction": "Classify.", "sizes": {"train": 4, "validation": 2, "test": 2}}


def _model_folder(config_json: dict | None) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        folder = tmp / "model"
        folder.mkdir()
        if config_json is not None:
            (folder / "config.json").write_text(json.dumps(config_json))
        return ["plan", str(_config(tmp)), "--set", f"model.name={folder}", "--set", "model.dtype=float32"]
    return setup


def _run_folder(manifest: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        run_dir = tmp / "runs" / "bad"
        run_dir.mkdir(parents=True)
        (run_dir / "manifest.json").write_text(manifest)
        return ["run", str(_config(tmp))]
    return setup


def _space(text: str, *args: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        (tmp / "space.yaml").write_text(text)
        return ["tune", str(_config(tmp)), "--space", str(tmp / "space.yaml"), *args]
    return setup


JSONL = b'{"text": "good", "label": "a"}\n'
CASES: list[tuple[str, str, Callable[[Path], list[str]], str]] = [
    # id, what, setup -> argv, expected part of the message
    ("config-missing", "config file does not exist", lambda tmp: ["plan", str(tmp / "nope.yaml")], "nope.yaml: config file not found"),
    ("config-not-yaml", "config is not YAML", _file("c.yaml", "a: [1"), "c.yaml: not a valid YAML file"),
    ("config-not-mapping", "config is a list", _file("c.yaml", "- 1\n- 2\n"), "expected a mapping of sections"),
    ("config-not-utf8", "config is not UTF-8 text", _file("c.yaml", b"run_name: caf\xe9\n"), "c.yaml: not a valid YAML file"),
    ("unknown-section", "unknown top-level key", _with_config("--set", "colour=red"), "colour: Extra inputs are not permitted"),
    ("unknown-field", "unknown nested key", _with_config("--set", "strategy.procl.slots=2"), "strategy.procl.slots: Extra inputs are not permitted"),
    ("wrong-type", "a number given as a word", _with_config("--set", "training.batch_size=four"), "training.batch_size: Input should be a valid integer"),
    ("negative-lr", "impossible value", _with_config("--set", "training.lr=-1"), "training.lr: Input should be greater than 0"),
    ("zero-tau", "routing temperature 0", _with_config("--set", "strategy.procl.tau=0"), "strategy.procl.tau: Input should be greater than 0"),
    ("zero-stage-5", "ZeRO stage that does not exist", _with_config("--set", "deepspeed.zero_stage=5"), "deepspeed.zero_stage: Input should be 0, 1, 2 or 3"),
    ("offload-zero0", "optimizer offload without ZeRO", _with_config("--set", "deepspeed.zero_stage=0", "--set", "deepspeed.offload_optimizer=true"),
     "offload_optimizer needs deepspeed.zero_stage >= 1"),
    ("o_lora-zero3", "a strategy ZeRO-3 cannot run", _with_config("--set", "strategy.name=o_lora", "--set", "deepspeed.zero_stage=3"),
     "strategy o_lora does not run under deepspeed.zero_stage 3"),
    ("unknown-strategy", "strategy name that does not exist", _with_config("--set", "strategy.name=ewc"), "unknown strategy 'ewc'; choose one of"),
    ("slots-rank", "N slots not dividing the LoRA rank", _with_config("--set", "strategy.procl.num_slots=3"), "num_slots=3 does not divide strategy.lora.r (4)"),
    ("run-name-path", "run name that is a path", _with_config("--set", "run_name=../elsewhere"), "run_name: String should match pattern"),
    ("set-no-equals", "--set without a value", _with_config("--set", "training.lr"), "expected key.path=value"),
    ("set-into-value", "--set below a value", _with_config("--set", "training.lr.x=1"), "'lr' is not a section"),
    ("resources-cpu", "CPUs given as a custom resource", _with_config("--set", "scaling.resources_per_worker={CPU: 2}"), "set CPUs with cpus_per_worker"),
    ("max-tasks-0", "zero tasks", _with_config("--set", "stream.max_tasks=0"), "stream.max_tasks: Input should be greater than 0"),
    ("stream-missing", "stream file does not exist", lambda tmp: ["plan", str(_config(tmp)), "--set", f"stream.path={tmp / 'none.yaml'}"], "none.yaml: file not found"),
    ("order-unknown", "stream order that is not defined", _with_config("--set", "stream.order=order9"), "unknown order 'order9'; the stream defines ['main']"),
    ("source-type", "data source type that does not exist", _stream([_task({"type": "ftp"})]), "Input tag 'ftp' found using 'type' does not match"),
    ("order-lists-unknown", "order naming a task that is not defined", _stream([_task({"type": "bundled", "dataset": "bbc"})], {"o": ["t", "u"]}),
     "order 'o' lists unknown tasks ['u']"),
    ("bundled-unknown", "bundled dataset that does not exist", _stream([_task({"type": "bundled", "dataset": "imdb"})]), "unknown bundled dataset 'imdb'"),
    ("data-missing", "data file does not exist", _stream([_task({"type": "file", "path": "absent.jsonl"})]), "absent.jsonl: file not found"),
    ("data-bad-json", "data file with a broken line", _stream([_task({"type": "file", "path": "d.jsonl"})], data=("d.jsonl", JSONL + b"not json\n")),
     "d.jsonl:2: not valid JSON"),
    ("data-not-utf8", "data file that is not UTF-8", _stream([_task({"type": "file", "path": "d.jsonl"})], data=("d.jsonl", b'{"text": "caf\xe9", "label": "a"}\n')),
     "d.jsonl:1: not UTF-8 text"),
    ("data-no-text", "records without the text field", _stream([_task({"type": "file", "path": "d.jsonl"})], data=("d.jsonl", b'{"body": "x", "label": "a"}\n')),
     "record 0 has no field 'text'"),
    ("model-missing", "model folder does not exist", lambda tmp: ["plan", str(_config(tmp)), "--set", f"model.name={tmp / 'gone'}"], "does not exist"),
    ("model-no-config", "model folder without config.json", _model_folder(None), "is not a transformers model folder: config.json missing"),
    ("model-not-causal", "model of the wrong architecture", _model_folder({"model_type": "bert", "architectures": ["BertModel"]}),
     "has architecture BertModel, which is not a causal language model"),
    ("model-hub-id", "hub id while downloads are off", _with_config("--set", "model.name=HuggingFaceTB/SmolLM2-135M"), "is neither a bundled model"),
    ("model-dtype", "dtype that is not supported", _with_config("--set", "model.dtype=float16"), "model.dtype: Input should be 'auto', 'float32' or 'bfloat16'"),
    ("mlflow-folder", "MLflow sqlite store in a folder that does not exist",
     lambda tmp: ["run", str(_config(tmp)), "--set", f"tracking.uri=sqlite:///{tmp}/no/such/mlflow.db"], "is not usable: its folder"),
    ("mlflow-unreachable", "MLflow server that does not answer", _with_config("--set", "tracking.uri=http://127.0.0.1:9", command="run"),
     "MLflow tracking server http://127.0.0.1:9 is not reachable"),
    ("output-dir-scheme", "output_dir with a scheme pyarrow does not open", _with_config("--set", "output_dir=ftp://host/runs"),
     "output_dir: ftp://host/runs: ftp:// is not a filesystem pyarrow opens"),
    ("output-dir-object-store-sqlite", "output_dir in object storage with the default (sqlite) MLflow store",
     _with_config("--set", "output_dir=s3://bucket/runs"), "tracking.uri: output_dir s3://bucket/runs is object storage"),
    ("output-dir-file", "output_dir that is a file", lambda tmp: (tmp / "afile").write_text("x") and ["run", str(_config(tmp)), "--set", f"output_dir={tmp / 'afile'}"],
     "output_dir: cannot write the run folder"),
    ("run-folder-other-chain", "run folder holding another chain",
     _run_folder(json.dumps({"fingerprint": "0" * 16, "task_names": ["amazon", "bbc", "yahoo"], "tasks": []})), "holds a chain with different settings"),
    ("manifest-corrupt", "run folder with a corrupt manifest", _run_folder('{"fingerprint": '), "is not a readable chain manifest"),
    ("space-slots-rank", "search space with N not dividing r", _space("params: {strategy.procl.num_slots: {choice: [2, 3]}}"),
     "strategy.procl.num_slots=3 would not be a valid run config"),
    ("space-unknown-key", "search space naming an unknown setting", _space("params: {strategy.procl.slots: {choice: [2]}}"),
     "strategy.procl.slots: Extra inputs are not permitted"),
    ("space-bad-range", "search space range with low >= high", _space("params: {training.lr: {loguniform: [0.01, 0.001]}}"),
     "expected [low, high] with low < high"),
    ("tune-no-trials", "a sweep of zero trials", _space("params: {training.lr: {choice: [0.001]}}", "--trials", "0"), "--trials: expected at least 1"),
]


@pytest.mark.parametrize(("case", "what", "setup", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly_before_anything_starts(case, what, setup, expected, tmp_path, capsys):
    argv = setup(tmp_path)
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and expected in error, error
    assert len(error.splitlines()) == 1, "one line, no traceback"
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists() and not (tmp_path / "runs" / "sweeps").exists()
    shown = " ".join(a.replace(str(tmp_path), "<tmp>") for a in argv[:1] + argv[2:]) or argv[0]
    MEASURED[case] = (what, shown, error.removeprefix("error: ").replace(str(tmp_path), "<tmp>"))


def test_a_data_file_error_is_one_line_in_a_process_of_its_own(tmp_path):
    # Ray Data logs a failed read with its traceback on the console before raising it, through a handler set up
    # once per process; in the cases above that process is pytest's, whose captured stderr the handler misses
    _case, _what, setup, expected = next(c for c in CASES if c[0] == "data-bad-json")
    result = subprocess.run([sys.executable, "-m", "pipeline", *setup(tmp_path)], capture_output=True, text=True, timeout=300,
                            cwd=DOCS.parents[1], env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


def render_table() -> str:
    lines = ["| # | bad input | command (CONFIG omitted) | message |", "|---|---|---|---|"]
    for number, (case, *_rest) in enumerate(CASES, start=1):
        what, shown, message = MEASURED[case]
        message = message if len(message) <= 240 else message[:237] + "..."
        cell = lambda text: text.replace("|", "\\|")  # noqa: E731
        lines.append(f"| {number} | {what} | `{cell(shown)}` | {cell(message)} |")
    return "\n".join(lines) + "\n"


def test_the_docs_table_lists_every_case_with_its_message():
    if len(MEASURED) != len(CASES):
        pytest.skip("needs every case above to have run in this session")
    table = render_table()
    if os.environ.get("PROCL_WRITE_DOCS") == "1":
        text = DOCS.read_text()
        start, end = text.index("<!-- bad-input -->") + len("<!-- bad-input -->\n"), text.index("<!-- /bad-input -->")
        DOCS.write_text(text[:start] + table + text[end:])
    assert table in DOCS.read_text(), f"docs/RELIABILITY.md is out of date; measured:\n{table}"

"""Every strategy x DeepSpeed ZeRO stage 0-3 (x optimizer offload) on 2 gloo ranks, with the pipeline's
own DeepSpeed config (`pipeline.runtime.deepspeed_config`): two tasks trained through the strategy
hooks (consolidation included), the optimizer's partition saved and loaded back as an in-task checkpoint
does, the state saved, and the export reloaded in vanilla peft reproducing the
model. The outcome of each cell is the table in docs/ZERO_COMPAT.md; the test fails if the docs disagree
with what it measured. Regenerate it with `PROCL_WRITE_DOCS=1 .venv/bin/python -m pytest tests/test_zero_compat.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import batch, init_deepspeed_gloo, rank_env, spawn_ranks, tiny_llama
from peft import PeftModel

from pipeline.config import ConfigError, load_config
from pipeline.scoring import attach_strategy
from pipeline.runtime import base_optimizer, deepspeed_config, load_optimizer_state, read_optimizer_state, save_optimizer_state
from procl import make_strategy
from procl.checkpoint import load_strategy_state, read_state, save_strategy_state
from procl.strategies import STRATEGIES

DOCS = Path(__file__).resolve().parents[1] / "docs" / "ZERO_COMPAT.md"
CELLS = [(0, False), (1, False), (1, True), (2, False), (2, True), (3, False), (3, True)]
TASKS, STEPS = 2, 2


def _config(name: str, stage: int, offload: bool):
    return load_config(None, [f"strategy.name={name}", "strategy.lora.r=4", "strategy.procl.num_slots=2",
                              "training.batch_size=4", "training.lr=0.01",
                              f"deepspeed.zero_stage={stage}", f"deepspeed.offload_optimizer={str(offload).lower()}"]).on_device("cpu")


def _train_cell(rank: int, name: str, stage: int, offload: bool, state_dir: Path) -> None:
    """Two tasks as the pipeline's workers train them: one base model for both, each task's adapters attached
    at the previous task's saved state, trained, saved, scored on the same model and detached again."""
    import deepspeed

    config = _config(name, stage, offload)
    base_model = tiny_llama()
    for task in range(TASKS):
        model, strategy = attach_strategy(config, base_model, read_state(state_dir) if task > 0 else None)
        strategy.before_task(model, task)
        optimizer = torch.optim.AdamW(strategy.param_groups(model, config.training.lr), lr=config.training.lr)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config))
        engine.train()
        for step in range(STEPS):
            ids = batch(seed=100 * task + 10 * rank + step)
            loss = engine(input_ids=ids, labels=ids).loss
            extra = strategy.extra_loss(model)
            engine.backward(loss if extra is None else loss + extra)
            engine.step()
            strategy.after_optimizer_step(model, engine)
        _check_optimizer_roundtrip(engine, state_dir.parent / f"optimizer-task{task}", rank)
        strategy.after_task(model, task, [f"example-{task}-{i}" for i in range(8)], engine)
        save_strategy_state(strategy, model, state_dir)
        engine.destroy()
        with torch.inference_mode():  # scored on the same model, as the workers do
            assert torch.isfinite(model.eval()(input_ids=batch(5)).logits).all()
        base_model = model.unload()
    assert not any("lora_" in n for n, _ in base_model.named_parameters()), "the adapters stayed on the base model"


def _check_optimizer_roundtrip(engine, folder: Path, rank: int) -> None:
    """An in-task checkpoint's optimizer partition: saved, the live moments wiped, loaded back exactly."""
    save_optimizer_state(engine, folder, rank)
    state = base_optimizer(engine).state
    expected = {id(tensor): {k: v.clone() for k, v in entry.items()} for tensor, entry in state.items()}
    assert any(entry["exp_avg"].abs().sum() > 0 for entry in expected.values()), "no moments to save: nothing was trained"
    for entry in state.values():
        entry["exp_avg"].zero_()
        entry["exp_avg_sq"].zero_()
    load_optimizer_state(engine, read_optimizer_state(folder, rank))
    assert {id(tensor) for tensor in state} == set(expected)
    for tensor, entry in state.items():
        for name, value in expected[id(tensor)].items():
            torch.testing.assert_close(entry[name], value, rtol=0, atol=0)


def _check_export(name: str, state_dir: Path, out: Path) -> None:
    config = _config(name, 0, False)
    strategy = make_strategy(name, seed=0, **config.strategy.options())
    model = strategy.build(tiny_llama())
    load_strategy_state(strategy, model, state_dir)
    ids = batch(5)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        merged = PeftModel.from_pretrained(tiny_llama(), str(strategy.export(model, out))).merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(rank_env(rank, 2, port))
    init_deepspeed_gloo()
    outcomes = {}
    for name in sorted(STRATEGIES):
        for stage, offload in CELLS:
            cell = Path(out_dir) / f"{name}-z{stage}{'-offload' if offload else ''}"
            try:
                _train_cell(rank, name, stage, offload, cell / f"rank{rank}")
                if rank == 0:
                    _check_export(name, cell / "rank0", cell / "adapter")
                outcome = "trains, consolidates, exports"
            except ConfigError as error:  # refused by the run config before anything starts
                outcome = f"refused: {str(error).split(': ', 1)[1]}"
            except Exception as error:  # a cell's failure is its outcome; both ranks fail alike at initialize
                outcome = f"fails: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"
            outcomes[f"{name} z{stage}{' offload' if offload else ''}"] = outcome
    if rank == 0:
        Path(out_dir, "outcomes.json").write_text(json.dumps(outcomes, indent=1))



def render_table(outcomes: dict[str, str]) -> str:
    header = ["strategy"] + [f"ZeRO-{stage}{' + offload' if offload else ''}" for stage, offload in CELLS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for name in sorted(STRATEGIES):
        row = [name]
        for stage, offload in CELLS:
            outcome = outcomes[f"{name} z{stage}{' offload' if offload else ''}"]
            if outcome.startswith("trains"):
                row.append("ok")
            else:
                notes.append(f"{len(notes) + 1}. {name}, ZeRO-{stage}{' + offload' if offload else ''}: {outcome}")
                row.append(f"{outcome.split(':')[0]} ({len(notes)})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def test_every_strategy_under_every_zero_stage(tmp_path):
    spawn_ranks(_worker, str(tmp_path))
    outcomes = json.loads((tmp_path / "outcomes.json").read_text())
    table = render_table(outcomes)
    if os.environ.get("PROCL_WRITE_DOCS") == "1":
        text = DOCS.read_text()
        start = text.index("<!-- table -->") + len("<!-- table -->\n")
        end = text.index("<!-- /table -->")
        DOCS.write_text(text[:start] + table + text[end:])
    assert table in DOCS.read_text(), f"docs/ZERO_COMPAT.md is out of date; measured:\n{table}"
    failing = {cell: outcome for cell, outcome in outcomes.items() if outcome.startswith("fails")}
    assert not failing, failing
    refused = sorted(cell for cell, outcome in outcomes.items() if outcome.startswith("refused"))
    assert refused == ["l2_prev z3", "l2_prev z3 offload", "n_lora z3", "n_lora z3 offload", "o_lora z3", "o_lora z3 offload"]


def test_offload_without_zero_is_refused_before_training():
    with pytest.raises(ConfigError, match="offload_optimizer needs deepspeed.zero_stage >= 1"):
        _config("procl", 0, True)

"""Strategy state and adapter folders are written atomically and verified on load."""

import pytest
from conftest import run_task, tiny_llama

from procl import LoraSettings, make_strategy
from procl.atomic import atomic_directory
from procl.checkpoint import META_FILE, TENSORS_FILE, load_strategy_state, save_strategy_state


def trained_seq_lora():
    strategy = make_strategy("seq_lora", lora=LoraSettings(r=4))
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0, steps=1)
    return strategy, model


def test_a_failed_write_leaves_the_previous_folder_intact(tmp_path):
    target = tmp_path / "state"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(target) as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no staging debris


def test_a_truncated_tensor_file_is_detected_not_loaded(tmp_path):
    strategy, model = trained_seq_lora()
    save_strategy_state(strategy, model, tmp_path / "state")
    tensors = tmp_path / "state" / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:-10])
    fresh_strategy = make_strategy("seq_lora", lora=LoraSettings(r=4))
    with pytest.raises(ValueError, match="does not match the sha256 recorded in strategy_meta.json: truncated or altered"):
        load_strategy_state(fresh_strategy, fresh_strategy.build(tiny_llama()), tmp_path / "state")


def test_a_missing_file_is_named(tmp_path):
    strategy, model = trained_seq_lora()
    save_strategy_state(strategy, model, tmp_path / "state")
    (tmp_path / "state" / META_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="strategy_meta.json is missing"):
        load_strategy_state(strategy, strategy.build(tiny_llama()), tmp_path / "state")

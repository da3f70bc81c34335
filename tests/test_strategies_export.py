"""Every strategy trains through the hooks, exports a plain peft adapter, and survives a state round trip."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import batch, run_task, tiny_llama, train_steps
from peft import PeftModel
from safetensors.torch import load_file

from procl import LoraSettings, ProCLConfig, make_strategy
from procl import model as memory
from procl.checkpoint import load_strategy_state, save_strategy_state

LORA = LoraSettings(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
BASELINES = ["seq_lora", "inc_lora", "o_lora", "n_lora", "l2_prev", "replay", "multitask"]
PROCL_ROUTINGS = ["procl", "procl-budgeted", "procl-fixed"]  # procl-<routing>: ProCL with that routing


def strategy_named(name: str, **procl_options):
    if name.startswith("procl"):
        if "-" in name:
            procl_options["routing"] = name.split("-", 1)[1]
        return make_strategy("procl", lora=LORA, seed=0, procl=ProCLConfig(**procl_options))
    return make_strategy(name, lora=LORA, seed=0)


def merged_logits_from_export(directory, ids) -> torch.Tensor:
    base = tiny_llama()
    merged = PeftModel.from_pretrained(base, str(directory)).merge_and_unload()
    with torch.no_grad():
        return merged(input_ids=ids).logits


@pytest.mark.parametrize("name", BASELINES + PROCL_ROUTINGS)
def test_strategy_trains_and_exports_a_plain_lora_equal_to_its_eval_model(name, tmp_path):
    strategy = strategy_named(name)
    model = strategy.build(tiny_llama())
    losses = [run_task(model, strategy, t, steps=3) for t in range(3)]
    assert all(torch.isfinite(torch.tensor(loss)).all() for loss in losses)
    ids = batch(123)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    out = strategy.export(model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert keys and all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    torch.testing.assert_close(merged_logits_from_export(out, ids), expected, rtol=1e-5, atol=1e-5)
    # the model itself is left as it was (inc_lora's temporary concatenated adapter is gone)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_inc_lora_exports_one_concatenated_lora_with_grown_rank(tmp_path):
    strategy = strategy_named("inc_lora")
    model = strategy.build(tiny_llama())
    for t in range(3):
        run_task(model, strategy, t, steps=2)
    config = json.loads((strategy.export(model, tmp_path / "a") / "adapter_config.json").read_text())
    assert config["r"] == 3 * LORA.r


def test_inc_lora_trains_only_the_newest_adapter():
    strategy = strategy_named("inc_lora")
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0, steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".task_0." in k}
    run_task(model, strategy, 1, steps=3)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.active_adapters == ["task_0", "task_1"]


def test_o_lora_penalty_is_lambda1_sum_abs_a_new_a_old():
    strategy = make_strategy("o_lora", lora=LORA, seed=0, lambda1=0.5)
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0, steps=1)
    strategy.before_task(model, 1)
    expected = 0.0
    for _, layer in memory.lora_layers(model, "task_1"):
        expected += (layer.lora_A["task_1"].weight @ layer.lora_A["task_0"].weight.T).abs().sum().item()
    assert strategy.extra_loss(model).item() == pytest.approx(0.5 * expected, rel=1e-5)


def test_n_lora_penalty_is_l1_weight_sum_abs_of_the_new_tasks_update():
    strategy = make_strategy("n_lora", lora=LORA, seed=0, l1_weight=0.25)
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0, steps=1)
    run_task(model, strategy, 1, steps=2)  # B of task_1 is no longer 0
    strategy.before_task(model, 1)
    expected = 0.0
    for _, layer in memory.lora_layers(model, "task_1"):
        update = layer.get_delta_weight("task_1")  # peft's own scaling * B A
        assert torch.count_nonzero(update) > 0
        expected += update.abs().sum().item()
    assert strategy.extra_loss(model).item() == pytest.approx(0.25 * expected, rel=1e-5)


def test_l2_prev_pulls_toward_where_the_previous_task_left_the_factors(tmp_path):
    strategy = make_strategy("l2_prev", lora=LORA, seed=0, l2_weight=0.5)
    model = strategy.build(tiny_llama())
    strategy.before_task(model, 0)
    assert strategy.extra_loss(model) is None  # the first task trains unpulled
    run_task(model, strategy, 0, steps=2)
    previous = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    strategy.before_task(model, 1)
    assert strategy.extra_loss(model).item() == 0.0
    train_steps(model, strategy, 3, seed=11)
    drift = sum((p.detach() - previous[name]).pow(2).sum().item() for name, p in model.named_parameters() if name in previous)
    assert drift > 0 and strategy.extra_loss(model).item() == pytest.approx(0.5 * drift, rel=1e-5)

    save_strategy_state(strategy, model, tmp_path / "state")  # mid-task: the anchor survives a restart
    restored = make_strategy("l2_prev", lora=LORA, seed=0, l2_weight=0.5)
    fresh = restored.build(tiny_llama())
    load_strategy_state(restored, fresh, tmp_path / "state")
    assert restored.extra_loss(fresh).item() == pytest.approx(0.5 * drift, rel=1e-5)

    def drift_after_task(weight: float) -> float:
        pulled = make_strategy("l2_prev", lora=LORA, seed=0, l2_weight=weight)
        trained = pulled.build(tiny_llama())
        run_task(trained, pulled, 0, steps=2)
        start = {name: p.detach().clone() for name, p in trained.named_parameters() if p.requires_grad}
        run_task(trained, pulled, 1, steps=4)
        return sum((p.detach() - start[name]).pow(2).sum().item() for name, p in trained.named_parameters() if name in start)

    assert drift_after_task(50.0) < 0.5 * drift_after_task(0.0)


def test_replay_mixes_a_seeded_buffer_of_earlier_examples():
    strategy = make_strategy("replay", lora=LORA, seed=3, buffer_per_task=2)
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0, steps=1)
    mixed = strategy.training_examples(1, ["new-a", "new-b"])
    assert len(mixed) == 4 and {"new-a", "new-b"} <= set(mixed)
    assert all(m.startswith("example-0-") for m in set(mixed) - {"new-a", "new-b"})


def test_multitask_restarts_from_a_fresh_lora_on_all_seen_examples():
    strategy = strategy_named("multitask")
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0, steps=2)
    strategy.before_task(model, 1)
    for _, layer in memory.lora_layers(model):
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # B = 0: a fresh LoRA
    assert len(strategy.training_examples(1, ["x"])) == 9


@pytest.mark.parametrize("name", ["replay", "multitask"])
def test_a_driver_plans_the_same_examples_without_a_model_as_training_produces(name):
    """The chain plans every task's examples before training (remember, no model); the workers' after_task
    must leave the same data state, or a task would train on other examples than it was planned with."""
    trained, planned = make_strategy(name, lora=LORA, seed=5), make_strategy(name, lora=LORA, seed=5)
    model = trained.build(tiny_llama())
    for task in range(3):
        own = [f"example-{task}-{i}" for i in range(8)]
        expected, got = trained.training_examples(task, own), planned.training_examples(task, own)
        assert got == expected
        trained.before_task(model, task)
        trained.after_task(model, task, expected)
        planned.remember(task, got)


def test_procl_reference_mlp_refuses_export_clearly(tmp_path):
    strategy = strategy_named("procl", formulation="reference", reference_mlp=True)
    model = strategy.build(tiny_llama())
    for t in range(2):
        run_task(model, strategy, t, steps=2)
    with pytest.raises(ValueError, match="reference_mlp=True.*not a plain LoRA"):
        strategy.export(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_procl_reference_without_mlp_exports(tmp_path):
    strategy = strategy_named("procl", formulation="reference")
    model = strategy.build(tiny_llama())
    for t in range(2):
        run_task(model, strategy, t, steps=2)
    ids = batch(1)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    torch.testing.assert_close(merged_logits_from_export(strategy.export(model, tmp_path / "a"), ids), expected, rtol=1e-5, atol=1e-5)


def test_exported_procl_adapter_loads_in_vanilla_peft_without_procl(tmp_path):
    """The no-extra-inference-cost claim, end to end: another process that never imports procl."""
    strategy = strategy_named("procl")
    model = strategy.build(tiny_llama())
    for t in range(3):
        run_task(model, strategy, t, steps=4)
    ids = batch(77)
    with torch.no_grad():
        torch.save(model.eval()(input_ids=ids).logits, tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    tiny_llama().save_pretrained(tmp_path / "base")
    strategy.export(model, tmp_path / "adapter")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})
        merged = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).merge_and_unload()
        assert type(merged).__name__ == "LlamaForCausalLM"
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        with torch.no_grad():
            got = merged(input_ids=ids).logits
        torch.testing.assert_close(got, torch.load({str(tmp_path / 'expected.pt')!r}), rtol=1e-5, atol=1e-5)
        assert not any(m == "procl" or m.startswith("procl.") for m in sys.modules), "procl was imported"
        print("vanilla-peft-ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vanilla-peft-ok" in result.stdout


@pytest.mark.parametrize("name", BASELINES + PROCL_ROUTINGS)
def test_state_round_trip_between_tasks_and_mid_task(name, tmp_path):
    strategy = strategy_named(name)
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0, steps=2)
    run_task(model, strategy, 1, steps=2)
    strategy.before_task(model, 2)  # mid-task: procl has program memory attached here
    save_strategy_state(strategy, model, tmp_path / "state")
    ids = batch(9)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    restored = strategy_named(name)
    fresh = restored.build(tiny_llama(seed=0))
    load_strategy_state(restored, fresh, tmp_path / "state")
    assert restored.task_index == 2 and restored.in_task
    assert memory.is_attached(fresh) == name.startswith("procl")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, expected, rtol=0, atol=0)
        if name.startswith("procl"):  # the routing too: the same rho for the same input (fixed: the same top slots)
            torch.testing.assert_close(fresh.train()(input_ids=ids).logits, model.train()(input_ids=ids).logits, rtol=0, atol=0)
    assert sorted(restored.state(fresh)[0]) == sorted(strategy.state(model)[0])


def test_state_of_another_strategy_is_refused(tmp_path):
    strategy = strategy_named("seq_lora")
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0, steps=1)
    save_strategy_state(strategy, model, tmp_path / "state")
    other = strategy_named("procl")
    with pytest.raises(ValueError, match="written by strategy 'seq_lora', not 'procl'"):
        load_strategy_state(other, other.build(tiny_llama()), tmp_path / "state")

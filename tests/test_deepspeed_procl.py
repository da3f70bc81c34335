"""ProCL through real DeepSpeed engines on 2 gloo ranks with different data (ZeRO-2 fp32, ZeRO-3 bf16).

Each task runs as the pipeline's workers will: build a fresh model, restore the previous task's
state, attach program memory, `deepspeed.initialize`, train with consolidation after every step,
fold/detach, save the state. Both ranks must end with identical adapters, equal (in fp32) to one process
training on both ranks' batches, and the saved state must export to a plain peft adapter that
reproduces the model.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import batch, init_deepspeed_gloo, one_process_procl_chain, rank_batch, rank_env, spawn_ranks, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file

from procl import LoraSettings, ProCLConfig, make_strategy
from procl import model as memory
from procl.checkpoint import TENSORS_FILE, load_strategy_state, save_strategy_state

TASKS, STEPS, CLIP = 3, 5, 1.0



def _new_strategy(procl: ProCLConfig):
    return make_strategy("procl", lora=LoraSettings(r=8), seed=0, procl=procl)


def _worker(rank: int, port: int, out_dir: str, stage: int, bf16: bool, procl: ProCLConfig) -> None:
    os.environ.update(rank_env(rank, 2, port))
    deepspeed = init_deepspeed_gloo()
    state_dir = os.path.join(out_dir, f"rank{rank}")
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": CLIP,
    }
    for task in range(TASKS):
        strategy = _new_strategy(procl)
        model = strategy.build(tiny_llama())
        if task > 0:
            load_strategy_state(strategy, model, state_dir)
        torch.manual_seed(task)  # the routers' initialisation, as in one_process_procl_chain
        strategy.before_task(model, task)
        assert memory.is_attached(model) == (task > 0 or procl.routes_first_task)
        optimizer = torch.optim.AdamW(strategy.param_groups(model, 1e-2), weight_decay=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        engine.train()
        for step in range(STEPS):
            ids = rank_batch(task, rank, step)
            loss = engine(input_ids=ids, labels=ids).loss
            extra = strategy.extra_loss(model)
            engine.backward(loss if extra is None else loss + extra)
            engine.step()
            strategy.after_optimizer_step(model, engine)
        strategy.after_task(model, task, [], engine)
        save_strategy_state(strategy, model, state_dir)
        engine.destroy()


@pytest.mark.parametrize(
    "stage, bf16, formulation, routing",
    [
        (2, False, "residual", "learned"),
        (3, True, "residual", "learned"),
        (3, False, "reference", "learned"),
        (2, False, "residual", "budgeted"),
        (3, True, "residual", "fixed"),
    ],
)
def test_procl_chain_under_deepspeed_zero_keeps_ranks_identical_and_exports(stage, bf16, formulation, routing, tmp_path):
    procl = ProCLConfig(formulation=formulation, routing=routing)
    spawn_ranks(_worker, str(tmp_path), stage, bf16, procl)
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}" / TENSORS_FILE)) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
    if formulation == "residual" and not bf16:  # per-example routing in fp32: one process computes the same
        expected = one_process_procl_chain(procl, TASKS, STEPS, clip=CLIP)
        lora = [k for k in rank0 if k in expected]
        assert len(lora) == len(expected)
        for key in lora:
            torch.testing.assert_close(rank0[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)

    strategy = _new_strategy(procl)
    model = strategy.build(tiny_llama())
    untrained = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    load_strategy_state(strategy, model, tmp_path / "rank0")
    assert strategy.task_index == TASKS - 1 and not strategy.in_task
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in untrained.items())  # it trained
    ids = batch(5)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        exported = PeftModel.from_pretrained(tiny_llama(), str(strategy.export(model, tmp_path / "adapter")))
        torch.testing.assert_close(exported.merge_and_unload()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

"""procl.distributed against real DeepSpeed engines (ZeRO 0-3, fp32 and bf16) and real gloo worlds.

The trap these guard against: DeepSpeed keeps an fp32 master copy and copies it over the model's
parameters after each step, so a write that reaches only `param.data` is silently undone.

The single-rank DeepSpeed tests share one gloo world of one (DeepSpeed caches its process groups,
so it is created once for the module and destroyed at its end). Two-rank worlds run in spawned
processes that destroy their group before exiting.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import free_port, init_deepspeed_gloo, rank_env, spawn_ranks
from torch import nn

from procl.distributed import all_reduce_mean, is_distributed, lerp_full, read_full, write_full

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported




# ---------------------------------------------------------------------------------------------
# all_reduce_mean / is_distributed in a real 2-process gloo world


def _all_reduce_worker(rank: int, port: int, out_dir: str) -> None:
    # A fresh spawned process: no process group yet.
    assert not is_distributed()
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(all_reduce_mean(x), x)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        assert is_distributed()
        local = torch.tensor([rank + 1.0, 10.0 * rank, -4.0 * rank])  # [1, 0, 0] and [2, 10, -4]
        mean = all_reduce_mean(local)
        assert torch.equal(local, torch.tensor([rank + 1.0, 10.0 * rank, -4.0 * rank])), "input changed"
        assert torch.equal(mean, torch.tensor([1.5, 5.0, -2.0])), mean
        # low precision (gloo cannot reduce bf16 itself) and integers
        mean_bf16 = all_reduce_mean(local.to(torch.bfloat16))
        assert mean_bf16.dtype == torch.bfloat16 and torch.equal(mean_bf16.float(), mean)
        mean_int = all_reduce_mean(torch.tensor([rank, 3 * rank]))
        assert mean_int.dtype == torch.float32 and torch.equal(mean_int, torch.tensor([0.5, 1.5]))
        torch.save({"mean": mean, "mean_bf16": mean_bf16}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_mean_two_gloo_ranks(tmp_path: Path) -> None:
    spawn_ranks(_all_reduce_worker, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ("mean", "mean_bf16"):
        assert torch.equal(results[0][key], results[1][key]), key


def test_not_distributed_in_this_process() -> None:
    # pytest's own process is either uninitialised or (during the DeepSpeed tests) a world of one.
    assert not is_distributed()
    x = torch.arange(4.0)
    mean = all_reduce_mean(x)
    assert torch.equal(mean, x) and mean is not x


# ---------------------------------------------------------------------------------------------
# read_full / write_full under DeepSpeed


@pytest.fixture(scope="module")
def single_rank_world():
    assert not dist.is_initialized(), "another test left a process group behind"
    with pytest.MonkeyPatch.context() as patch:  # deepspeed.initialize insists on LOCAL_RANK
        for key, value in rank_env(0, 1, free_port()).items():
            patch.setenv(key, value)
        deepspeed = init_deepspeed_gloo()
        try:
            yield deepspeed
        finally:
            gc.unfreeze()
            dist.destroy_process_group()


class Tiny(nn.Module):
    # 33 and 7 make fc2.weight's 231 elements split unevenly over 2 ranks (ZeRO-3 pads a shard).
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 33)
        self.fc2 = nn.Linear(33, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _reference(x: torch.Tensor, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Tiny's forward in plain torch from full fp32 tensors, in the engine's compute dtype."""
    w = {k: v.to(dtype) for k, v in weights.items()}
    hidden = torch.relu(F.linear(x, w["fc1.weight"], w["fc1.bias"]))
    return F.linear(hidden, w["fc2.weight"], w["fc2.bias"]).float()


# (stage, bf16, extra config, DeepSpeed optimizer wrapper this combination really gets)
NO_PERSIST = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
CASES = [
    (0, False, {}, "AdamW"),  # the plain client optimizer
    (0, True, {}, "FP16_UnfusedOptimizer"),  # bf16 masters not linked to the params
    (1, False, {}, "DeepSpeedZeroOptimizer"),
    (1, True, {}, "DeepSpeedZeroOptimizer"),
    (1, True, {"data_types": {"grad_accum_dtype": "fp32"}}, "BF16_Optimizer"),
    (2, False, {}, "DeepSpeedZeroOptimizer"),
    (2, True, {}, "DeepSpeedZeroOptimizer"),
    (3, False, {}, "DeepSpeedZeroOptimizer_Stage3"),  # tiny params stay gathered ("persistent")
    (3, True, {}, "DeepSpeedZeroOptimizer_Stage3"),
    (3, False, NO_PERSIST, "DeepSpeedZeroOptimizer_Stage3"),  # gathered only around each use
    (3, True, NO_PERSIST, "DeepSpeedZeroOptimizer_Stage3"),
]
FREEZE = ["no", "after_init", "at_init"]


def _case_id(case: tuple) -> str:
    stage, bf16, extra, wrapper = case
    suffix = "-no_persist" if extra is NO_PERSIST else ""
    return f"zero{stage}-{'bf16' if bf16 else 'fp32'}-{wrapper}{suffix}"


def _check_write_survives_forward_and_step(deepspeed, case: tuple, freeze: str) -> None:
    """Train a step, write_full fc2.weight, then check read_full, a forward and the next step.

    freeze: "no"; "after_init" (requires_grad turned off after the engine was built, so DeepSpeed
    still holds a master that each step copies back); "at_init" (never given to the optimizer).
    """
    stage, bf16, extra, wrapper = case
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)  # the same model and data on every rank
    model = Tiny()
    # fc2.weight is the parameter we overwrite; lr=0 so a correct step leaves it exactly alone,
    # while a step that restores a stale master copy shows up.
    others = [p for n, p in model.named_parameters() if n != "fc2.weight"]
    groups = [{"params": others, "lr": 1e-2}]
    if freeze == "at_init":
        model.fc2.weight.requires_grad_(False)
    else:
        groups.append({"params": [model.fc2.weight], "lr": 0.0, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    config: dict = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
    }
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    assert type(engine.optimizer).__name__ == wrapper
    # ZeRO-0 with bf16 keeps masters that only the engine knows about.
    kw = {"engine": engine} if stage == 0 and bf16 else {}
    target = model.fc2.weight
    x = torch.randn(4, 16).to(dtype)

    def train_step() -> None:
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()

    train_step()  # masters and model copies now exist and have been synced once
    if freeze == "after_init":
        target.requires_grad_(False)
    before = {n: read_full(p, **kw) for n, p in model.named_parameters()}
    assert before["fc2.weight"].shape == (7, 33)
    if bf16 and stage < 3:  # (a ZeRO-3 param.data is empty outside a gather)
        # the fp32 master, not the bf16 model copy
        assert not torch.equal(before["fc1.weight"], model.fc1.weight.data.float())
    for name, p in model.named_parameters():
        # Passing the engine, or its optimizer, gives the same (it is only needed for ZeRO-0 bf16).
        assert torch.equal(read_full(p, engine=engine), before[name])
        assert torch.equal(read_full(p, engine=engine.optimizer), before[name])

    # exactly representable in bf16, and far from the initial values
    v = ((torch.arange(7 * 33, dtype=torch.float32) % 7) - 3).reshape(7, 33) / 8
    write_full(target, v, **kw)
    got = read_full(target, **kw)
    assert got.dtype == torch.float32 and got.shape == v.shape
    assert torch.equal(got, v)

    # The forward sees v (and only v changed).
    tol = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-5}
    expected = _reference(x, {**before, "fc2.weight": v}, dtype)
    stale = _reference(x, before, dtype)
    assert not torch.allclose(expected, stale, **tol), "test cannot tell v from the old value"
    with torch.no_grad():
        out = engine(x).float()
    torch.testing.assert_close(out, expected, **tol)

    # A step must neither revert fc2.weight to the old master nor skip the other parameters.
    train_step()
    after = {n: read_full(p, **kw) for n, p in model.named_parameters()}
    assert torch.equal(after["fc2.weight"], v), (after["fc2.weight"] - v).abs().max()
    assert not torch.equal(after["fc1.weight"], before["fc1.weight"]), "the step did not update fc1"
    with torch.no_grad():
        out = engine(x).float()
    torch.testing.assert_close(out, _reference(x, after, dtype), **tol)

    # lerp_full: an elementwise pull toward `end` (halfway to 0: exact in bf16 too) on the master and the model copy;
    # under ZeRO-1/2 each rank updates its own part of the masters, and one all-reduce (none in a world of one)
    # shares them, for any number of parameters (here fc2.weight twice: W/4)
    pull = (target, torch.zeros(7, 33), torch.full((7, 1), 0.5))
    with _counting_collectives() as collectives:
        lerp_full([pull, pull], **kw)
    if stage in (1, 2) and freeze != "at_init":
        assert collectives == (["all_reduce"] if is_distributed() else []), collectives
    elif stage == 3 and freeze != "at_init":  # one all-gather, on every rank whatever it holds gathered
        assert collectives == (["all_gather_into_tensor"] if is_distributed() else []), collectives
    if stage == 3 and freeze == "no":  # the model's shard, which a later gather reads, is cast from the master's shard
        from deepspeed.utils import safe_get_local_fp32_param

        assert torch.equal(target.ds_tensor, safe_get_local_fp32_param(target).to(target.ds_tensor.dtype))
    quartered = after["fc2.weight"] / 4
    assert torch.equal(read_full(target, **kw), quartered)
    with torch.no_grad():
        out = engine(x).float()
    torch.testing.assert_close(out, _reference(x, {**after, "fc2.weight": quartered}, dtype), **tol)
    train_step()  # lr 0: the step keeps the pulled value (a master left behind would restore the old one)
    assert torch.equal(read_full(target, **kw), quartered)


@contextmanager
def _counting_collectives() -> Iterator[list[str]]:
    """The torch.distributed collectives called inside (DeepSpeed's communication goes through them)."""
    calls: list[str] = []
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor")}

    def counting(name: str, original):
        def call(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        return call

    for name, original in originals.items():
        setattr(dist, name, counting(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


@pytest.mark.parametrize("freeze", FREEZE, ids=["trainable", "frozen_after_init", "frozen_at_init"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_write_full_survives_forward_and_step(single_rank_world, case: tuple, freeze: str) -> None:
    assert not is_distributed()  # a world of one
    _check_write_survives_forward_and_step(single_rank_world, case, freeze)


def _two_rank_deepspeed_worker(rank: int, port: int) -> None:
    os.environ.update(rank_env(rank, 2, port))
    deepspeed = init_deepspeed_gloo()
    try:
        assert is_distributed()
        # ZeRO-1/2 split fc2.weight's master between the ranks; ZeRO-3 pads its last shard.
        # (ZeRO-0 keeps whole copies on every rank: nothing new to see with two.)
        for case in [c for c in CASES if c[0] > 0]:
            for freeze in FREEZE if case[0] == 3 else ["no"]:
                _check_write_survives_forward_and_step(deepspeed, case, freeze)
    finally:
        dist.destroy_process_group()


def test_write_full_two_ranks() -> None:
    """The same checks with 2 DeepSpeed ranks, where masters and ZeRO-3 shards are really split."""
    spawn_ranks(_two_rank_deepspeed_worker)


def test_plain_parameter_round_trip() -> None:
    layer = nn.Linear(3, 2).to(torch.bfloat16)
    v = torch.full((2, 3), 0.25)
    write_full(layer.weight, v)
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight.data.float(), v)
    got = read_full(layer.weight)
    assert got.dtype == torch.float32 and torch.equal(got, v)
    got += 1  # a copy, not a view
    assert torch.equal(layer.weight.data.float(), v)
    with pytest.raises(ValueError, match="shape"):
        write_full(layer.weight, torch.zeros(3, 2))

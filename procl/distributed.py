"""Data-parallel helpers: a mean all-reduce, and whole-parameter reads/writes under DeepSpeed.

DeepSpeed keeps up to three copies of a trainable parameter: the tensor the forward reads
(`param.data`, or the ZeRO-3 shard `param.ds_tensor`), a full or partitioned fp32 master copy
that the optimizer updates, and the optimizer states. After every step the engine copies the
master back over the model copy, so writing only `param.data` is silently undone by the next
step. `read_full` / `write_full` go through the master copy and keep the model copy in sync; `lerp_full` updates
many parameters elementwise the same way, with one collective for all of them.

Only torch is imported here; deepspeed is imported inside the functions, and only for parameters
it manages or when an engine is passed, so `procl` and plain parameters need no deepspeed.

For a DeepSpeed-managed parameter both `read_full` and `write_full` are collective: every rank of
the parameter's data-parallel group must call them, in the same order, `write_full` with the
same value.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Mean of `tensor` over the ranks of `group` (default: all ranks) as a new tensor.

    The input is left untouched. Floating-point inputs keep their dtype; integer and bool inputs
    give float32 (a mean is rarely an integer). Without a multi-rank world this is a copy.
    """
    out_dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
    if not is_distributed():
        return tensor.detach().to(out_dtype, copy=True)
    # gloo cannot reduce bf16/fp16, and summing many low-precision values loses digits anyway.
    work_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    work = tensor.detach().to(work_dtype, copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    work /= dist.get_world_size(group)
    return work.to(out_dtype)


def read_full(param: torch.nn.Parameter, *, engine: Any = None) -> torch.Tensor:
    """A detached float32 copy of the whole parameter, as the optimizer sees it.

    Plain parameter: its data. ZeRO-3: the gathered fp32 master (or the gathered model copy when
    the optimizer holds no master for it, e.g. a frozen parameter). ZeRO-1/2 and BF16_Optimizer:
    the fp32 master. ZeRO-0 with fp16/bf16 (FP16_UnfusedOptimizer) links no master to the
    parameter, so pass `engine` (the DeepSpeed engine or its `.optimizer`) to read the master;
    without it you get the low-precision model copy.
    """
    if hasattr(param, "ds_id"):
        return _read_zero3(param)
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 or BF16_Optimizer: fragments of an fp32 master
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(param)  # all-reduces the ranks' fragments
        if master is not None:
            return _fp32_copy(master)
    master = _zero0_master(param, engine)
    return _fp32_copy(param.data if master is None else master)


def write_full(param: torch.nn.Parameter, value: torch.Tensor, *, engine: Any = None) -> None:
    """Set the whole parameter to `value` for the next forward and past the next optimizer step.

    `value` has the parameter's full (unpartitioned) shape. Under DeepSpeed every rank must call
    this with the same value. For ZeRO-0 with fp16/bf16 pass `engine` (see `read_full`): without
    it the fp32 master cannot be found from the parameter and the next step undoes the write.
    Optimizer states (e.g. Adam moments) are left as they are.
    """
    full_shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 params look empty outside a gather
    if tuple(value.shape) != tuple(full_shape):
        raise ValueError(f"value has shape {tuple(value.shape)}, the parameter {tuple(full_shape)}")
    value = value.detach()
    if hasattr(param, "ds_id"):
        _write_zero3(param, value)
        return
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 or BF16_Optimizer
        from deepspeed.utils import safe_set_full_fp32_param

        # Each rank writes the fragment of the master it owns (no communication).
        safe_set_full_fp32_param(param, value)
    else:
        master = _zero0_master(param, engine)
        if master is not None:
            master.data.copy_(value)
    # The model copy is whole on every rank here (ZeRO-1/2 partition only optimizer state).
    param.data.copy_(value)


@torch.no_grad()
def lerp_full(updates: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]], *, engine: Any = None) -> None:
    """For each (param, end, weight): param <- param + weight * (end - param), elementwise (`end` and `weight`
    broadcast to the whole parameter), on the master copy and the model copy, as `write_full(read_full(...))`
    would, but with one collective for all of them (per ZeRO kind) instead of one or two per parameter.

    Each rank pulls the part of each fp32 master it owns, and the model copies are cast from the masters, exactly
    as an optimizer step leaves them: under ZeRO-1/2 (and BF16_Optimizer) one all-reduce gives every rank every
    updated master; under ZeRO-3 a rank's model shard is cast from its master shard, and one all-gather refreshes
    the parameters a rank holds gathered. A float32 parameter that is its own master (plain, or ZeRO-0 in fp32) is
    updated in place. The rest (ZeRO-0 with a bf16/fp16 master, a ZeRO-3 parameter frozen when the engine was built,
    a plain low-precision parameter) go one by one through `read_full` and `write_full`, with their rules.
    Collective under DeepSpeed: every rank calls it with the same parameters in the same order.
    """
    fragmented = [update for update in updates if hasattr(update[0], "_hp_mapping") and not hasattr(update[0], "ds_id")]
    sharded = [update for update in updates if hasattr(update[0], "ds_id") and _zero3_has_master(update[0])]
    batched = {id(param) for param, _, _ in fragmented + sharded}
    for param, end, weight in updates:
        if id(param) in batched:
            continue
        if param.dtype == torch.float32 and not hasattr(param, "ds_id") and _zero0_master(param, engine) is None:
            param.data.lerp_(end.to(param.device, torch.float32), weight.to(param.device, torch.float32))  # it is its master
            continue
        value = read_full(param, engine=engine)
        write_full(param, value.lerp_(end.to(value.device, torch.float32), weight.to(value.device, torch.float32)), engine=engine)
    if fragmented:
        _lerp_fragmented(fragmented)
    if sharded:
        _lerp_sharded(sharded)


def _lerp_fragmented(updates: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]]) -> None:
    """ZeRO-1/2: the fragments of the masters this rank owns, then one all-reduce for every model copy."""
    # the updated masters, each element written by the one rank that owns it and summed over the ranks
    masters = torch.zeros(sum(param.numel() for param, _, _ in updates), dtype=torch.float32, device=updates[0][0].device)
    offset = 0
    for param, end, weight in updates:
        mapping = param._hp_mapping  # None on a rank that owns no part of this parameter's master
        if mapping is not None:
            start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
            end = end.detach().to(masters.device, torch.float32).expand(param.shape).reshape(-1).narrow(0, start, numel)
            weight = weight.detach().to(masters.device, torch.float32).expand(param.shape).reshape(-1).narrow(0, start, numel)
            fragment = mapping.get_hp_fragment()
            fragment.data.lerp_(end, weight)
            masters.narrow(0, offset + start, numel).copy_(fragment.data)
        offset += param.numel()
    if is_distributed():
        dist.all_reduce(masters, group=updates[0][0]._dp_group)
    for (param, _, _), master in zip(updates, masters.split([param.numel() for param, _, _ in updates])):
        param.data.copy_(master.view_as(param))


def _lerp_sharded(updates: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]]) -> None:
    """ZeRO-3: this rank's shard of each master, and the model shard (`ds_tensor`) cast from it, which the next
    gather reads. A parameter a rank holds gathered (a small "persistent" one, or one DeepSpeed keeps for reuse) is
    read without a gather, so it is rebuilt from one all-gather of every updated master shard. Every rank joins that
    all-gather whatever it holds: which parameters are gathered can differ between ranks."""
    from deepspeed import comm as ds_dist
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    group = updates[0][0].ds_process_group
    world = ds_dist.get_world_size(group=group)
    for param, end, weight in updates:
        with _trainable(param):
            # a zero weight keeps the padding
            master = safe_get_local_fp32_param(param).lerp(_local_shard(param, end), _local_shard(param, weight))
            safe_set_local_fp32_param(param, master)
        param.ds_tensor.data.copy_(master)
    # the model shards, in the model's dtype: half the bytes of the masters' in bf16, and the same values
    shards = torch.cat([param.ds_tensor.data.reshape(-1) for param, _, _ in updates])
    every_rank = torch.empty(world * shards.numel(), dtype=shards.dtype, device=shards.device)
    if world > 1:
        dist.all_gather_into_tensor(every_rank, shards, group=group)
    else:
        every_rank.copy_(shards)
    every_rank = every_rank.view(world, -1)
    offset = 0
    for param, _, _ in updates:
        shard = param.ds_tensor.numel()
        if param.data.numel() == param.ds_numel:  # held gathered on this rank
            param.data.copy_(every_rank[:, offset : offset + shard].reshape(-1)[: param.ds_numel].view(param.ds_shape))
        offset += shard


def _local_shard(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's fp32 shard of `full` (broadcast to the ZeRO-3 parameter's whole shape, flattened, zero-padded to
    the ranks' equal shards), as DeepSpeed partitions the parameter. Not safe_set_full_fp32_param's own slicing: in
    0.19.8 it narrows the unpadded value by the padded shard size and fails on the last rank when the numel does not
    divide by the world size."""
    from deepspeed import comm as ds_dist

    group = param.ds_process_group
    rank, world = ds_dist.get_rank(group=group), ds_dist.get_world_size(group=group)
    shard = param.partition_numel()
    padded = torch.zeros(shard * world, dtype=torch.float32, device=param.ds_tensor.device)
    padded[: param.ds_numel] = full.detach().to(padded.device, torch.float32).expand(param.ds_shape).reshape(-1)
    return padded.narrow(0, rank * shard, shard)


def _fp32_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float32, copy=True)


def _zero0_master(param: torch.nn.Parameter, engine: Any) -> torch.Tensor | None:
    """The fp32 master of `param` kept by a ZeRO-0 fp16/bf16 optimizer wrapper, if any."""
    if engine is None:
        return None
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    wrappers = (FP16_Optimizer, FP16_UnfusedOptimizer)
    # The wrappers have an `.optimizer` too (the torch one), so test the argument itself first.
    optimizer = engine if isinstance(engine, wrappers) else getattr(engine, "optimizer", None)
    if isinstance(optimizer, FP16_Optimizer):
        # The fused wrapper (DeepSpeed FusedAdam) keeps one flat master per group; supporting it
        # needs a compiled FusedAdam to test against.
        raise NotImplementedError(
            "read_full/write_full: ZeRO stage 0 with fp16/bf16 and DeepSpeed's FusedAdam "
            "(FP16_Optimizer) is not supported; use a torch optimizer or ZeRO stage >= 1"
        )
    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return None  # fp32 ZeRO-0 (the parameter is what the optimizer steps) or ZeRO >= 1
    # fp32_groups[i][j] is the master of fp16_groups[i][j] (the wrapper's name for bf16 too).
    for lp_group, hp_group in zip(optimizer.fp16_groups, optimizer.fp32_groups):
        for lp, hp in zip(lp_group, hp_group):
            if lp is param:
                return hp
    return None  # not optimized (frozen): the model copy is the only copy


def _zero3_has_master(param: torch.nn.Parameter) -> bool:
    """Whether the ZeRO-3 optimizer keeps an fp32 shard of `param` (it was trainable at init)."""
    optimizer = getattr(param, "_z3_optimizer", None)
    if optimizer is None:
        return False
    return optimizer.get_param_id(param) in getattr(optimizer, "grad_position", {})


@contextmanager
def _trainable(param: torch.nn.Parameter) -> Iterator[None]:
    # DeepSpeed's ZeRO-3 master accessors silently do nothing for requires_grad=False, but a
    # parameter frozen after the engine was built still has a master that each step copies back.
    was = param.requires_grad
    param.requires_grad_(True)
    try:
        yield
    finally:
        param.requires_grad_(was)


def _read_zero3(param: torch.nn.Parameter) -> torch.Tensor:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    if _zero3_has_master(param):
        with _trainable(param):
            return _fp32_copy(safe_get_full_fp32_param(param))  # all-gathers the fp32 shards
    with deepspeed.zero.GatheredParameters([param]):
        return _fp32_copy(param.data)


def _write_zero3(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    import deepspeed
    from deepspeed.utils import safe_set_local_fp32_param

    if _zero3_has_master(param):
        # Write this rank's fp32 shard (`_local_shard`).
        with _trainable(param):
            safe_set_local_fp32_param(param, _local_shard(param, value))
    # The model copy: gather, overwrite, and on exit rank 0's tensor is broadcast and re-sharded
    # into ds_tensor. Writing ds_tensor alone would miss "persistent" (small) parameters, which
    # stay gathered between forwards; this re-shards them too and they are gathered on next use.
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        param.data.copy_(value)

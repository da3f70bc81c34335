"""Attach, consolidate and detach program memory on a peft LoRA model (the ProCL tuner's model level).

Lifecycle of one task (from the second on; the first trains a plain LoRA):

    attach_program_memory(model, config)   # W0 = W, fresh routers, factors become ProgramFactors
    for each step: forward/backward/optimizer.step(); consolidate(model) every k steps
                                           # (inside route_by_example(model, segments) for padded or packed rows)
    detach_program_memory(model)           # fold, back to plain nn.Linear factors: a plain LoRA again

Between tasks the model is an ordinary `peft.PeftModel`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from procl import equations as eq
from procl.config import ProCLConfig
from procl.distributed import all_reduce_mean, lerp_full
from procl.layer import (FixedRouter, MLPFactor, ProgramFactor, ResidualRouter, TokenExamples, pending_statistics,
                         reference_mlp)

ROUTER_ATTRIBUTE = "procl_router"


def lora_layers(model: nn.Module, adapter_name: str = "default") -> Iterator[tuple[str, LoraLayer]]:
    """(module path, layer) of every peft LoRA layer that holds `adapter_name`."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module


def program_factors(model: nn.Module) -> Iterator[tuple[str, ProgramFactor]]:
    for name, module in model.named_modules():
        if isinstance(module, ProgramFactor):
            yield name, module


def is_attached(model: nn.Module) -> bool:
    return any(True for _ in program_factors(model))


def attach_program_memory(
    model: nn.Module,
    config: ProCLConfig,
    adapter_name: str = "default",
    earlier_usage: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> list[str]:
    """Turn every LoRA factor of `adapter_name` into program memory for one task; returns the layer paths.

    earlier_usage: per layer path, how much earlier tasks kept in each slot (residual protection).
    seed: draws each layer's top slot under routing="fixed" (the same on every rank).
    Raises ValueError naming the layer when N does not divide the rank (residual) or a factor's rows (reference).
    """
    if is_attached(model):
        raise RuntimeError("program memory is already attached; detach_program_memory() ends the task first")
    layers = list(lora_layers(model, adapter_name))
    if not layers:
        raise ValueError(f"the model has no LoRA layers with adapter {adapter_name!r} to turn into program memory")
    for path, layer in layers:  # check every layer before changing any
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if config.formulation == "residual":
            config.check_divides(lora_a.out_features, f"the LoRA rank r of {path}")
        else:
            config.check_divides(lora_a.out_features, f"the rows of LoRA factor A (rank) of {path}")
            config.check_divides(lora_b.out_features, f"the rows of LoRA factor B (d_out) of {path}")
    top_slots = torch.randint(config.num_slots, (len(layers),), generator=torch.Generator().manual_seed(seed)).tolist()
    for (path, layer), top_slot in zip(layers, top_slots):
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        device = lora_a.weight.device
        router = None
        if config.formulation == "residual":
            if config.routing == "fixed":
                router = FixedRouter(config, top_slot).to(device)
            else:
                router = ResidualRouter(lora_a.in_features, config, (earlier_usage or {}).get(path)).to(device)
            setattr(layer, ROUTER_ATTRIBUTE, router)
        mlps = {"A": None, "B": None}
        if config.reference_mlp:
            # the MLP is carried across tasks: reuse the one the previous task left
            for role, factor in (("A", lora_a), ("B", lora_b)):
                mlps[role] = factor.mlp if isinstance(factor, MLPFactor) else reference_mlp(factor.out_features).to(device)
        layer.lora_A[adapter_name] = ProgramFactor(lora_a, "A", config, router, mlps["A"])
        layer.lora_B[adapter_name] = ProgramFactor(lora_b, "B", config, router, mlps["B"])
    return [path for path, _ in layers]


def _routers(model: nn.Module) -> list:
    """Each router once (a residual router is shared by the A and B factor of its layer)."""
    seen: dict[int, object] = {}
    for _, factor in program_factors(model):
        seen.setdefault(id(factor.routing), factor.routing)
    return list(seen.values())


@contextmanager
def route_by_example(model: nn.Module, segments: torch.Tensor | None) -> Iterator[None]:
    """Within the block (a micro-batch's forward and backward, which recomputes the forward under gradient
    checkpointing), each router queries with an example's own tokens: `segments` (B, T) numbers the examples
    from 0, -1 on padding, several to a row when packed. Without it, each row is one example, padding included."""
    routers = _routers(model)
    examples = TokenExamples.of(segments) if routers and segments is not None else None
    for router in routers:
        router.examples = examples
    try:
        yield
    finally:
        for router in routers:
            router.examples = None


def _sync_routing(model: nn.Module) -> bool:
    """Average every router's pending statistics across data-parallel ranks in one collective."""
    routers = _routers(model)
    if not routers or not routers[0].has_pending():
        return False
    pending = pending_statistics(routers)
    synced = all_reduce_mean(torch.cat(pending))
    for router, part in zip(routers, synced.split([p.numel() for p in pending])):
        router.commit(part)
    return True


def consolidate(model: nn.Module, engine: Any = None) -> None:
    """One consolidation: W <- (1 - lambda) W + lambda stopgrad(W_exec) in every program factor.

    Collective when torch.distributed is initialised: every rank must call it at the same step.
    engine: the DeepSpeed engine training `model` (needed only for ZeRO-0 with bf16/fp16, whose
    fp32 master copies cannot be found from the parameters).
    """
    if not _sync_routing(model):
        return
    factors = [factor for _, factor in program_factors(model)]
    with torch.no_grad():
        lerp_full([pull for factor in factors if (pull := factor.residual_pull()) is not None], engine=engine)
    for factor in factors:
        factor.consolidate(engine)


def detach_program_memory(
    model: nn.Module, adapter_name: str = "default", engine: Any = None
) -> dict[str, torch.Tensor]:
    """End the task: consolidate what is pending, fold (residual), restore plain factors.

    Returns, per layer path, the task's mean slot plasticity (residual; empty for reference),
    which the next task's protection loss uses as earlier usage.
    """
    consolidate(model, engine)
    usage: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model, adapter_name):
        for factors in (layer.lora_A, layer.lora_B):
            factor = factors[adapter_name]
            if isinstance(factor, ProgramFactor):
                factor.fold_task(engine)
                factors[adapter_name] = factor.to_linear()
        router = getattr(layer, ROUTER_ATTRIBUTE, None)
        if router is not None:
            usage[path] = router.task_mean()[: router.num_slots].clone()
            delattr(layer, ROUTER_ATTRIBUTE)
    return usage


def protection_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum over residual routers of sum_n u_n r̄_n for the last forward pass (None before one), stacked over the
    routers. A router whose earlier usage is all zero adds a zero term: testing for it (`.any()`) would cost a host
    sync per router and step on a GPU."""
    routers = [router for router in _routers(model) if isinstance(router, ResidualRouter) and router.protected is not None]
    if not routers:
        return None
    routed = torch.stack([router.protected for router in routers]).mean(dim=1)  # (routers, N)
    return eq.protection_loss(routed, torch.stack([router.earlier_usage for router in routers]))


def routing_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Encoder, key, gate (and gamma) parameters of the attached routers."""
    return [p for router in _routers(model) for p in router.parameters()]


def routing_statistics(model: nn.Module) -> dict[str, dict[str, object]]:
    """Per layer/factor: slot usage, usage entropy, per-example entropy (and gamma or plasticity)."""
    stats: dict[str, dict[str, object]] = {}
    for path, factor in program_factors(model):
        if factor.router is not None:
            stats[path] = factor.router.statistics()
        elif factor.role == "A":
            stats[path.rsplit(".lora_A", 1)[0]] = factor.residual_router.statistics()
    return stats

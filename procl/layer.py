"""Program-memory modules that stand in for peft's LoRA factors during a ProCL task.

While a task (from the second on) trains, `lora_A[adapter]` and `lora_B[adapter]` of each peft
LoRA layer are replaced by `ProgramFactor`s. A factor keeps peft's own `weight` Parameter (the
carried W, what inference uses and what `get_delta_weight`/merge read), a frozen copy W0 taken at
the start of the task, and executes the routed factor W_exec in training mode. In eval mode it is a
plain linear map with W, so the model is an ordinary LoRA at inference.

Routers hold the per-task routing parameters (query encoder, slot keys, slot gates) and the
routing statistics that consolidation needs. They are called as modules (never through helper
methods) so that DeepSpeed ZeRO-3 gathers their partitioned parameters in its forward hooks.
A router's parameters are one flat Parameter (`packed`), viewed by name: DeepSpeed hooks, gathers
and steps each parameter on its own, and six small tensors a router were most of ZeRO-3's extra
optimizer step (benchmarks/README.md, consolidation_cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from procl import equations as eq
from procl.config import ProCLConfig
from procl.distributed import read_full, write_full

Role = Literal["A", "B"]


def query_encoder(d_in: int, key_dim: int, num_queries: int) -> dict[str, torch.Tensor]:
    """Initial tensors of the query encoder, Linear d_in -> d_k, tanh, Linear d_k -> num_queries * d_k
    (torch's Linear initialisation; named as the layers of an nn.Sequential of the three)."""
    first, second = nn.Linear(d_in, key_dim), nn.Linear(key_dim, num_queries * key_dim)
    return {"encoder.0.weight": first.weight, "encoder.0.bias": first.bias,
            "encoder.2.weight": second.weight, "encoder.2.bias": second.bias}


def encode_queries(parameters: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The query encoder of `query_encoder`'s tensors applied to x (..., d_in)."""
    hidden = torch.tanh(F.linear(x, parameters["encoder.0.weight"], parameters["encoder.0.bias"]))
    return F.linear(hidden, parameters["encoder.2.weight"], parameters["encoder.2.bias"])


@dataclass(frozen=True)
class TokenExamples:
    """Which example each token of a micro-batch belongs to, so that routing is per example where a row holds
    several (packing) or padding. Built once per micro-batch (`procl.model.route_by_example`)."""

    shape: torch.Size  # (B, T) of the micro-batch
    token_example: torch.Tensor  # (B*T,): each token's example 0..count-1, count for padding
    example_tokens: torch.Tensor  # (count,): tokens per example
    count: int
    # (B, T) when example b is row b (padding aside, as unpacked micro-batches are): 1 / tokens of the row's example
    # on its tokens, 0 on padding; None when rows are packed
    row_weights: torch.Tensor | None
    # the last (layer input, its means): layers fed the same input (q/k/v, gate/up) share one mean
    _last_mean: list = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def of(cls, segments: torch.Tensor) -> "TokenExamples":
        """segments (B, T): each token's example, numbered from 0; -1 on padding."""
        rows = torch.arange(segments.shape[0], device=segments.device)[:, None]
        # the micro-batch's one host sync for routing
        last, one_per_row = torch.stack([segments.max(), ((segments == rows) | (segments < 0)).all()]).tolist()
        count = int(last) + 1
        flat = segments.reshape(-1)
        token_example = torch.where(flat >= 0, flat, count)
        example_tokens = torch.bincount(token_example, minlength=count + 1)[:count].float()
        if bool((example_tokens == 0).any()):
            raise ValueError("segments must number the examples 0..S-1 with no gaps (-1 on padding)")
        row_weights = None
        if one_per_row and count == segments.shape[0]:
            row_weights = (segments >= 0) / example_tokens[:, None]
        return cls(segments.shape, token_example, example_tokens, count, row_weights)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) layer input -> (S, d): each example's mean over its own tokens."""
        if self._last_mean and self._last_mean[0] is x:
            return self._last_mean[1]
        if x.shape[:-1] != self.shape:
            raise ValueError(f"a layer input of shape {tuple(x.shape)} does not match the micro-batch's segments {tuple(self.shape)}")
        if self.row_weights is not None:  # one batched matmul: (B, 1, T) @ (B, T, d)
            means = torch.bmm(self.row_weights.to(x.dtype).unsqueeze(1), x).squeeze(1)
        else:
            means = eq.example_mean(x, self.token_example, self.example_tokens)
        self._last_mean[:] = [x, means]
        return means

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """(S, k) per-example values -> broadcastable to (B, T, k): (B, 1, k) when each row is one example (padding
        then gets its row's values: it never reaches a real token), else (B, T, k) with zeros on padding."""
        if self.row_weights is not None:
            return values.unsqueeze(1)
        padded = torch.cat([values, values.new_zeros(1, values.shape[-1])])
        return padded.index_select(0, self.token_example).reshape(*self.shape, values.shape[-1])


class _RoutingStatistics(nn.Module):
    """Running means of what consolidation needs, between two consolidations and over the task.

    Each forward pass keeps what it routed (`recorded`, detached); `pending_statistics` turns them into each
    router's statistic, the mean over those passes, which `procl.model.consolidate` averages across data-parallel
    ranks and hands back through `commit(synced)`, so every rank consolidates with the same numbers.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        # Pending records are rank-local on purpose, so a plain attribute: DDP broadcasts buffers from
        # rank 0 before every forward and would overwrite them.
        self.recorded: list[tuple[torch.Tensor, ...]] = []
        # per-task totals are identical on every rank and persistent: an in-task resume must fold
        # with the whole task's routing
        self.register_buffer("task_sum", torch.zeros(size))
        self.register_buffer("task_count", torch.zeros(()))
        self.synced: torch.Tensor | None = None
        self.examples: TokenExamples | None = None  # set around a micro-batch: route per example, not per row

    def input_means(self, x: torch.Tensor) -> torch.Tensor:
        """The query's input: the layer input's mean per example (per row when no segments are set)."""
        return eq.token_mean(x) if self.examples is None else self.examples.mean(x)

    def has_pending(self) -> bool:
        return bool(self.recorded)

    def pending(self) -> torch.Tensor:
        return pending_statistics([self])[0]

    @staticmethod
    def statistics_of(routers: list[_RoutingStatistics]) -> list[torch.Tensor]:
        """Each router's statistic, the float32 mean over its recorded forward passes."""
        raise NotImplementedError

    def commit(self, synced: torch.Tensor) -> None:
        self.synced = synced.to(self.task_sum.device)
        self.task_sum += self.synced
        self.task_count += 1
        self.recorded = []

    def task_mean(self) -> torch.Tensor:
        return self.task_sum / self.task_count.clamp_min(1)

    def _pack(self, tensors: dict[str, torch.Tensor]) -> None:
        """Hold `tensors` as one flat Parameter, `packed`, in this order; `unpacked()` views it by name. A state dict
        with the tensors under their own names (written before routers were packed) loads into it."""
        self._layout = [(name, tuple(tensor.shape)) for name, tensor in tensors.items()]
        self.packed = nn.Parameter(torch.cat([tensor.detach().reshape(-1) for tensor in tensors.values()]))
        self.register_load_state_dict_pre_hook(_RoutingStatistics._pack_named_tensors)

    def unpacked(self, flat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The router's parameters by name: views of `packed`, sliced at each call (ZeRO-3 swaps its storage);
        or the same views of another flat tensor of its size (its gradient, say)."""
        parts = (self.packed if flat is None else flat).split([math.prod(shape) for _, shape in self._layout])
        return {name: part.view(shape) for (name, shape), part in zip(self._layout, parts)}

    @staticmethod
    def _pack_named_tensors(router: _RoutingStatistics, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        names = [prefix + name for name, _ in router._layout]
        if prefix + "packed" not in state_dict and all(name in state_dict for name in names):
            state_dict[prefix + "packed"] = torch.cat([state_dict.pop(name).reshape(-1) for name in names])


def pending_statistics(routers: list[_RoutingStatistics]) -> list[torch.Tensor]:
    """The pending statistic of each router (in order), computed together for routers of one kind: a model's
    routers all record the same passes, so a few stacked ops serve them all rather than a few ops per router."""
    statistics = [torch.zeros_like(router.task_sum) for router in routers]  # a router with no pass yet: zeros
    kinds: dict[Any, list[int]] = {}
    for index, router in enumerate(routers):
        if router.recorded:
            kinds.setdefault(type(router).statistics_of, []).append(index)
    for statistics_of, indices in kinds.items():
        for index, statistic in zip(indices, statistics_of([routers[i] for i in indices])):
            statistics[index] = statistic
    return statistics


class _ResidualRouting(_RoutingStatistics):
    """What both residual routers record: [mean rho (N), mean attention (N), mean per-example entropy (1)]. A forward
    pass leaves `last_rho` (S, N) for the layer's two factors."""

    def __init__(self, num_slots: int) -> None:
        super().__init__(2 * num_slots + 1)
        self.num_slots = num_slots
        self.last_rho: torch.Tensor | None = None
        self._rank_rho: tuple[torch.Tensor, torch.Tensor] | None = None  # (last_rho, it over the rank)
        self._pull: torch.Tensor | None = None

    def _routed(self, rho: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        self.last_rho = rho
        self.recorded.append((rho.detach(), attention.detach()))
        return rho

    def rank_plasticity(self, rank: int) -> torch.Tensor:
        """The last pass's rho (S, N) repeated over each slot's rank rows: (S, rank); computed once for both factors."""
        if self._rank_rho is None or self._rank_rho[0] is not self.last_rho or self._rank_rho[1].shape[-1] != rank:
            self._rank_rho = (self.last_rho, eq.expand_slots_to_rank(self.last_rho, rank))
        return self._rank_rho[1]

    @staticmethod
    def statistics_of(routers: list[_RoutingStatistics]) -> list[torch.Tensor]:
        passes = {len(router.recorded) for router in routers}
        if len(passes) > 1:  # routers that saw different passes (not one model's): each on its own
            return [statistic for router in routers for statistic in _ResidualRouting.statistics_of([router])]
        total = 0.0
        for records in zip(*(router.recorded for router in routers)):  # one forward pass through every router
            rho = torch.stack([r for r, _ in records]).float()  # (routers, S, N)
            attention = torch.stack([a for _, a in records]).float()
            entropy = eq.routing_entropy(attention).mean(dim=1, keepdim=True)
            total = total + torch.cat([rho.mean(dim=1), attention.mean(dim=1), entropy], dim=-1)
        return list((total / passes.pop()).unbind(0))

    def commit(self, synced: torch.Tensor) -> None:
        super().commit(synced)
        self._pull = None

    def mean_rho(self) -> torch.Tensor:
        return self.synced[: self.num_slots]

    def consolidation_pull(self, rank: int, ema_lambda: float) -> torch.Tensor:
        """lambda (1 - mean rho) over each slot's rank rows: (rank,); computed once a commit for both factors."""
        if self._pull is None or self._pull.shape[-1] != rank:
            self._pull = eq.residual_consolidation_pull(eq.expand_slots_to_rank(self.mean_rho(), rank), ema_lambda)
        return self._pull

    def statistics(self) -> dict[str, object]:
        n = self.num_slots
        stat = self.synced if self.synced is not None else self.pending()
        return {
            "slot_usage": stat[n : 2 * n].tolist(),
            "slot_plasticity": stat[:n].tolist(),
            "usage_entropy": float(eq.routing_entropy(stat[n : 2 * n])),
            "example_entropy": float(stat[2 * n]),
            "task_plasticity": self.task_mean()[:n].tolist(),
        }


class ResidualRouter(_ResidualRouting):
    """One per LoRA layer (residual formulation, learned or budgeted routing): routes each input over N rank-block slots."""

    def __init__(self, d_in: int, config: ProCLConfig, earlier_usage: torch.Tensor | None) -> None:
        n = config.num_slots
        super().__init__(n)
        self.key_dim, self.tau = config.key_dim, config.tau
        self.budget = config.plasticity_budget if config.routing == "budgeted" else None
        # zero keys: routing starts exactly uniform, so no slot is favoured before the task speaks
        self._pack(query_encoder(d_in, config.key_dim, 1)
                   | {"keys": torch.zeros(1, n, config.key_dim), "gate_logits": torch.zeros(n)})
        usage = torch.zeros(n) if earlier_usage is None else earlier_usage.detach().float().clone()
        self.register_buffer("earlier_usage", usage)
        self.protected: torch.Tensor | None = None  # (S, N) of the last pass, what the protection loss weighs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """rho (S, N): per-input plasticity of each slot."""
        parameters = self.unpacked()
        queries = encode_queries(parameters, self.input_means(x)).reshape(-1, 1, self.key_dim)
        attention = eq.slot_attention(queries, parameters["keys"], self.tau, scale=1.0 / math.sqrt(self.key_dim))[:, 0]
        if self.budget is None:
            rho = eq.slot_plasticity(attention, parameters["gate_logits"])
        else:
            rho = eq.budgeted_plasticity(attention, parameters["gate_logits"], self.budget)
        # budgeted: protect rho, after the gates; learned: the attention (its rho is 1 at the top slot whatever)
        self.protected = attention if self.budget is None else rho
        return self._routed(rho, attention)


class FixedRouter(_ResidualRouting):
    """The routing-off control: the same rho for every input, 1 at one slot and c elsewhere; nothing to learn."""

    def __init__(self, config: ProCLConfig, top_slot: int) -> None:
        super().__init__(config.num_slots)
        self.register_buffer("rho", eq.fixed_plasticity(top_slot, config.num_slots, config.fixed_plasticity))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self.examples.count if self.examples is not None else eq.token_mean(x).shape[0]
        rho = self.rho.expand(inputs, -1)
        return self._routed(rho, rho / rho.sum(dim=-1, keepdim=True))


class ReferenceRouter(_RoutingStatistics):
    """One per replaced factor (reference formulation): N queries, one per row block h.

    Statistic layout: [alpha (H*N), mean per-example entropy (1), gamma (1)]. Gamma is recorded
    from the forward passes, so consolidation and diagnostics need no collective parameter read.
    """

    def __init__(self, d_in: int, w0: torch.Tensor, config: ProCLConfig) -> None:
        n = config.num_slots
        super().__init__(n * n + 2)
        self.num_slots, self.key_dim, self.tau = n, config.key_dim, config.tau
        self._pack(query_encoder(d_in, config.key_dim, n)
                   | {"keys": torch.randn(n, n, config.key_dim) * 0.01, "gate_logits": torch.zeros(n),
                      "gamma_logit": torch.tensor([eq.gamma_logit_init(w0)])})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha (H, N), gamma) for the executing factor of this batch."""
        parameters = self.unpacked()
        queries = encode_queries(parameters, self.input_means(x)).reshape(-1, self.num_slots, self.key_dim)
        attention = eq.slot_attention(queries, parameters["keys"], self.tau)
        alpha = eq.slot_weights(attention, parameters["gate_logits"])
        entropy = eq.routing_entropy(attention).mean().reshape(1)
        gamma = torch.sigmoid(parameters["gamma_logit"])
        self.recorded.append((torch.cat([alpha.reshape(-1), entropy, gamma]).detach(),))
        return alpha, gamma[0]

    @staticmethod
    def statistics_of(routers: list[_RoutingStatistics]) -> list[torch.Tensor]:
        return [torch.stack([statistic for statistic, in router.recorded]).float().mean(dim=0) for router in routers]

    def mean_alpha(self) -> torch.Tensor:
        return self.synced[: self.num_slots**2].reshape(self.num_slots, self.num_slots)

    def mean_gamma(self) -> torch.Tensor:
        return self.synced[-1]

    def statistics(self) -> dict[str, object]:
        stat = self.synced if self.synced is not None else self.pending()
        alpha = stat[: self.num_slots**2].reshape(self.num_slots, self.num_slots)
        usage = alpha.sum(dim=0) / alpha.sum().clamp_min(1e-12)
        return {
            "slot_usage": usage.tolist(),
            "usage_entropy": float(eq.routing_entropy(usage)),
            "example_entropy": float(stat[-2]),
            "gamma": float(stat[-1]),
        }


def reference_mlp(rows: int) -> nn.Sequential:
    """The released code's ReLU MLP around a factor's output, hidden max(128, rows / 2)."""
    hidden = max(128, rows // 2)
    return nn.Sequential(nn.Linear(rows, hidden), nn.ReLU(), nn.Linear(hidden, rows))


class ProgramFactor(nn.Module):
    """A LoRA factor (A: r x d_in or B: d_out x r) as program memory.

    `weight` is the very Parameter peft created, so optimiser state, merge and export see the
    carried W. Residual factors share their layer's router (held, not registered, here: it is
    registered once on the peft layer); reference factors own theirs.
    """

    def __init__(
        self,
        linear: nn.Linear,
        role: Role,
        config: ProCLConfig,
        residual_router: _ResidualRouting | None = None,
        mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.weight = linear.weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.role, self.formulation = role, config.formulation
        # the reference formulation always routes both factors (the config refuses anything else)
        self.routed = config.routed_factors in ("both", role)
        self.ema_lambda = config.ema_lambda
        w0 = read_full(self.weight)
        self.register_buffer("w0", w0)
        self.router: ReferenceRouter | None = None
        self._residual_router = [residual_router]  # a list keeps it out of this module's registry
        if config.formulation == "reference":
            self.router = ReferenceRouter(self.in_features, w0, config).to(self.weight.device)
        self.mlp = mlp

    @property
    def residual_router(self) -> _ResidualRouting | None:
        return self._residual_router[0]

    @property
    def rank_dim(self) -> int:
        return 0 if self.role == "A" else 1

    @property
    def routing(self) -> _RoutingStatistics | None:
        return self.router if self.router is not None else self.residual_router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.routing is None:
            y = F.linear(x, self.weight)
        elif self.formulation == "reference":
            alpha, gamma = self.router(x)
            y = F.linear(x, eq.reference_executing_factor(self.w0.to(self.weight.dtype), self.weight, alpha, gamma))
        else:
            y = self._residual_forward(x)
        return y if self.mlp is None else y + self.mlp(y)

    def _residual_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W_exec x with each example's own W_exec = W0 + rho[s] ⊙ (W - W0) (`eq.residual_executing_factor`).

        Where each row of x is one example (padding aside), the S small executing factors are formed and applied
        by one batched matmul of the LoRA's width. Packed rows mix examples, so there the same product is taken on
        activations, per token: A: [W0; W] x, then W0 x + rho ⊙ (W x - W0 x); B: [W0, W] [(1 - rho) ⊙ x; rho ⊙ x],
        a matmul of twice the width (benchmarks/step_overhead.py)."""
        router = self.residual_router
        if self.role == "A":  # the query comes from the layer input, A's input
            # the module's output, not the tensor its forward kept: DeepSpeed ZeRO-3 hooks the output so that the
            # router's parameters are gathered again for the backward pass
            router.last_rho = router(x)
        if not self.routed:
            return F.linear(x, self.weight)
        w0 = self.w0.to(self.weight.dtype)
        rank = self.weight.shape[self.rank_dim]
        rho_rank = router.rank_plasticity(rank).to(x.dtype)  # (S, r)
        examples = router.examples
        if examples is None or examples.row_weights is not None:
            executing = eq.residual_executing_factor(w0, self.weight, rho_rank, self.rank_dim)  # (S, rows, cols)
            if x.dim() == 2:  # one (T, d) sequence
                return F.linear(x, executing[0])
            rows = x.reshape(-1, *x.shape[-2:])
            return torch.bmm(rows, executing.transpose(1, 2)).reshape(*x.shape[:-1], executing.shape[1])
        rho_tokens = examples.per_token(rho_rank)  # (B, T, r), zeros on padding
        if self.role == "A":
            frozen, carried = F.linear(x, torch.cat([w0, self.weight])).chunk(2, dim=-1)
            return frozen + rho_tokens * (carried - frozen)
        plastic = rho_tokens * x
        return F.linear(torch.cat([x - plastic, plastic], dim=-1), torch.cat([w0, self.weight], dim=1))

    def executing_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W_exec from the synced routing statistics of the steps since the last consolidation."""
        w0 = self.w0.to(weight.dtype)
        if self.formulation == "reference":
            return eq.reference_executing_factor(w0, weight, self.router.mean_alpha(), self.router.mean_gamma())
        rho_rank = eq.expand_slots_to_rank(self.residual_router.mean_rho(), weight.shape[self.rank_dim])
        return eq.residual_executing_factor(w0, weight, rho_rank, self.rank_dim)

    def residual_pull(self) -> tuple[nn.Parameter, torch.Tensor, torch.Tensor] | None:
        """Residual consolidation as an elementwise pull: (W, W0, lambda (1 - rho)) for `procl.distributed.lerp_full`,
        which applies every factor's pull with one collective; None for the reference formulation or an unrouted
        factor."""
        if self.formulation != "residual" or not self.routed:
            return None
        shape = getattr(self.weight, "ds_shape", self.weight.shape)  # a ZeRO-3 parameter is empty outside a gather
        pull = self.residual_router.consolidation_pull(shape[self.rank_dim], self.ema_lambda)
        return self.weight, self.w0, eq.along_rank(pull, self.rank_dim)

    @torch.no_grad()
    def consolidate(self, engine: Any = None) -> None:
        """Reference: W <- (1 - lambda) W + lambda stopgrad(W_exec), through the whole parameter; identical on every
        rank (synced statistics). (Residual factors are consolidated together, `residual_pull`.)

        engine: the DeepSpeed engine, needed only for ZeRO-0 with bf16/fp16 (see procl.distributed).
        """
        if self.formulation != "reference":
            return
        weight = read_full(self.weight, engine=engine)
        write_full(self.weight, eq.consolidate(weight, self.executing_weight(weight), self.ema_lambda), engine=engine)

    @torch.no_grad()
    def fold_task(self, engine: Any = None) -> None:
        """Residual, at task end: W <- W0 + rho_task ⊙ (W - W0), the executing adapter at the task's mean routing."""
        if self.formulation != "residual" or not self.routed:
            return
        weight = read_full(self.weight, engine=engine)
        rho_task = self.residual_router.task_mean()[: self.residual_router.num_slots]
        rho_rank = eq.expand_slots_to_rank(rho_task, weight.shape[self.rank_dim])
        write_full(self.weight, eq.residual_executing_factor(self.w0.to(weight.dtype), weight, rho_rank, self.rank_dim), engine=engine)

    def to_linear(self) -> nn.Module:
        """Back to a plain nn.Linear holding the same Parameter (or, with the reference MLP, a bare MLP factor)."""
        if self.mlp is not None:
            return MLPFactor(self.weight, self.mlp)
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = self.weight
        return linear


class MLPFactor(nn.Module):
    """Between tasks with `reference_mlp`: y = W x + MLP(W x). Not a plain LoRA, hence not exportable."""

    def __init__(self, weight: nn.Parameter, mlp: nn.Module) -> None:
        super().__init__()
        self.weight = weight
        self.mlp = mlp
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return y + self.mlp(y)

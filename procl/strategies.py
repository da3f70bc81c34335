"""Continual-learning strategies: ProCL and the baselines it is judged against, behind one interface.

A training loop drives every strategy through the same hooks and never asks which one it runs:

    model = strategy.build(base_model)              # once per process (or restore_state afterwards)
    strategy.before_task(model, t)                   # t = 0, 1, ... (0-based task index)
    examples = strategy.training_examples(t, examples)
    optimizer over strategy.param_groups(model, lr)
    for each batch: loss = task_loss + (strategy.extra_loss(model) or 0); step; strategy.after_optimizer_step(model, engine)
    strategy.after_task(model, t, examples, engine)
    strategy.export(model, directory)                # a plain peft LoRA adapter

State that must survive a process boundary (next task, resume) goes through `state()` and
`restore_state()`: tensors (saved as safetensors) and JSON-able metadata; never pickle.
"""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from procl import model as memory
from procl.config import LoraSettings, ProCLConfig
from procl.distributed import read_full
from procl.export import export_adapter

DEFAULT_ADAPTER = "default"
USAGE_PREFIX = "procl_slot_usage::"  # ProCL's per-layer slot usage in the state tensors


def _check_targets(base_model: nn.Module, lora: LoraSettings) -> None:
    """Fail early, naming the missing target modules and what the model has."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, m in base_model.named_modules() if name and not list(m.children())}
    missing = [t for t in lora.target_modules if t not in leaf_names]
    if missing:
        raise ValueError(f"lora.target_modules {missing} do not exist in the model; its layers are: {sorted(leaf_names)}")


def _is_strategy_tensor(name: str) -> bool:
    """Adapter factors, program memory and routers: what a strategy's state holds (not the base model)."""
    return "lora_" in name or memory.ROUTER_ATTRIBUTE in name


class ContinualStrategy:
    """Base strategy: one LoRA trained on every task in turn (that is `seq_lora`)."""

    name: ClassVar[str] = "seq_lora"

    def __init__(self, lora: LoraSettings | None = None, seed: int = 0) -> None:
        self.lora = lora or LoraSettings()
        self.seed = seed
        self.task_index = -1
        self.in_task = False

    # -- model -------------------------------------------------------------------------------
    def build(self, base_model: nn.Module) -> PeftModel:
        """Wrap the base model with the LoRA adapter(s) this strategy trains first."""
        _check_targets(base_model, self.lora)
        torch.manual_seed(self.seed)
        return get_peft_model(base_model, self.lora.to_lora_config(), adapter_name=DEFAULT_ADAPTER)

    # -- hooks -------------------------------------------------------------------------------
    def before_task(self, model: PeftModel, task_index: int) -> None:
        self.task_index, self.in_task = task_index, True

    def training_examples(self, task_index: int, examples: list[Any]) -> list[Any]:
        """The examples to train task `task_index` on (replay and multitask add earlier ones)."""
        return examples

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def micro_batch(self, model: nn.Module, segments: torch.Tensor | None) -> AbstractContextManager:
        """Around one micro-batch's forward and backward; `segments` (B, T): which example each token belongs to
        (-1 on padding). ProCL routes per example with it; the other strategies need nothing."""
        return nullcontext()

    def after_optimizer_step(self, model: nn.Module, engine: Any = None) -> None:
        """After every optimizer step; `engine` is the DeepSpeed engine when one trains the model."""

    def after_task(self, model: PeftModel, task_index: int, examples: list[Any], engine: Any = None) -> None:
        self.in_task = False
        self.remember(task_index, examples)

    def remember(self, task_index: int, examples: list[Any]) -> None:
        """The data part of `after_task` (no model): keep what `training_examples` of later tasks draws on.
        A driver that prepares every task's data before training runs this in place of `after_task`."""

    # -- export and state ----------------------------------------------------------------------
    def export(self, model: PeftModel, directory: str | Path) -> Path:
        """Write the consolidated adapter as a plain peft LoRA adapter (zero extra inference cost)."""
        return export_adapter(model, directory, DEFAULT_ADAPTER)

    def state(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, metadata) that `restore_state` needs to rebuild this exact point of the chain.

        Parameters are read whole and at master precision (gathered under ZeRO-3): collective
        under DeepSpeed, so every rank calls it.
        """
        tensors = {name: read_full(p).cpu() for name, p in model.named_parameters() if _is_strategy_tensor(name)}
        tensors |= {name: b.detach().cpu().contiguous() for name, b in model.named_buffers() if _is_strategy_tensor(name)}
        meta = {"strategy": self.name, "task_index": self.task_index, "in_task": self.in_task, "seed": self.seed}
        return tensors, meta

    def restore_state(self, model: PeftModel, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Load what `state` wrote into a freshly built model (re-entering the task when it was saved mid-task)."""
        if meta.get("strategy") != self.name:
            raise ValueError(f"checkpoint was written by strategy {meta.get('strategy')!r}, not {self.name!r}")
        self.seed = meta["seed"]
        tensors = self._restore_strategy(model, tensors, meta)
        if meta["in_task"]:
            self.before_task(model, meta["task_index"])
        self.task_index, self.in_task = meta["task_index"], meta["in_task"]
        result = model.load_state_dict(tensors, strict=False)
        expected = {k for k in model.state_dict() if _is_strategy_tensor(k)}
        missing = sorted(expected & set(result.missing_keys))
        if missing or result.unexpected_keys:
            raise ValueError(
                f"checkpoint does not match the {self.name} model: missing {missing[:5]}, "
                f"unexpected {list(result.unexpected_keys)[:5]}"
            )

    def _restore_strategy(
        self, model: PeftModel, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Restore the strategy's own state, recreate the adapters/modules the saved model has beyond
        what `build` makes, and return the tensors that belong to the model."""
        self.load_data_state(meta)
        return tensors

    def load_data_state(self, meta: dict[str, Any]) -> None:
        """Restore only what `training_examples` needs (no model): a driver that prepares a task's
        data in another process than training calls this with the previous task's metadata."""


class SeqLoRA(ContinualStrategy):
    name = "seq_lora"


class ReplayLoRA(ContinualStrategy):
    """seq_lora plus a buffer of earlier tasks' training examples mixed into each new task."""

    name = "replay"

    def __init__(self, lora: LoraSettings | None = None, seed: int = 0, buffer_per_task: int = 20) -> None:
        super().__init__(lora, seed)
        if buffer_per_task < 1:
            raise ValueError(f"replay buffer_per_task must be >= 1, got {buffer_per_task}")
        self.buffer_per_task = buffer_per_task
        self.buffer: list[Any] = []

    def training_examples(self, task_index: int, examples: list[Any]) -> list[Any]:
        mixed = list(examples) + self.buffer
        random.Random(self.seed + task_index).shuffle(mixed)
        return mixed

    def remember(self, task_index: int, examples: list[Any]) -> None:
        rng = random.Random(self.seed * 1000 + task_index)
        self.buffer += rng.sample(list(examples), min(self.buffer_per_task, len(examples)))

    def state(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state(model)
        return tensors, meta | {"buffer": self.buffer, "buffer_per_task": self.buffer_per_task}

    def load_data_state(self, meta: dict[str, Any]) -> None:
        self.buffer, self.buffer_per_task = list(meta["buffer"]), meta["buffer_per_task"]


class MultitaskLoRA(ContinualStrategy):
    """Upper bound: a fresh LoRA trained jointly on every task seen so far, at every task."""

    name = "multitask"

    def __init__(self, lora: LoraSettings | None = None, seed: int = 0) -> None:
        super().__init__(lora, seed)
        self.seen: list[Any] = []

    def before_task(self, model: PeftModel, task_index: int) -> None:
        super().before_task(model, task_index)
        if task_index > 0:  # start from scratch: joint training, not continual
            torch.manual_seed(self.seed + task_index)
            for _, layer in memory.lora_layers(model, DEFAULT_ADAPTER):
                layer.reset_lora_parameters(DEFAULT_ADAPTER, init_lora_weights=True)

    def training_examples(self, task_index: int, examples: list[Any]) -> list[Any]:
        joint = self.seen + list(examples)
        random.Random(self.seed + task_index).shuffle(joint)
        return joint

    def remember(self, task_index: int, examples: list[Any]) -> None:
        self.seen += list(examples)

    def state(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state(model)
        return tensors, meta | {"seen": self.seen}

    def load_data_state(self, meta: dict[str, Any]) -> None:
        self.seen = list(meta["seen"])


class IncLoRA(ContinualStrategy):
    """A new LoRA per task, earlier ones frozen; all active together; exported concatenated (rank grows)."""

    name = "inc_lora"

    @staticmethod
    def adapter_name(task_index: int) -> str:
        return f"task_{task_index}"

    def build(self, base_model: nn.Module) -> PeftModel:
        _check_targets(base_model, self.lora)
        torch.manual_seed(self.seed)
        return get_peft_model(base_model, self.lora.to_lora_config(), adapter_name=self.adapter_name(0))

    def adapters(self, model: PeftModel) -> list[str]:
        return sorted((n for n in model.peft_config if n.startswith("task_")), key=lambda n: int(n[5:]))

    def before_task(self, model: PeftModel, task_index: int) -> None:
        super().before_task(model, task_index)
        self._ensure_adapters(model, task_index + 1)
        names = self.adapters(model)
        model.base_model.set_adapter(names)  # all active: the forward sums them
        for name, param in model.named_parameters():  # ...but only the newest trains
            param.requires_grad = f".{self.adapter_name(task_index)}." in name

    def _ensure_adapters(self, model: PeftModel, count: int) -> None:
        for index in range(len(self.adapters(model)), count):
            torch.manual_seed(self.seed + index)
            model.add_adapter(self.adapter_name(index), self.lora.to_lora_config())
        model.base_model.set_adapter(self.adapters(model))

    def earlier_factors(self, model: nn.Module) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """(A of the task being trained, [A of every earlier task]) per LoRA layer."""
        current = self.adapter_name(self.task_index)
        pairs = []
        for _, layer in memory.lora_layers(model, current):
            earlier = [layer.lora_A[self.adapter_name(i)].weight for i in range(self.task_index)]
            pairs.append((layer.lora_A[current].weight, earlier))
        return pairs

    def export(self, model: PeftModel, directory: str | Path) -> Path:
        names = self.adapters(model)
        if len(names) == 1:
            return export_adapter(model, directory, names[0])
        merged = "exported_cat"
        model.add_weighted_adapter(names, [1.0] * len(names), merged, combination_type="cat")
        try:
            return export_adapter(model, directory, merged)
        finally:
            model.delete_adapter(merged)
            model.base_model.set_adapter(names)

    def state(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state(model)
        return tensors, meta | {"num_adapters": len(self.adapters(model))}

    def _restore_strategy(self, model: PeftModel, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        self._ensure_adapters(model, meta["num_adapters"])
        return super()._restore_strategy(model, tensors, meta)


class OLoRA(IncLoRA):
    """inc_lora plus O-LoRA's orthogonality penalty lambda1 * sum_layers sum_old |A_new A_old^T| (EMNLP 2023)."""

    name = "o_lora"

    def __init__(self, lora: LoraSettings | None = None, seed: int = 0, lambda1: float = 0.005) -> None:
        super().__init__(lora, seed)
        if lambda1 < 0:
            raise ValueError(f"o_lora lambda1 must be >= 0, got {lambda1}")
        self.lambda1 = lambda1

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        terms = [
            (current @ old.detach().T).abs().sum()
            for current, earlier in self.earlier_factors(model)
            for old in earlier
        ]
        return self.lambda1 * torch.stack(terms).sum() if terms else None


class NLoRA(IncLoRA):
    """inc_lora plus N-LoRA's sparsity penalty l1_weight * sum_layers |Delta W_t|_1 on the update of the task being
    trained, Delta W_t = scaling * B_t A_t (arXiv 2410.10179): sparse, non-colliding task updates."""

    name = "n_lora"

    def __init__(self, lora: LoraSettings | None = None, seed: int = 0, l1_weight: float = 1e-5) -> None:
        super().__init__(lora, seed)
        if l1_weight < 0:
            raise ValueError(f"n_lora l1_weight must be >= 0, got {l1_weight}")
        self.l1_weight = l1_weight

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        current = self.adapter_name(self.task_index)
        terms = [(layer.lora_B[current].weight @ layer.lora_A[current].weight).abs().sum() * layer.scaling[current]
                 for _, layer in memory.lora_layers(model, current)]
        return self.l1_weight * torch.stack(terms).sum() if terms else None


class L2Prev(ContinualStrategy):
    """seq_lora plus l2_weight * ||theta - theta_prev||^2 over the LoRA factors, theta_prev being where the previous
    task left them: the textbook stability baseline (an L2 pull toward the previous task's adapter; the first task
    trains unpulled). ProCL's pull-back of non-top slots acts like it, which is what this control separates."""

    name = "l2_prev"
    ANCHOR_PREFIX = "l2_prev_anchor::"  # the anchor's tensors in the state (a task resumed mid-way keeps its anchor)

    def __init__(self, lora: LoraSettings | None = None, seed: int = 0, l2_weight: float = 0.01) -> None:
        super().__init__(lora, seed)
        if l2_weight < 0:
            raise ValueError(f"l2_prev l2_weight must be >= 0, got {l2_weight}")
        self.l2_weight = l2_weight
        self.anchor: dict[str, torch.Tensor] = {}
        self.anchor_task = -1

    def before_task(self, model: PeftModel, task_index: int) -> None:
        super().before_task(model, task_index)
        if task_index >= 1 and self.anchor_task != task_index:  # a restored mid-task state brought its own anchor
            self.anchor = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
            self.anchor_task = task_index

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if not self.anchor:
            return None
        terms = []
        for name, param in model.named_parameters():
            if name in self.anchor:
                if self.anchor[name].device != param.device:  # restored on the CPU, trained on the GPU: moved once
                    self.anchor[name] = self.anchor[name].to(param.device)
                terms.append((param.float() - self.anchor[name]).pow(2).sum())
        return self.l2_weight * torch.stack(terms).sum()

    def state(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state(model)
        tensors |= {self.ANCHOR_PREFIX + name: anchor.cpu() for name, anchor in self.anchor.items()}
        return tensors, meta | {"anchor_task": self.anchor_task}

    def _restore_strategy(self, model: PeftModel, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.anchor = {k[len(self.ANCHOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(self.ANCHOR_PREFIX)}
        self.anchor_task = meta["anchor_task"]
        return {k: v for k, v in super()._restore_strategy(model, tensors, meta).items() if not k.startswith(self.ANCHOR_PREFIX)}


class ProCL(ContinualStrategy):
    """ProCL: program memory with consolidation from task 2 on (from task 1 with budgeted routing); docs/METHOD.md."""

    name = "procl"

    def __init__(self, lora: LoraSettings | None = None, seed: int = 0, procl: ProCLConfig | None = None) -> None:
        super().__init__(lora, seed)
        self.config = procl or ProCLConfig()
        if self.config.formulation == "residual":
            self.config.check_divides(self.lora.r, "lora.r")
        self.steps_since_consolidation = 0
        # per layer path: mean plasticity each slot kept in earlier ProCL tasks (protection loss)
        self.slot_usage: dict[str, torch.Tensor] = {}
        self.task_slot_usage: list[dict[str, list[float]]] = []

    def before_task(self, model: PeftModel, task_index: int) -> None:
        super().before_task(model, task_index)
        self.steps_since_consolidation = 0
        if task_index > 0 or self.config.routes_first_task:
            memory.attach_program_memory(model, self.config, DEFAULT_ADAPTER, self.slot_usage, seed=self.seed * 1009 + task_index)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        routing = memory.routing_parameters(model)
        routing_ids = {id(p) for p in routing}
        lora = [p for p in model.parameters() if p.requires_grad and id(p) not in routing_ids]
        groups = [{"params": lora, "lr": lr}]
        if routing:
            groups.append({"params": routing, "lr": lr * self.config.router_lr_scale, "weight_decay": 0.0})
        return groups

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.config.protect_weight == 0:
            return None
        loss = memory.protection_loss(model)
        return None if loss is None else self.config.protect_weight * loss

    def micro_batch(self, model: nn.Module, segments: torch.Tensor | None) -> AbstractContextManager:
        return memory.route_by_example(model, segments)

    def after_optimizer_step(self, model: nn.Module, engine: Any = None) -> None:
        if not memory.is_attached(model):
            return
        self.steps_since_consolidation += 1
        if self.steps_since_consolidation >= self.config.consolidate_every:
            memory.consolidate(model, engine)
            self.steps_since_consolidation = 0

    def after_task(self, model: PeftModel, task_index: int, examples: list[Any], engine: Any = None) -> None:
        super().after_task(model, task_index, examples, engine)
        if not memory.is_attached(model):
            return
        usage = memory.detach_program_memory(model, DEFAULT_ADAPTER, engine)
        self.task_slot_usage.append({path: u.tolist() for path, u in usage.items()})
        finished = len(self.task_slot_usage)
        for path, u in usage.items():  # running mean over the ProCL tasks so far
            self.slot_usage[path] = self.slot_usage.get(path, torch.zeros_like(u)) * (finished - 1) / finished + u / finished

    def routing_statistics(self, model: nn.Module) -> dict[str, dict[str, object]]:
        return memory.routing_statistics(model)

    def export(self, model: PeftModel, directory: str | Path) -> Path:
        if self.config.reference_mlp:
            raise ValueError(
                "procl.reference_mlp=True wraps every LoRA factor in an MLP that inference needs, so the model is "
                "not a plain LoRA and cannot be exported as one; train with reference_mlp=False to export"
            )
        return super().export(model, directory)

    def state(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state(model)
        tensors |= {f"{USAGE_PREFIX}{path}": u.contiguous() for path, u in self.slot_usage.items()}
        meta |= {
            "procl": self.config.model_dump(),
            "task_slot_usage": self.task_slot_usage,
            "steps_since_consolidation": self.steps_since_consolidation,
        }
        return tensors, meta

    def restore_state(self, model: PeftModel, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().restore_state(model, tensors, meta)
        self.steps_since_consolidation = meta["steps_since_consolidation"]

    def _restore_strategy(self, model: PeftModel, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        saved = ProCLConfig(**meta["procl"])
        if saved != self.config:
            raise ValueError(f"checkpoint was trained with procl settings {saved.model_dump()}, not {self.config.model_dump()}")
        self.slot_usage = {k[len(USAGE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(USAGE_PREFIX)}
        self.task_slot_usage = list(meta["task_slot_usage"])
        if self.config.reference_mlp and meta["task_index"] >= 1 and not meta["in_task"]:
            # between tasks the MLPs stay around the factors: recreate them so their weights load
            memory.attach_program_memory(model, self.config, DEFAULT_ADAPTER)
            memory.detach_program_memory(model, DEFAULT_ADAPTER)
        return {k: v for k, v in tensors.items() if not k.startswith(USAGE_PREFIX)}


STRATEGIES: dict[str, type[ContinualStrategy]] = {
    cls.name: cls for cls in (SeqLoRA, IncLoRA, OLoRA, NLoRA, L2Prev, ReplayLoRA, MultitaskLoRA, ProCL)
}


def make_strategy(name: str, **options: Any) -> ContinualStrategy:
    """The strategy called `name` (procl, seq_lora, inc_lora, o_lora, n_lora, l2_prev, replay, multitask)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](**options)

"""Configuration of the ProCL tuner and the LoRA it works on.

`ProCLConfig` plays the role of peft's `LoraConfig` for this method: it carries the LoRA
hyperparameters (turned into a real `peft.LoraConfig` by `to_lora_config`) and the program-memory
hyperparameters. It is a pydantic model so that a bad value fails with the field name and the
allowed range before any model is touched.
"""

from __future__ import annotations

from typing import Literal

from peft import LoraConfig
from pydantic import BaseModel, ConfigDict, Field, model_validator


class LoraSettings(BaseModel):
    """The plain-LoRA part, shared by every strategy."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0, description="LoRA rank (> 0).")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: scaling = lora_alpha / r.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description="Names (suffixes) of the linear modules to adapt, as in peft.",
    )

    def to_lora_config(self, r: int | None = None) -> LoraConfig:
        """A peft `LoraConfig` for a causal LM; `r` overrides the rank (inc_lora grows it)."""
        rank = self.r if r is None else r
        return LoraConfig(
            r=rank,
            # keep scaling = lora_alpha / r of the configured rank whatever rank is asked for
            lora_alpha=self.lora_alpha * rank / self.r,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.target_modules),
            task_type="CAUSAL_LM",
            bias="none",
        )


class ProCLConfig(BaseModel):
    """Program-memory hyperparameters (defaults of the authors' released code, see docs/METHOD.md).

    formulation:
      - "residual" (default): slots are rank blocks of the LoRA; the executing adapter equals the
        carried adapter at the start of every task and routing decides, slot by slot, how much of
        what a task learns is kept (docs/METHOD.md, "Residual formulation").
      - "reference": the literal formulation of the released code (row-block programs mixed by
        attention, gamma-gated W0, EMA consolidation toward the executing factor).
    routing (residual): how each input's slot plasticity rho is chosen (docs/METHOD.md, "Routing variants").
      - "learned" (default): rho = m / max m over the gated attention m; the top slot is always fully
        plastic, from the second task on; protection acts on the attention.
      - "budgeted": rho = 1 on the k slots of largest m and 0 elsewhere (straight-through gradient of
        min(1, k m / sum m)), so an input writes into k slots whatever the loss prefers; routes from the
        first task on, so its usage is recorded and the second task already protects it; protection
        acts on rho.
      - "fixed": no routing (the control): rho = 1 for one slot per layer, drawn at random per task,
        and the constant c for the others. Consolidation without input-conditioned attention.
    routed_factors: which factors of each LoRA layer are routed (residual); "A" or "B" leaves the
      other factor to train as plain LoRA, an ablation of where program memory acts.
    reference_mlp: the released code also wraps each replaced factor's output in a freshly
      initialised ReLU MLP, kept at inference. Only with formulation="reference"; a model with it
      cannot be exported as a plain LoRA.
    """

    model_config = ConfigDict(extra="forbid")

    formulation: Literal["residual", "reference"] = "residual"
    num_slots: int = Field(4, gt=0, description="N, the number of program slots.")
    key_dim: int = Field(16, gt=0, description="d_k, the size of queries and keys.")
    tau: float = Field(1.0, gt=0, description="Softmax temperature of slot retrieval (> 0).")
    ema_lambda: float = Field(
        0.9, gt=0, le=1, description="lambda of the consolidation EMA, in (0, 1]."
    )
    consolidate_every: int = Field(1, gt=0, description="Consolidate after every this many optimiser steps.")
    router_lr_scale: float = Field(
        10.0, gt=0, description="Learning rate of routing parameters (encoder, keys, gates) relative to the LoRA lr."
    )
    protect_weight: float = Field(
        0.1,
        ge=0,
        description="residual only: weight of the loss that steers routing away from slots earlier tasks kept.",
    )
    routing: Literal["learned", "budgeted", "fixed"] = "learned"
    plasticity_budget: int = Field(
        1, gt=0, description="routing='budgeted' only: k, the number of slots each input writes into (0 < k < num_slots)."
    )
    fixed_plasticity: float = Field(
        0.85,
        ge=0,
        lt=1,
        description="routing='fixed' only: c, the plasticity of every slot but the top one, in [0, 1) "
        "(0.85 is about what learned routing keeps in its non-top slots at lr 1e-3, docs/RESULTS.md).",
    )
    routed_factors: Literal["both", "A", "B"] = Field(
        "both",
        description="residual only: which LoRA factors are program memory; an unrouted factor trains as plain LoRA "
        "(no routing, no consolidation pull).",
    )
    reference_mlp: bool = False

    @model_validator(mode="after")
    def _mlp_only_in_reference(self) -> "ProCLConfig":
        if self.reference_mlp and self.formulation != "reference":
            raise ValueError("reference_mlp=True needs formulation='reference' (it reproduces the released code)")
        if self.routed_factors != "both" and self.formulation != "residual":
            raise ValueError("routed_factors applies to formulation='residual' only (the reference formulation routes both)")
        if self.routing != "learned" and self.formulation != "residual":
            raise ValueError(f"routing={self.routing!r} applies to formulation='residual' only (the reference formulation has its own)")
        if self.routing == "budgeted" and self.plasticity_budget >= self.num_slots:
            raise ValueError(
                f"plasticity_budget={self.plasticity_budget} must be below num_slots={self.num_slots}: "
                "a budget of N slots or more lets every slot stay fully plastic"
            )
        return self

    @property
    def routes_first_task(self) -> bool:
        """Budgeted routing also routes task 1, so that what task 1 kept is known and protected."""
        return self.routing == "budgeted"

    def check_divides(self, rows: int, what: str) -> None:
        """N must split `rows` into equal blocks; raise naming the parameter and the allowed values."""
        if rows % self.num_slots:
            allowed = [n for n in range(1, rows + 1) if rows % n == 0]
            raise ValueError(
                f"num_slots={self.num_slots} does not divide {what} ({rows}); "
                f"allowed num_slots for it: {allowed}"
            )

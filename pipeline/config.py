"""The one YAML a user writes to run a chain: model, stream + order, strategy, training, DeepSpeed, scaling, tracking.

Validated with pydantic before Ray starts: unknown keys, wrong types, impossible values and
conflicting options fail with the file and the field path. `--set key.path=value` overrides are
applied to the raw YAML before validation, so they are checked the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.evaluation import CANDIDATE_PASS_MIB
from pipeline.hardware import bf16_support
from pipeline.models import ModelSpec
from pipeline.storage import URI_SCHEMES, RunFolder, is_uri
from pipeline.validation import read_yaml_mapping, validation_problems
from procl import LoraSettings, ProCLConfig
from procl.strategies import STRATEGIES


class ConfigError(ValueError):
    """A run configuration is invalid; the message names the file/field and what was expected."""


# strategies whose extra loss reads whole LoRA factors outside the forward (not under ZeRO-3), by that loss
WHOLE_FACTOR_LOSSES = {"o_lora": "orthogonality loss", "n_lora": "sparsity loss", "l2_prev": "L2 pull"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamChoice(_Strict):
    path: str = "configs/streams/intent.yaml"
    order: str | None = Field(None, description="an order defined in the stream file (default: its first)")
    max_tasks: int | None = Field(None, gt=0, description="only the first k tasks of the order")


class StrategyConfig(_Strict):
    name: str = "procl"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    procl: ProCLConfig = Field(default_factory=ProCLConfig)
    buffer_per_task: int = Field(20, gt=0, description="replay: training examples kept per earlier task")
    lambda1: float = Field(0.005, ge=0, description="o_lora: weight of the orthogonality penalty "
                           "(0.005: validation's choice of 0.5, 0.05, 0.005 on the long stream, docs/RESULTS.md)")
    l1_weight: float = Field(1e-5, ge=0, description="n_lora: weight of the L1 penalty on the task's own LoRA update "
                             "(1e-5: validation's choice of 1e-3, 1e-4, 1e-5 on the long stream, docs/RESULTS.md)")
    l2_weight: float = Field(0.01, ge=0, description="l2_prev: weight of the L2 pull toward the previous task's LoRA factors "
                             "(0.01: validation's choice of 1, 0.1, 0.01 on the long stream, docs/RESULTS.md)")

    @model_validator(mode="after")
    def _known_name(self) -> "StrategyConfig":
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.name!r}; choose one of {sorted(STRATEGIES)}")
        if self.name == "procl" and self.procl.formulation == "residual":
            self.procl.check_divides(self.lora.r, "strategy.lora.r")
        return self

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `procl.make_strategy` for this strategy."""
        extra = {"procl": {"procl": self.procl}, "replay": {"buffer_per_task": self.buffer_per_task}, "o_lora": {"lambda1": self.lambda1},
                 "n_lora": {"l1_weight": self.l1_weight}, "l2_prev": {"l2_weight": self.l2_weight}}
        return {"lora": self.lora} | extra.get(self.name, {})


class TrainingConfig(_Strict):
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0, description="micro-batch per worker")
    gradient_accumulation: int = Field(1, gt=0)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(256, gt=8)
    mask_prompt: bool = Field(True, description="loss on the answer only (False: whole sequence, as the reference code)")
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0, description="steps between in-task checkpoints (0: only at task end)")
    max_steps: int | None = Field(None, gt=0, description="step budget per task: at most this many optimizer steps (None: every batch)")
    # transformers' step-driven schedules (get_scheduler), restarted at each task: a task is one fine-tuning run
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                          "inverse_sqrt"] = Field("constant", description="transformers' get_scheduler name, over each task's steps")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up at the start of each task")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (transformers' "
                                                            "activation checkpointing, non-reentrant): less memory, ~30% more compute")
    shuffle_buffer: int = Field(10_000, ge=0, description="rows of each worker's local shuffle of its shard, reseeded every "
                                                        "epoch (from seed, task and epoch); a task smaller than this is shuffled whole; 0: none")
    packing: bool = Field(False, description="pack each micro-batch's examples into as few rows of max_length as hold them: the same "
                                             "examples, steps and loss, without computing on padding (for short examples; "
                                             "pipeline.preprocess.pack_examples)")


class DeepSpeedSettings(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    bf16: bool | None = Field(None, description="DeepSpeed bf16 (with fp32 master weights); None: as model.dtype settles "
                                               "('auto': bf16 where the device computes it natively)")
    stage3_param_persistence_threshold: int = Field(
        100_000, ge=0, description="ZeRO-3: parameters with fewer elements stay whole on every rank rather than partitioned "
                                   "(DeepSpeed's setting of the same name; its default)")


TOKENIZE_CPUS = 0.5  # Ray resources of one tokenising task (pipeline.preprocess)


class ScalingSettings(_Strict):
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    ingest_cpus: float = Field(1.0, ge=TOKENIZE_CPUS, description="CPUs kept for Ray Data beside the training workers: a task's "
                               "rows are tokenised while its workers train on them (streamed, not materialised), each "
                               f"tokenising Ray task taking {TOKENIZE_CPUS}")
    max_failures: int = Field(2, ge=0, description="Ray Train's FailureConfig.max_failures: restarts of the chain's worker "
                                                   "group after a worker or node failure, each from the last checkpoint")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each training worker needs, e.g. {worker_node: 1} to place workers on labelled nodes"
    )

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if name.upper() in ("CPU", "GPU"):
                raise ValueError(f"{name}: set CPUs with cpus_per_worker and GPUs with use_gpu")
            if not amount > 0:
                raise ValueError(f"{name}: expected an amount > 0, got {amount}")
        return resources

    def chain_cpus(self) -> float:
        """CPUs one chain holds: its training workers' and its ingest's."""
        return self.num_workers * self.cpus_per_worker + self.ingest_cpus

    def worker_resources(self) -> dict[str, float]:
        """Ray resources of one training worker: CPUs, a GPU when use_gpu, and the custom ones."""
        return {"CPU": self.cpus_per_worker} | ({"GPU": 1} if self.use_gpu else {}) | self.resources_per_worker


class EvaluationConfig(_Strict):
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(16, gt=0, description="generation tasks")
    candidate_pass_mib: float = Field(CANDIDATE_PASS_MIB, gt=0, description="label scoring: memory the (prompt, candidate) "
                                      "rows of one forward may take (their prompt KV caches and logits); more rows per "
                                      "forward where there is memory to spare, as on a GPU")
    bf16: bool | None = Field(None, description="score under bf16 autocast (benchmarks/eval_precision.py); None: as training")


class TrackingConfig(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite:///<output_dir>/mlflow.db, shared by the chains there)")
    experiment: str = "procl"


class RayConfig(_Strict):
    address: str | None = Field(None, description="None: start a fresh local Ray; 'auto': join the running cluster (inside `ray job submit`)")
    num_cpus: int | None = Field(None, gt=0, description="logical CPUs of a local Ray")


class ChainConfig(_Strict):
    run_name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "runs"
    model: ModelSpec = Field(default_factory=ModelSpec)
    stream: StreamChoice = Field(default_factory=StreamChoice)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("output_dir")
    @classmethod
    def _known_location(cls, output_dir: str) -> str:
        scheme = urlsplit(output_dir).scheme
        if is_uri(output_dir) and scheme not in URI_SCHEMES:
            raise ValueError(f"{output_dir}: {scheme}:// is not a filesystem pyarrow opens; give a local path or a URI of "
                             + ", ".join(f"{known}://" for known in URI_SCHEMES))
        return output_dir

    @model_validator(mode="after")
    def _compatible(self) -> "ChainConfig":
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        loss = WHOLE_FACTOR_LOSSES.get(self.strategy.name)
        if loss and self.deepspeed.zero_stage == 3:
            # the loss reads whole LoRA factors outside the forward, where ZeRO-3 keeps only shards
            raise ValueError(f"strategy {self.strategy.name} does not run under deepspeed.zero_stage 3 (its {loss} needs "
                             "whole LoRA factors); use zero_stage 0-2 (LoRA weights are small) or another strategy")
        if is_uri(self.output_dir) and self.tracking.uri is None:
            # sqlite needs a POSIX file: the default store under output_dir cannot live in object storage
            raise ValueError(f"tracking.uri: output_dir {self.output_dir} is object storage, where the default MLflow store "
                             "(sqlite under output_dir) cannot live; set tracking.uri to an MLflow server "
                             "(http://HEAD:5000) or a local store (sqlite:////ABSOLUTE/PATH/mlflow.db)")
        return self

    def run_folder(self) -> RunFolder:
        """The chain's run folder: `<output_dir>/<run_name>`, a local path or object storage (pipeline.storage)."""
        return RunFolder.at(self.output_dir) / self.run_name

    def exports_plain_lora(self) -> bool:
        """False only for ProCL's reference-fidelity variant, whose MLP stays in the model at inference:
        it is scored unmerged and its chain ends without a peft adapter export."""
        return not (self.strategy.name == "procl" and self.strategy.procl.reference_mlp)

    def on_device(self, device: torch.device | str) -> ChainConfig:
        """This config with every precision setting settled for `device` (see `pipeline.hardware`): model.dtype
        'auto' is bf16 where bf16 is native, deepspeed.bf16 None follows it, evaluation.bf16 None follows
        training, and model.attn_implementation 'auto' is eager where a CPU computes in bf16."""
        dtype = self.model.on_device(device).dtype
        train_bf16 = dtype == "bfloat16" if self.deepspeed.bf16 is None else self.deepspeed.bf16
        score_bf16 = train_bf16 if self.evaluation.bf16 is None else self.evaluation.bf16
        model = self.model.model_copy(update={"dtype": dtype}).on_device(device, bf16_compute=train_bf16 or score_bf16)
        return self.model_copy(update={
            "model": model,
            "deepspeed": self.deepspeed.model_copy(update={"bf16": train_bf16}),
            "evaluation": self.evaluation.model_copy(update={"bf16": score_bf16}),
        })

    def scores_in_bf16(self) -> bool:
        """Evaluation under bf16 autocast (on the CPU unless the config was settled for another device)."""
        return bool(self.on_device("cpu").evaluation.bf16)

    def precision_note(self) -> str:
        """One line: the precision this config trains and scores with, and why (workers settle it on their own
        device; on a driver without the workers' GPUs it can only say how they will)."""
        if self.scaling.use_gpu and not torch.cuda.is_available():
            return ("precision: settled on each GPU worker (model.dtype auto: bf16 where the GPU supports it)"
                    if self.model.dtype == "auto" else f"precision: weights {self.model.dtype} (as configured)")
        device = "cuda" if self.scaling.use_gpu else "cpu"
        settled = self.on_device(device)
        train = "bf16 (DeepSpeed, fp32 master weights)" if settled.deepspeed.bf16 else "fp32"
        score = "bf16 autocast" if settled.evaluation.bf16 else "fp32"
        attention = settled.model.attn_implementation or "the model's default (sdpa)"
        auto = self.model.dtype == "auto" and self.deepspeed.bf16 is None
        because = f"auto: {bf16_support(device).why}" if auto else "as configured"
        return (f"precision: weights {settled.model.dtype}, training {train}, scoring {score}, "
                f"attention {attention} ({because})")

    def fingerprint(self) -> str:
        """What must not change when a chain is resumed: everything but where and how it runs."""
        frozen = self.model_dump(exclude={"scaling", "ray", "tracking", "evaluation"})
        return hashlib.sha256(json.dumps(frozen, sort_keys=True).encode()).hexdigest()[:16]


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `key.path=value` to the raw config (value parsed as YAML: numbers, bools, lists)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    path, raw = assignment.split("=", 1)
    set_path(data, path.strip(), yaml.safe_load(raw), where=f"--set {assignment!r}")


def set_path(data: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """Set `data[a][b][c] = value` for `dotted` = "a.b.c", creating sections as needed."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {key!r} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ChainConfig:
    """Read, override and validate a run config; errors name the file and the field path."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        data = read_yaml_mapping(Path(path), "config file", "a mapping of sections (model, stream, strategy, ...)", ConfigError, empty_ok=True)
    for assignment in overrides:
        apply_override(data, assignment)
    return validate_config(data, where)


def validate_config(data: dict[str, Any], where: str) -> ChainConfig:
    """Validate a raw config mapping; errors name `where` and the field path."""
    try:
        return ChainConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{where}: {validation_problems(error)}") from error

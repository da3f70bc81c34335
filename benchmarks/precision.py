"""Training-step speed and loss of fp32 vs bf16 configurations on this CPU, side by side.

    .venv/bin/python benchmarks/precision.py            # SmolLM2-135M, LoRA r=8 on q/v, batch 4 x 128, 12 steps (~8 min)
    .venv/bin/python benchmarks/precision.py --quick    # 4 steps (~3 min)
    .venv/bin/python benchmarks/precision.py --answer-tokens 0   # loss on every token (the reference code's setting)

Batches are shaped like the pipeline's: the loss is on the last `--answer-tokens` tokens of each row
(the answer; the prompt is masked, `training.mask_prompt`). Variants, each from the same initial
weights on the same batches:
- fp32: everything fp32 (the reference).
- autocast bf16: fp32 weights, forward under torch.autocast(cpu, bfloat16).
- bf16 base: frozen base weights in bf16, LoRA weights (the only trained ones) and optimizer in fp32.
- deepspeed bf16: the pipeline's `deepspeed.bf16: true` (ZeRO-2, one rank): bf16 model, fp32 master
  weights and optimizer state kept by DeepSpeed.
- "+ answer logits": the same, with the LM head and the loss on the answer positions only
  (`pipeline.preprocess.keep_labeled_logits`, what the pipeline's training does since 2026-11-29).
- "... + eager attention": deepspeed bf16 + answer logits with `model.attn_implementation: eager`
  (transformers' plain attention instead of torch's fused sdpa kernel, which is slow in bf16 here).
Steps are interleaved across variants (step i of every variant, then step i + 1), so machine noise
hits them alike; the median step time and tokens/s are compared with fp32, and the mean loss over
the last half of the steps shows whether a variant trains as well. Target: >= 2x fp32 tokens/s.
One JSON line last.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from common import step_benchmark_parser, training_batch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.hardware import cpu_name  # noqa: E402
from pipeline.models import ModelSpec, load_model_and_tokenizer  # noqa: E402
from pipeline.preprocess import keep_labeled_logits  # noqa: E402
from procl import LoraSettings, make_strategy  # noqa: E402

LORA = LoraSettings(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
LR = 5e-4


def _lora_model(base_dtype: torch.dtype, attention: str | None = None):
    base, _ = load_model_and_tokenizer(ModelSpec(attn_implementation=attention))
    base.to(base_dtype)
    torch.manual_seed(0)  # the same LoRA initialisation in every variant
    strategy = make_strategy("seq_lora", lora=LORA)
    model = strategy.build(base)
    for parameter in model.parameters():  # trained weights stay fp32 (peft would too: autocast_adapter_dtype)
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    strategy.before_task(model, 0)
    model.train()
    return model


def _inputs(batch: dict[str, torch.Tensor], answer_logits_only: bool) -> dict[str, torch.Tensor]:
    batch = {name: value for name, value in batch.items() if name != "segments"}  # a plain LoRA routes nothing
    return keep_labeled_logits(batch) if answer_logits_only else batch


class TorchVariant:
    def __init__(self, base_dtype: torch.dtype, autocast: bool, answer_logits_only: bool = False) -> None:
        self.model = _lora_model(base_dtype)
        self.autocast, self.answer_logits_only = autocast, answer_logits_only
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=LR)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(**_inputs(batch, self.answer_logits_only)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


class DeepSpeedVariant:
    """One-rank DeepSpeed bf16, configured as pipeline.runtime does."""

    def __init__(self, batch: int, answer_logits_only: bool = False, attention: str | None = None) -> None:
        import deepspeed

        from pipeline.config import ChainConfig
        from pipeline.runtime import deepspeed_config

        if not deepspeed.comm.is_initialized():
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            deepspeed.init_distributed(dist_backend="gloo")
        model = _lora_model(torch.float32, attention)
        config = ChainConfig.model_validate({"training": {"batch_size": batch, "lr": LR}, "deepspeed": {"zero_stage": 2, "bf16": True}})
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config))
        self.answer_logits_only = answer_logits_only

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        loss = self.engine(**_inputs(batch, self.answer_logits_only)).loss
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()


def main() -> None:
    args = step_benchmark_parser(__doc__, batch=4).parse_args()
    torch.set_num_threads(args.threads)
    steps = 4 if args.quick else 12

    variants = {
        "fp32": TorchVariant(torch.float32, autocast=False),
        "autocast bf16": TorchVariant(torch.float32, autocast=True),
        "bf16 base": TorchVariant(torch.bfloat16, autocast=False),
        "deepspeed bf16": DeepSpeedVariant(args.batch),
        "fp32 + answer logits": TorchVariant(torch.float32, autocast=False, answer_logits_only=True),
        "deepspeed bf16 + answer logits": DeepSpeedVariant(args.batch, answer_logits_only=True),
        "... + eager attention": DeepSpeedVariant(args.batch, answer_logits_only=True, attention="eager"),
    }
    vocab = variants["fp32"].model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    # a fixed small pool of batches, cycled: the loss must fall for a variant that trains
    pool = [training_batch(vocab, args.batch, args.length, args.answer_tokens, generator) for _ in range(2)]
    for variant in variants.values():  # warm-up (oneDNN kernel selection), not timed or scored
        variant.step(pool[0])

    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(steps):
        for name, variant in variants.items():
            started = time.perf_counter()
            losses[name].append(variant.step(pool[index % len(pool)]))
            times[name].append(time.perf_counter() - started)

    tokens = args.batch * args.length
    median = {name: statistics.median(t) for name, t in times.items()}
    late = {name: statistics.mean(l[steps // 2 :]) for name, l in losses.items()}
    print(f"{'variant':<31} {'s/step':>8} {'tokens/s':>9} {'vs fp32':>8} {'late loss':>10} {'first loss':>11}")
    for name in variants:
        print(f"{name:<31} {median[name]:>8.3f} {tokens / median[name]:>9.0f} {median['fp32'] / median[name]:>8.2f} "
              f"{late[name]:>10.4f} {losses[name][0]:>11.4f}")
    # what the shipped configs' `auto` runs here (pipeline training always keeps answer-only logits)
    auto = load_config(None)
    auto_variant = "... + eager attention" if auto.on_device("cpu").deepspeed.bf16 else "fp32 + answer logits"
    print(f"auto on this CPU: {auto_variant!r}, {median['fp32'] / median[auto_variant]:.2f}x fp32; {auto.precision_note()}")
    print(json.dumps({
        "benchmark": "precision",
        "auto_choice": auto.precision_note(), "auto_variant": auto_variant,
        "auto_speedup_vs_fp32": round(median["fp32"] / median[auto_variant], 3), "model": ModelSpec().name, "batch": args.batch, "length": args.length,
        "answer_tokens": args.answer_tokens, "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads, "steps": steps,
        "tokens_per_second": {name: round(tokens / m, 1) for name, m in median.items()},
        "speedup_vs_fp32": {name: round(median["fp32"] / m, 3) for name, m in median.items()},
        "late_mean_loss": {name: round(v, 4) for name, v in late.items()},
        "losses": {name: [round(x, 4) for x in l] for name, l in losses.items()},
    }))


if __name__ == "__main__":
    main()

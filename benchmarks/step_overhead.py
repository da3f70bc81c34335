"""ProCL's training-step cost vs a plain LoRA step, and vs the number of program memory slots.

    .venv/bin/python benchmarks/step_overhead.py            # SmolLM2-135M, batch 4 x 128, r = 16 (~4 min)
    .venv/bin/python benchmarks/step_overhead.py --quick    # fewer rounds (~1.5 min)

Every variant trains the same embedded model on the same batch (loss on the last `--answer-tokens`
tokens of each row, the LM head on those positions only, as the pipeline trains) through the strategy hooks the worker
loop calls (forward, extra loss, backward, AdamW step, after_optimizer_step: routing, protection loss,
EMA consolidation every `consolidate_every` steps). ProCL is measured on its third task, where program
memory is attached and earlier slot usage is protected (on task 1 ProCL is plain LoRA). Variants are
interleaved round by round and the median step time per variant is compared, so machine noise hits
them alike. Targets: ProCL / LoRA <= 1.05; step time flat in N (N = 2, 4, 8, 16). One JSON line last.
"""

from __future__ import annotations

import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from common import step_benchmark_parser, strategy_step, training_batch  # noqa: E402

from pipeline.hardware import cpu_name  # noqa: E402
from pipeline.models import ModelSpec, load_model_and_tokenizer  # noqa: E402
from procl import LoraSettings, ProCLConfig, make_strategy  # noqa: E402

RANK = 16


def build(variant: str, spec: ModelSpec):
    """(model, strategy, optimizer) ready to step: LoRA on its first task, ProCL on its third."""
    base, _ = load_model_and_tokenizer(spec)
    lora = LoraSettings(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "v_proj"])
    if variant == "lora":
        strategy = make_strategy("seq_lora", lora=lora)
        model = strategy.build(base)
        strategy.before_task(model, 0)
    else:
        strategy = make_strategy("procl", lora=lora, procl=ProCLConfig(num_slots=int(variant.split("=")[1])))
        model = strategy.build(base)
        for task in (0, 1):  # task 2 is the representative one: memory attached, earlier usage protected
            strategy.before_task(model, task)
            strategy.after_task(model, task, [])
        strategy.before_task(model, 2)
    model.train()
    # fused: one kernel per parameter group, as the pipeline's optimizer steps DeepSpeed's flat fp32 partitions; the
    # per-tensor loop (torch's CPU default) charged ProCL's 360 router tensors ~8 ms a step that the pipeline never pays
    optimizer = torch.optim.AdamW(strategy.param_groups(model, 1e-4), lr=1e-4, fused=True)
    return model, strategy, optimizer


def main() -> None:
    args = step_benchmark_parser(__doc__, batch=4).parse_args()
    torch.set_num_threads(args.threads)
    rounds, steps = (3, 2) if args.quick else (6, 3)

    spec = ModelSpec()
    variants = ["lora", "procl N=2", "procl N=4", "procl N=8", "procl N=16"]
    built = {v: build(v, spec) for v in variants}
    vocab = built["lora"][0].config.vocab_size
    batch = training_batch(vocab, args.batch, args.length, args.answer_tokens, torch.Generator().manual_seed(0))
    for v in variants:  # warm-up: allocator, first-call overheads
        strategy_step(*built[v], batch)

    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            started = time.perf_counter()
            for _ in range(steps):
                strategy_step(*built[v], batch)
            times[v].append((time.perf_counter() - started) / steps)

    median = {v: statistics.median(t) for v, t in times.items()}
    print(f"{'variant':<12} {'median s/step':>14} {'vs LoRA':>8}")
    for v in variants:
        print(f"{v:<12} {median[v]:>14.3f} {median[v] / median['lora']:>8.3f}")
    slots = {v.split("=")[1]: median[v] for v in variants if v != "lora"}
    print(json.dumps({
        "benchmark": "step_overhead",
        "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype": str(built["lora"][0].dtype).removeprefix("torch."),
        "model": spec.name, "batch": args.batch, "length": args.length, "answer_tokens": args.answer_tokens, "rank": RANK,
        "threads": args.threads,
        "rounds": rounds, "steps_per_round": steps,
        "seconds_per_step": {v: round(m, 4) for v, m in median.items()},
        "ratio_procl_n4_vs_lora": round(median["procl N=4"] / median["lora"], 3),
        "ratio_n16_vs_n2": round(slots["16"] / slots["2"], 3),
    }))


if __name__ == "__main__":
    main()

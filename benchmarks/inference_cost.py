"""Inference cost of a ProCL-trained model: the exported adapter merged into the base vs the base itself.

    .venv/bin/python benchmarks/inference_cost.py                     # trains a small ProCL adapter first (~3 min)
    .venv/bin/python benchmarks/inference_cost.py --adapter runs/demo-procl/adapter
    .venv/bin/python benchmarks/inference_cost.py --quick

ProCL consolidates its program memory into one plain LoRA, exported as a standard peft adapter, so
after `merge_and_unload()` the model is the base architecture with changed weights: forward latency
should equal the base model's (target ratio 1.00 within noise). For scale, the same adapter loaded
unmerged (peft's LoRA layers in the forward) is timed too. Without `--adapter`, a ProCL adapter is
trained for two short tasks on the embedded SmolLM2-135M (routing, consolidation, export: the real
path), so the merged weights really differ from the base. The script checks merged and unmerged give
the same logits before it prints timings. Variants are interleaved round by round; medians compared.
One JSON line last.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import step_benchmark_parser, strategy_step  # noqa: E402
from peft import PeftModel  # noqa: E402

from pipeline.models import ModelSpec, load_model_and_tokenizer  # noqa: E402
from procl import LoraSettings, ProCLConfig, make_strategy  # noqa: E402


def train_procl_adapter(spec: ModelSpec, out: Path, steps: int) -> Path:
    """Two short ProCL tasks on random token batches, then the consolidated export."""
    base, _ = load_model_and_tokenizer(spec)
    strategy = make_strategy("procl", lora=LoraSettings(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                             procl=ProCLConfig(num_slots=4))
    model = strategy.build(base)
    generator = torch.Generator().manual_seed(0)
    for task in (0, 1):
        strategy.before_task(model, task)
        model.train()
        optimizer = torch.optim.AdamW(strategy.param_groups(model, 1e-3), lr=1e-3)
        for _ in range(steps):
            ids = torch.randint(task * 1000, task * 1000 + 1000, (2, 32), generator=generator)
            strategy_step(model, strategy, optimizer, {"input_ids": ids, "labels": ids})
        strategy.after_task(model, task, [])
    return strategy.export(model, out)


@torch.inference_mode()
def forward(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def main() -> None:
    parser = step_benchmark_parser(__doc__, batch=8)
    parser.add_argument("--adapter", type=Path, help="an exported adapter folder (default: train a small one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds, repeats = (4, 2) if args.quick else (10, 3)
    spec = ModelSpec()

    with tempfile.TemporaryDirectory(prefix="procl-inference-") as tmp:
        adapter = args.adapter or train_procl_adapter(spec, Path(tmp) / "adapter", steps=2 if args.quick else 6)
        base, _ = load_model_and_tokenizer(spec)
        unmerged = PeftModel.from_pretrained(load_model_and_tokenizer(spec)[0], str(adapter)).eval()
        merged = PeftModel.from_pretrained(load_model_and_tokenizer(spec)[0], str(adapter)).merge_and_unload().eval()
    models = {"base": base.eval(), "merged ProCL": merged, "unmerged LoRA": unmerged}
    assert type(merged) is type(base), f"merged model is {type(merged).__name__}, not {type(base).__name__}"

    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(1))
    merged_logits, unmerged_logits, base_logits = forward(merged, ids), forward(unmerged, ids), forward(base, ids)
    same_function = (merged_logits - unmerged_logits).abs().max().item()
    changed = (merged_logits - base_logits).abs().max().item()
    assert same_function < 1e-3, f"merged and unmerged logits differ by {same_function}"

    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            started = time.perf_counter()
            for _ in range(repeats):
                forward(model, ids)
            times[name].append((time.perf_counter() - started) / repeats)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{'model':<14} {'median s/forward':>17} {'vs base':>8}")
    for name in models:
        print(f"{name:<14} {median[name]:>17.4f} {median[name] / median['base']:>8.3f}")
    print(f"max |merged - unmerged| logit {same_function:.2e}; max |merged - base| logit {changed:.3f} (the adapter is not a no-op)")
    print(json.dumps({
        "benchmark": "inference_cost", "model": spec.name, "batch": args.batch, "length": args.length, "threads": args.threads,
        "rounds": rounds, "seconds_per_forward": {k: round(v, 5) for k, v in median.items()},
        "ratio_merged_vs_base": round(median["merged ProCL"] / median["base"], 3),
        "ratio_unmerged_vs_base": round(median["unmerged LoRA"] / median["base"], 3),
        "max_logit_diff_merged_vs_unmerged": same_function, "max_logit_diff_merged_vs_base": changed,
    }))


if __name__ == "__main__":
    main()

"""training.packing: a ProCL training step on packed micro-batches vs the same micro-batches padded.

    .venv/bin/python benchmarks/packing.py            # SmolLM2-135M, the demo stream's rows, batch 8 (~4 min)
    .venv/bin/python benchmarks/packing.py --quick    # fewer rounds (~2 min)

Two copies of the embedded model, each a ProCL chain on its second task (program memory attached, routing
on), train on the same micro-batches of real training rows (every task of the config's stream, tokenized as
the workers tokenize them): one padded to each micro-batch's longest row, one packed into rows of
max_length (`pipeline.preprocess.pack_examples`). Steps are interleaved round by round and the median step
time of each is compared, so machine noise hits both alike. Printed side by side: the tokens each computes
per micro-batch (padding included), the median step time, and how far apart the two runs' losses are (the
same examples and loss: at the first step, from the same weights, float rounding only; later, that
rounding compounded by training). One JSON line last. `--set stream.path=... --set training.max_length=...`
measures another stream.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import strategy_step  # noqa: E402

from pipeline.chain import select_tasks  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.hardware import cpu_name  # noqa: E402
from pipeline.models import load_model_and_tokenizer  # noqa: E402
from pipeline.preprocess import TrainingCollate  # noqa: E402
from pipeline.tokenizing import TokenizeBatch  # noqa: E402
from procl import LoraSettings, ProCLConfig, make_strategy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build(config):
    """(model, strategy, optimizer): ProCL on its second task, from the same seed for every copy."""
    base, tokenizer = load_model_and_tokenizer(config.model)
    strategy = make_strategy("procl", lora=LoraSettings(r=8, target_modules=["q_proj", "v_proj"]), procl=ProCLConfig(num_slots=4))
    model = strategy.build(base)
    strategy.before_task(model, 0)
    strategy.after_task(model, 0, [])
    strategy.before_task(model, 1)
    model.train()
    return model, strategy, torch.optim.AdamW(strategy.param_groups(model, 1e-4), lr=1e-4), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="examples per micro-batch (training.batch_size)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="a config override, e.g. stream.path=...")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds, steps = (3, 3) if args.quick else (6, 4)

    config = load_config(args.config, [f"training.batch_size={args.batch}", *args.set]).on_device("cpu")
    max_length, bf16 = config.training.max_length, config.deepspeed.bf16
    texts = [pair for task in select_tasks(config) for pair in task.training_texts()]
    padded_run, packed_run = build(config), build(config)
    tokenize = TokenizeBatch(lambda: padded_run[3], max_length, config.training.mask_prompt)
    rows = tokenize({"prompt": np.array([p for p, _ in texts], dtype=object), "continuation": np.array([c for _, c in texts], dtype=object)})
    order = np.random.default_rng(0).permutation(len(texts))
    picks = [order[i * args.batch:(i + 1) * args.batch] for i in range(len(order) // args.batch)][: rounds * steps + 1]
    micro_batches = [{name: rows[name][pick] for name in rows} for pick in picks]
    padded = [TrainingCollate()(b) for b in micro_batches]
    packed = [TrainingCollate(pack_to=max_length)(b) for b in micro_batches]

    losses: dict[str, list[float]] = {"padded": [], "packed": []}
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    runs = {"padded": (padded_run, padded), "packed": (packed_run, packed)}
    for name, (run, batches) in runs.items():  # warm-up on the first micro-batch
        losses[name].append(strategy_step(*run[:3], batches[0], bf16))
    for r in range(rounds):
        for name, (run, batches) in runs.items():
            started = time.perf_counter()
            for k in range(1 + r * steps, 1 + (r + 1) * steps):
                losses[name].append(strategy_step(*run[:3], batches[k], bf16))
            times[name].append((time.perf_counter() - started) / steps)

    used = slice(0, rounds * steps + 1)
    tokens = {name: statistics.mean(int(b["input_ids"].numel()) for b in batches[used]) for name, (_, batches) in runs.items()}
    real = statistics.mean(int(b["attention_mask"].sum()) for b in padded[used])
    median = {name: statistics.median(t) for name, t in times.items()}
    first_gap = abs(losses["packed"][0] - losses["padded"][0])  # the same weights: arithmetic alone
    gap = max(abs(a - b) for a, b in zip(losses["packed"], losses["padded"]))  # bf16 rounding, compounded by training
    print(f"{'':<8} {'tokens/micro-batch':>19} {'median s/step':>14}")
    for name in runs:
        print(f"{name:<8} {tokens[name]:>19.0f} {median[name]:>14.3f}")
    print(f"real tokens per micro-batch {real:.0f}; packed / padded: tokens {tokens['packed'] / tokens['padded']:.3f}, "
          f"step time {median['packed'] / median['padded']:.3f}; loss gap at the first step {first_gap:.2e}, "
          f"largest over {len(losses['packed'])} steps {gap:.2e}")
    print(json.dumps({
        "benchmark": "packing",
        "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "model": config.model.name, "bf16": bf16, "threads": args.threads,
        "stream": str(config.stream.path), "batch": args.batch, "max_length": max_length,
        "rounds": rounds, "steps_per_round": steps,
        "tokens_per_micro_batch": {name: round(t, 1) for name, t in tokens.items()}, "real_tokens_per_micro_batch": round(real, 1),
        "seconds_per_step": {name: round(m, 4) for name, m in median.items()},
        "ratio_tokens_packed_vs_padded": round(tokens["packed"] / tokens["padded"], 3),
        "ratio_step_packed_vs_padded": round(median["packed"] / median["padded"], 3),
        "first_step_loss_gap": first_gap, "largest_loss_gap": gap,
    }))


if __name__ == "__main__":
    main()

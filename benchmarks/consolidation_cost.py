"""ProCL's consolidation under DeepSpeed ZeRO-2 on 2 gloo ranks: all factors' pulls with one collective
(`procl.distributed.lerp_full`, what the pipeline runs) vs the same update through whole parameters (`read_full` /
`write_full`: collectives per factor), side by side in one run; and the whole ProCL step (forward, backward, optimizer
step, consolidation) against a plain LoRA step (seq_lora) under the same engine settings, as the pipeline trains.

    .venv/bin/python benchmarks/consolidation_cost.py            # 8 steps (~1.5 min)
    .venv/bin/python benchmarks/consolidation_cost.py --quick    # 4 steps
    .venv/bin/python benchmarks/consolidation_cost.py --stages 2 3   # ZeRO-3 too (there both are the same path)

SmolLM2-135M's architecture with random weights (vocab cut to 4096: the head does not matter here) in bf16, ProCL
N = 4 on q_proj and v_proj (r = 16, 60 LoRA layers, 120 program factors), its third task (program memory attached),
batch 4 x 64 a rank. Each step: forward + backward, the optimizer step, then both consolidations in turn (each
timed; applying two is harmless for timing); beside it, the same model as seq_lora on its first task takes a step under
its own engine (alternating which goes first). Medians over the steps after the first two. One JSON line last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.hardware import cpu_name  # noqa: E402


def per_parameter_consolidation(model, engine) -> None:
    """The update through whole parameters: W <- consolidate(W, W_exec) with read_full / write_full per factor."""
    from procl import equations as eq
    from procl import model as memory
    from procl.distributed import read_full, write_full

    for _, factor in memory.program_factors(model):
        weight = read_full(factor.weight, engine=engine)
        write_full(factor.weight, eq.consolidate(weight, factor.executing_weight(weight), factor.ema_lambda), engine=engine)


def worker(rank: int, port: int, stage: int, steps: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from procl import LoraSettings, ProCLConfig, make_strategy
    from procl import model as memory

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(minutes=5))
    config = LlamaConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=256)
    lora = LoraSettings(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    engines = {}
    for name, tasks_before in (("procl", (0, 1)), ("seq_lora", ())):
        torch.manual_seed(0)
        strategy = make_strategy(name, lora=lora, **({"procl": ProCLConfig(num_slots=4)} if name == "procl" else {}))
        model = strategy.build(LlamaForCausalLM(config))
        for task in tasks_before:
            strategy.before_task(model, task)
            strategy.after_task(model, task, [])
        strategy.before_task(model, len(tasks_before))  # ProCL's third task: program memory attached
        optimizer = torch.optim.AdamW(strategy.param_groups(model, 1e-4), lr=1e-4)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}})
        engine.train()
        engines[name] = (model, strategy, engine)
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(rank))
    seconds: dict[str, list[float]] = {"forward_backward": [], "optimizer_step": [], "consolidation_batched": [],
                                       "consolidation_per_parameter": [], "procl_step": [], "lora_forward_backward": [],
                                       "lora_optimizer_step": [], "lora_step": []}

    def lora_step() -> tuple[float, float, float]:
        _, _, engine = engines["seq_lora"]
        started = time.perf_counter()
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        backward = time.perf_counter()
        engine.step()
        stepped = time.perf_counter()
        return backward - started, stepped - backward, stepped - started

    model, strategy, engine = engines["procl"]
    for step in range(steps):
        lora_first = step % 2 == 0
        lora_seconds = lora_step() if lora_first else ()
        started = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        extra = strategy.extra_loss(model)
        engine.backward(loss if extra is None else loss + extra)
        backward = time.perf_counter()
        engine.step()
        stepped = time.perf_counter()
        memory.consolidate(model, engine)  # syncs the routing statistics, then every factor's pull at once (lerp_full)
        batched = time.perf_counter()
        per_parameter_consolidation(model, engine)  # the same statistics, through whole parameters one by one
        per_parameter = time.perf_counter()
        lora_seconds = lora_seconds if lora_first else lora_step()
        if step >= 2:
            measured = (backward - started, stepped - backward, batched - stepped, per_parameter - batched,
                        batched - started, *lora_seconds)
            for key, value in zip(seconds, measured):
                seconds[key].append(value)
    if rank == 0:
        Path(out).write_text(json.dumps({key: statistics.median(values) for key, values in seconds.items()}))
    for _, _, engine in engines.values():
        engine.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stages", type=int, nargs="+", default=[2], choices=[1, 2, 3])
    args = parser.parse_args()
    steps = 4 if args.quick else 8
    results = {}
    for stage in args.stages:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = Path(f"/tmp/consolidation_cost_zero{stage}.json")
        mp.spawn(worker, args=(port, stage, steps, str(out)), nprocs=2, join=True)
        results[f"zero{stage}"] = json.loads(out.read_text())
        out.unlink()
    print(f"{'ZeRO':<6} {'fwd+bwd s':>10} {'step s':>8} {'batched s':>10} {'per-param s':>12} {'ratio':>6} {'batched/step':>13}"
          f" {'LoRA fwd+bwd s':>15} {'LoRA opt s':>12} {'ProCL/LoRA':>11}")
    for name, r in results.items():
        print(f"{name:<6} {r['forward_backward']:>10.3f} {r['optimizer_step']:>8.3f} {r['consolidation_batched']:>10.3f} "
              f"{r['consolidation_per_parameter']:>12.3f} {r['consolidation_per_parameter'] / r['consolidation_batched']:>6.1f} "
              f"{r['consolidation_batched'] / r['procl_step']:>13.3f} {r['lora_forward_backward']:>15.3f} "
              f"{r['lora_optimizer_step']:>12.3f} {r['procl_step'] / r['lora_step']:>11.3f}")
    print(json.dumps({
        "benchmark": "consolidation_cost", "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype": "bfloat16", "ranks": 2, "steps": steps,
        "seconds": {name: {k: round(v, 4) for k, v in r.items()} for name, r in results.items()},
        "per_parameter_over_batched": {name: round(r["consolidation_per_parameter"] / r["consolidation_batched"], 1) for name, r in results.items()},
        "procl_step_over_lora_step": {name: round(r["procl_step"] / r["lora_step"], 3) for name, r in results.items()},
    }))


if __name__ == "__main__":
    main()

"""The GPU path on one GPU, without Ray: the worker runtime's own functions (`pipeline.runtime`), in one process.

    bash scripts/gpu_check.sh --prepare                  # here: the wheels the GPU machine lacks, into .gpu_check/site
    bash scripts/gpu_check.sh                            # on the GPU machine (the device tool carries .gpu_check/site)
    .venv/bin/python scripts/gpu_check.py --device cpu --quick    # this script's own check, on a CPU

A lent GPU machine has torch, transformers and peft but no Ray (its wheel is too big to carry), so this runs what a
Ray Train worker runs on its GPU, minus Ray: the base model loaded once on the device in bf16 (`model.dtype: auto`),
then per task the strategy's adapters attached at the chain's state, trained (`train_steps`), scored on the same
model (`score`) and detached. Models are built from a config with random weights (speed, memory and placement need
no trained weights): SmolLM2-135M's architecture and a Llama of about 1B parameters; the tasks are generated.
ProCL and seq_lora train with a plain torch engine; ProCL again under DeepSpeed ZeRO-2 (one rank) when DeepSpeed
was carried. It checks that the weights and the tensors scoring reads are on the device, and prints, measured side
by side in this run: ProCL step / LoRA step (ProCL's tasks with program memory, against seq_lora's same tasks),
merged ProCL forward / base forward (the exported adapter merged: no extra inference cost), training tokens/s,
peak GPU memory and evaluation's share of the time. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the GPU machine has no install of this project
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.models import ModelSpec, load_tokenizer  # noqa: E402
from pipeline.preprocess import TrainingCollate  # noqa: E402
from pipeline.tokenizing import TokenizeBatch  # noqa: E402
from pipeline.runtime import load_base_model, lr_schedule, score, train_steps  # noqa: E402
from pipeline.scoring import attach_strategy  # noqa: E402
from pipeline.streams import Task  # noqa: E402

ARCHITECTURES = {  # LlamaConfig fields
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "tie_word_embeddings": True},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "tie_word_embeddings": True},
}
VOCAB = 49152  # SmolLM2's; the tiny tokenizer's ids are a subset
LABELS = ["sports", "business", "technology", "politics"]
WORDS = "the team won match shares rose after report new phone faster chip minister announced policy taxes".split()


class TorchEngine:
    """What `train_steps` needs of a DeepSpeed engine, in plain torch (DeepSpeed may not be on the GPU machine):
    forward, backward, and an optimizer step with the pipeline's gradient clipping (1.0) and LR schedule."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule) -> None:
        self.model, self.optimizer, self.schedule = model, optimizer, schedule(optimizer)
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def __call__(self, **batch: torch.Tensor):
        return self.model(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def destroy(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def generated_tasks(count: int, sizes: dict[str, int], seed: int = 0) -> list[Task]:
    """Classification tasks of random word sequences, each task its own label words' order."""
    rng = np.random.default_rng(seed)
    tasks = []
    for index in range(count):
        splits = {split: [{"text": " ".join(rng.choice(WORDS, size=int(rng.integers(8, 24)))), "target": str(rng.choice(LABELS))}
                          for _ in range(size)] for split, size in sizes.items()}
        tasks.append(Task(name=f"generated{index}", instruction=f"Classify the text ({index}).", metric="accuracy",
                          answers=LABELS, splits=splits))
    return tasks


def write_random_model(architecture: str, folder: Path, device: torch.device) -> Path:
    """A Llama with random weights in bf16 and the tiny tokenizer, saved as a model folder (loaded as a user's is)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(ModelSpec(name="tiny-llama"))
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **ARCHITECTURES[architecture])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_chain(model_dir: Path, strategy_name: str, tasks: list[Task], device: torch.device, args, deepspeed=None) -> dict:
    """One chain through the worker runtime: {step_s per task, tokens, train_s, eval_s, peak memory, placement}."""
    config = load_config(None, [
        f"model.name={model_dir}", f"strategy.name={strategy_name}", "strategy.lora.r=8", "strategy.procl.num_slots=4",
        f"training.batch_size={args.batch}", "training.lr=0.001", "training.max_length=128", "deepspeed.zero_stage=2",
        f"evaluation.batch_size={args.batch * 2}",
    ]).on_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_model, tokenizer = load_base_model(config, device)
    weights_on_device = all(p.device.type == device.type for p in base_model.parameters())
    scoring_devices: set[str] = set()
    base_model.get_input_embeddings().register_forward_pre_hook(lambda _, inputs: scoring_devices.add(inputs[0].device.type))
    tokenize = TokenizeBatch(lambda: tokenizer, config.training.max_length, config.training.mask_prompt)
    collate = TrainingCollate(labeled_logits_only=True)
    state, step_s, tokens, train_s, eval_s = None, [], 0, 0.0, 0.0
    for index, task in enumerate(tasks):
        model, strategy = attach_strategy(config, base_model, state)
        torch.manual_seed(index)
        strategy.before_task(model, index)
        optimizer = torch.optim.AdamW(strategy.param_groups(model, config.training.lr), lr=config.training.lr)
        steps = len(task.splits["train"]) // args.batch
        schedule = lr_schedule(config, steps, 0)
        if deepspeed is None:
            engine = TorchEngine(model, optimizer, schedule)
        else:
            from pipeline.runtime import deepspeed_config

            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config), lr_scheduler=schedule)
        pairs = task.training_texts()
        rows = tokenize({"prompt": np.array([p for p, _ in pairs], dtype=object), "continuation": np.array([c for _, c in pairs], dtype=object)})
        batches = [{k: v.to(device) for k, v in collate({name: rows[name][i:i + args.batch] for name in rows}).items()}
                   for i in range(0, steps * args.batch, args.batch)]
        tokens += sum(int(b["attention_mask"].sum()) for b in batches)
        model.train()
        times: list[float] = []
        _sync(device)
        last = time.perf_counter()

        def after_step(_loss: float) -> None:
            nonlocal last
            _sync(device)
            now = time.perf_counter()
            times.append(now - last)
            last = now

        started = time.perf_counter()
        train_steps(engine, model, strategy, batches, {"steps": 0, "losses": []}, steps, 1, after_step)
        strategy.after_task(model, index, pairs, engine)
        state = strategy.state(model)
        _sync(device)
        train_s += time.perf_counter() - started
        step_s.append(statistics.median(times[1:] or times))  # the first step warms kernels up
        scoring_devices.clear()
        started = time.perf_counter()
        score(config, model, tokenizer, tasks[: index + 1], 0, 1)
        _sync(device)
        eval_s += time.perf_counter() - started
        on_device = scoring_devices == {device.type}
        engine.destroy()  # after scoring, as in the worker
        base_model = model.unload()
        print(f"  {strategy_name} task {index + 1}: step {step_s[-1] * 1000:.1f} ms, scoring on {sorted(scoring_devices)}", flush=True)
        weights_on_device = weights_on_device and on_device
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"config": config, "base_model": base_model, "tokenizer": tokenizer, "state": state, "step_s": step_s,
            "tokens_per_s": tokens / train_s, "train_s": train_s, "eval_s": eval_s, "peak_gib": peak, "on_device": weights_on_device}


def merged_forward_ratio(chain: dict, device: torch.device, args, repeats: int = 20) -> float:
    """Forward latency of the base model with ProCL's exported adapter merged, over the base model's."""
    from peft import PeftModel

    base_model, config = chain["base_model"], chain["config"]
    ids = torch.randint(0, 384, (args.batch, 128), device=device)

    def latency(model) -> float:
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=ids)
            _sync(device)
            started = time.perf_counter()
            for _ in range(repeats):
                model(input_ids=ids)
            _sync(device)
        return (time.perf_counter() - started) / repeats

    base_s = latency(base_model.eval())
    model, strategy = attach_strategy(config, base_model, chain["state"])
    with tempfile.TemporaryDirectory() as folder:
        strategy.export(model, Path(folder) / "adapter")
        base_model = model.unload()
        merged = PeftModel.from_pretrained(base_model, str(Path(folder) / "adapter")).merge_and_unload()
    return latency(merged.eval()) / base_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="the tiny architecture only, small tasks (checks this script)")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    device = torch.device(args.device)
    transformers.utils.logging.disable_progress_bar()  # a loading bar per model load
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import torch.distributed as dist

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29571"})
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # `score` gathers counts over the ranks
    try:
        import deepspeed

        if device.type == "cpu":
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    except ImportError:
        deepspeed = None
    sizes = {"train": 8 * args.batch, "validation": 16, "test": 32} if not args.quick else {"train": 2 * args.batch, "validation": 4, "test": 4}
    tasks = generated_tasks(args.tasks, sizes)
    architectures = ["tiny"] if args.quick else ["smollm2-135m", "llama-1b"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"device {name}, torch {torch.__version__}, DeepSpeed {'carried' if deepspeed else 'not carried'}; "
          f"{args.tasks} generated tasks of {sizes['train']} training examples")
    results = {}
    with tempfile.TemporaryDirectory(prefix="procl-gpu-check-") as tmp:
        for architecture in architectures:
            model_dir = write_random_model(architecture, Path(tmp) / architecture, device)
            chains = {strategy: run_chain(model_dir, strategy, tasks, device, args) for strategy in ("seq_lora", "procl")}
            lora, procl = chains["seq_lora"], chains["procl"]
            memory_steps = slice(1, None)  # ProCL's first task is plain LoRA; program memory from task 2 on
            row = {
                "procl_step_over_lora_step": statistics.mean(procl["step_s"][memory_steps]) / statistics.mean(lora["step_s"][memory_steps]),
                "merged_procl_forward_over_base_forward": merged_forward_ratio(procl, device, args),
                "lora_step_ms": 1000 * statistics.mean(lora["step_s"][memory_steps]),
                "procl_step_ms": 1000 * statistics.mean(procl["step_s"][memory_steps]),
                "training_tokens_per_s": {s: round(c["tokens_per_s"]) for s, c in chains.items()},
                "peak_gpu_memory_gib": {s: c["peak_gib"] and round(c["peak_gib"], 2) for s, c in chains.items()},
                "evaluation_share": {s: round(c["eval_s"] / (c["eval_s"] + c["train_s"]), 3) for s, c in chains.items()},
                "on_device": all(c["on_device"] for c in chains.values()),
                "dtype": procl["config"].model.dtype,
            }
            if deepspeed is not None:
                zero2 = run_chain(model_dir, "procl", tasks, device, args, deepspeed)
                row["deepspeed_zero2_procl_step_ms"] = 1000 * statistics.mean(zero2["step_s"][memory_steps])
                row["on_device"] = row["on_device"] and zero2["on_device"]
            results[architecture] = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
            del chains
    print(f"\n{'architecture':<14} {'ProCL/LoRA step':>15} {'merged/base fwd':>15} {'LoRA ms':>8} {'ProCL ms':>8} {'tokens/s (ProCL)':>16} "
          f"{'peak GiB':>8} {'eval share':>10} {'on device':>9}")
    for architecture, row in results.items():
        print(f"{architecture:<14} {row['procl_step_over_lora_step']:>15.3f} {row['merged_procl_forward_over_base_forward']:>15.3f} "
              f"{row['lora_step_ms']:>8.1f} {row['procl_step_ms']:>8.1f} {row['training_tokens_per_s']['procl']:>16} "
              f"{str(row['peak_gpu_memory_gib']['procl']):>8} {row['evaluation_share']['procl']:>10} {str(row['on_device']):>9}")
    print(json.dumps({"check": "gpu_check", "device": name, "deepspeed": deepspeed is not None, "tasks": args.tasks, "results": results}))
    dist.destroy_process_group()
    return 0 if all(row["on_device"] for row in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Method-level demo: a continual chain of synthetic classification tasks on a tiny random Llama.

Runs every strategy through the same hooks, fills the accuracy matrix (zero-shot row first) and
prints AA / BWT / forgetting side by side. Seconds on a laptop CPU; no downloads. It exercises the
method library only; the Ray + DeepSpeed + MLflow chain on the real embedded model is the main job.

    .venv/bin/python scripts/method_demo.py [--strategies procl seq_lora ...] [--steps 60]
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from procl import LoraSettings, ProCLConfig, make_strategy, metrics

VOCAB, LENGTH, CUE = 64, 8, 0
BLOCK = 12
TASK_MARKERS = (1, 2, 3, 4)
VERBALIZERS = ((56, 57), (58, 59), (60, 61), (62, 63))  # each task its own label words, as in real streams


def task_examples(task: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Task t: class c inputs draw their tokens from vocabulary block (t + c) mod 4 of tokens 8..55.

    Neighbouring tasks see the same block with opposite classes, so learning task t+1 pulls the
    shared representation against task t: naive sequential training forgets.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (count,), generator=generator)
    block = (task + labels) % 4
    body = 8 + block[:, None] * BLOCK + torch.randint(0, BLOCK, (count, LENGTH), generator=generator)
    marker = torch.full((count, 1), TASK_MARKERS[task])
    cue = torch.full((count, 1), CUE)
    return torch.cat([marker, body, cue], dim=1), labels


def loss_on_answer(model, ids: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer token (the label's verbalizer) after the cue."""
    return torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, -1], answers)


@torch.no_grad()
def accuracy(model, task: int, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Label scoring: argmax over the task's own verbalizers."""
    model.eval()
    scores = model(input_ids=ids).logits[:, -1][:, list(VERBALIZERS[task])]
    return (scores.argmax(-1) == labels).float().mean().item()


def run_chain(name: str, tasks: int, steps: int, lr: float, seed: int) -> list[list[float]]:
    torch.manual_seed(seed)
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    )
    options = {"procl": ProCLConfig()} if name == "procl" else {}
    lora = LoraSettings(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    strategy = make_strategy(name, lora=lora, seed=seed, **options)
    model = strategy.build(base)
    evaluation = [task_examples(t, 256, seed=10_000 + t) for t in range(tasks)]
    matrix = [[accuracy(model, t, *evaluation[t]) for t in range(tasks)]]
    train_sets = [task_examples(t, steps * 16, seed=seed * 100 + t) for t in range(tasks)]
    for task in range(tasks):
        strategy.before_task(model, task)
        own = [[task, i] for i in range(len(train_sets[task][0]))]  # JSON-able refs: replay stores them
        examples = strategy.training_examples(task, own)
        optimizer = torch.optim.AdamW(strategy.param_groups(model, lr))
        model.train()
        for step in range(steps):
            refs = examples[(step * 16) % len(examples) :][:16]
            ids = torch.stack([train_sets[t][0][i] for t, i in refs])
            answers = torch.tensor([VERBALIZERS[t][train_sets[t][1][i]] for t, i in refs])
            loss = loss_on_answer(model, ids, answers)
            extra = strategy.extra_loss(model)
            loss = loss if extra is None else loss + extra
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            strategy.after_optimizer_step(model)
        strategy.after_task(model, task, own)
        matrix.append([accuracy(model, t, *evaluation[t]) for t in range(tasks)])
    return matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=["procl", "seq_lora", "inc_lora", "o_lora"])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = {}
    for name in args.strategies:
        matrix = run_chain(name, args.tasks, args.steps, args.lr, args.seed)
        results[name] = metrics.summary(matrix) | {"matrix": matrix}
        print(f"{name:>10}: AA {results[name]['average_accuracy']:.3f}  BWT {results[name]['backward_transfer']:+.3f}  "
              f"forgetting {results[name]['forgetting']:.3f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

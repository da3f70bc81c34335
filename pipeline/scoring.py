"""What the chain scores: the model at a point of the chain, on the validation and test splits of tasks.

Runs where the model is: inside the chain's worker group for the zero-shot row and after each task
(each rank scores a shard of the examples and the counts are summed), and in the CLI's process for
`eval`. Per-example scoring is `pipeline.evaluation.answered_correctly`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config import ChainConfig
from pipeline.streams import Task
from procl import make_strategy

if TYPE_CHECKING:
    from pipeline.evaluation import Lockstep

SPLITS = ("validation", "test")
# {split: {task: [correct, scored]}}
Counts = dict[str, dict[str, list[int]]]


def attach_strategy(config: ChainConfig, base_model, state: tuple[dict, dict] | None):
    """(model, strategy): the strategy's adapters built onto `base_model` (in place, as peft does; `model.unload()`
    gives the bare base model back) at a chain state (tensors, metadata from `strategy.state`), or freshly
    initialised when `state` is None (the chain's start)."""
    strategy = make_strategy(config.strategy.name, seed=config.training.seed, **config.strategy.options())
    model = strategy.build(base_model)
    if state is not None:
        strategy.restore_state(model, *state)
    return model, strategy


def load_trained(config: ChainConfig, state: tuple[dict, dict] | None):
    """(model, tokenizer, strategy) at a chain state, or the base model when `state` is None (the zero-shot row)."""
    from pipeline.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(config.model)
    if state is None:
        return model, tokenizer, make_strategy(config.strategy.name, seed=config.training.seed, **config.strategy.options())
    model, strategy = attach_strategy(config, model, state)
    return model, tokenizer, strategy


def model_to_score(config: ChainConfig, state: tuple[dict, dict] | None):
    """(model, tokenizer) as inference will run it: merged into the base weights when the chain exports a
    plain LoRA (the scores are those of the exported model), else with the strategy's modules."""
    model, tokenizer, _ = load_trained(config, state)
    if state is not None and config.exports_plain_lora():
        model = model.merge_and_unload()
    return model, tokenizer


def count_correct(model, tokenizer, tasks: list[Task], config: ChainConfig, rank: int = 0, world_size: int = 1,
                  lockstep: Lockstep | None = None) -> Counts:
    """Correct answers and examples scored per split and task, over every `world_size`-th example from `rank`.

    With a `lockstep` (ranks sharing one ZeRO-3 model) every rank scores as many prompts per task: a shorter
    shard is topped up with copies of the task's first prompt, whose answers are not counted."""
    import torch

    from pipeline.evaluation import answered_correctly

    counts: Counts = {split: {} for split in SPLITS}
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.scores_in_bf16()):
        for task in tasks:
            prompts = {split: task.prompts(split)[rank::world_size] for split in SPLITS}
            # both splits in one call: their prompts are batched by length together (less padding)
            shard = [p for split in SPLITS for p in prompts[split]]
            targets = [t for split in SPLITS for t in task.targets(split)[rank::world_size]]
            top_up = lockstep.max(len(shard)) - len(shard) if lockstep else 0
            if top_up:
                first = next(split for split in SPLITS if task.prompts(split))
                shard += [task.prompts(first)[0]] * top_up
                targets += [task.targets(first)[0]] * top_up
            # a shard of a tiny task may hold no example
            correct = answered_correctly(
                model, tokenizer, shard, targets, task.metric, task.answers or None, config.evaluation.batch_size,
                config.evaluation.max_new_tokens, config.evaluation.candidate_pass_mib, lockstep,
            ) if targets else []
            for split in SPLITS:
                split_correct, correct = correct[: len(prompts[split])], correct[len(prompts[split]) :]
                counts[split][task.name] = [sum(split_correct), len(split_correct)]
    return counts


def scores_from_counts(shards: list[Counts]) -> dict[str, dict[str, float]]:
    """{split: {task: accuracy}} from the counts of every shard."""
    scores: dict[str, dict[str, float]] = {split: {} for split in SPLITS}
    for split in SPLITS:
        for name in shards[0][split]:
            correct, scored = (sum(shard[split][name][i] for shard in shards) for i in (0, 1))
            scores[split][name] = correct / scored
    return scores


def score_tasks(model, tokenizer, tasks: list[Task], config: ChainConfig) -> dict[str, dict[str, float]]:
    """{split: {task: score}} on the validation and test splits of `tasks`, in this process."""
    return scores_from_counts([count_correct(model, tokenizer, tasks, config)])


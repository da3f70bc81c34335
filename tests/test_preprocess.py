"""Ray Data preprocessing feeding a real Ray Train TorchTrainer (local Ray: 2 workers of 1 CPU, 1 CPU of ingest)."""

from __future__ import annotations

import json
import os
import uuid
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama

from pipeline.models import ModelSpec, accepts_logits_to_keep, load_model_and_tokenizer, load_tokenizer
from pipeline.preprocess import TrainingCollate, count_tokens, ingest_config, tokenized_dataset
from pipeline.tokenizing import IGNORE_INDEX, TokenizerLoader, build_training_row, tokenize_rows
from procl import LoraSettings, make_strategy
from pipeline.streams import load_stream

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "streams"
TINY = ModelSpec(name="tiny-llama")


def test_loss_is_masked_to_the_target_and_padding():
    ids, mask, labels = build_training_row([1, 2, 3, 4], [7, 8, 0], max_length=10, pad_id=0, mask_prompt=True, cue_ids=[4])
    assert ids == [1, 2, 3, 4, 7, 8, 0, 0, 0, 0]
    assert mask == [1] * 7 + [0] * 3
    assert labels == [IGNORE_INDEX] * 4 + [7, 8, 0] + [IGNORE_INDEX] * 3


def test_whole_sequence_loss_option_keeps_prompt_labels():
    _, _, labels = build_training_row([1, 2, 3], [7], max_length=5, pad_id=0, mask_prompt=False, cue_ids=[3])
    assert labels == [1, 2, 3, 7, IGNORE_INDEX]


def test_long_prompts_lose_their_middle_not_the_cue_or_target():
    prompt = list(range(100, 120))
    ids, _, labels = build_training_row(prompt, [7, 8], max_length=10, pad_id=0, mask_prompt=True, cue_ids=[118, 119])
    assert ids == [100, 101, 102, 103, 104, 105, 118, 119, 7, 8]
    assert labels[-2:] == [7, 8]
    with pytest.raises(ValueError, match="max_length=3 leaves no room"):
        build_training_row(prompt, [7, 8], max_length=3, pad_id=0, mask_prompt=True, cue_ids=[118, 119])


def test_a_micro_batch_is_cut_to_its_longest_row_and_knows_its_examples():
    import numpy as np

    batch = {
        "input_ids": np.array([[1, 2, 0, 0], [3, 0, 0, 0]]),
        "attention_mask": np.array([[1, 1, 0, 0], [1, 0, 0, 0]]),
        "labels": np.array([[-100, 2, -100, -100], [3, -100, -100, -100]]),
    }
    out = TrainingCollate()(batch)
    assert out["input_ids"].tolist() == [[1, 2], [3, 0]] and out["labels"].dtype == torch.int64
    assert out["segments"].tolist() == [[0, 0], [1, -1]]


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_labelled_positions_only_give_the_same_loss_and_gradients(make_model):
    """LM head and loss on the answer positions only (what training feeds the model): same loss and LoRA gradients."""
    import numpy as np

    rows = [build_training_row(list(range(10, 10 + n)), [5, 6, 7], max_length=16, pad_id=0, mask_prompt=True, cue_ids=[10])
            for n in (4, 9, 6)]
    numpy_batch = {name: np.array(column) for name, column in zip(("input_ids", "attention_mask", "labels"), zip(*rows))}
    strategy = make_strategy("seq_lora", lora=LoraSettings(r=4, target_modules=["q_proj", "v_proj"] if make_model is tiny_llama else ["c_attn"]))
    model = strategy.build(make_model())
    strategy.before_task(model, 0)
    assert accepts_logits_to_keep(model)
    results = []
    for collate in (TrainingCollate(), TrainingCollate(labeled_logits_only=True)):
        model.zero_grad()
        batch = collate(numpy_batch)
        loss = model(**{k: v for k, v in batch.items() if k != "segments"}).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (full_loss, full_grads), (kept_loss, kept_grads) = results
    assert batch["logits_to_keep"].sum() == 3 * 3  # in each of the 3 rows, the positions predicting 5, 6 and 7
    torch.testing.assert_close(kept_loss, full_loss, rtol=1e-6, atol=1e-6)
    for kept, full in zip(kept_grads, full_grads):
        torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-7)


def test_a_model_without_logits_to_keep_trains_on_whole_logits():
    class NoLogitsToKeep(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, labels=None):
            raise NotImplementedError

    assert not accepts_logits_to_keep(NoLogitsToKeep())


def test_a_tokenisation_task_loads_its_tokenizer_once_for_all_its_batches():
    import numpy as np

    loads = []

    def factory():
        loads.append(1)
        return load_tokenizer(TINY)

    batch = {"prompt": np.array(["Input: a\nAnswer:"]), "continuation": np.array([" yes"])}
    first = tokenize_rows(batch, factory, 32, True)
    second = tokenize_rows(batch, factory, 32, True)  # the same task's next batch: same factory object
    assert len(loads) == 1 and (first["input_ids"] == second["input_ids"]).all()
    other = partial(load_tokenizer, TINY)  # another task's factory (deserialized anew): loads its own
    assert (tokenize_rows(batch, other, 32, True)["labels"] == first["labels"]).all() and len(loads) == 1


def test_the_tokenising_function_and_its_tokenizer_unpickle_without_torch_or_transformers():
    """What Ray Data's split coordinator of every task unpickles before it streams: light, so it starts fast."""
    import subprocess
    import sys

    from ray import cloudpickle

    loader = TokenizerLoader.of(TINY)
    assert loader == TokenizerLoader.of(ModelSpec(name="tiny-llama")) and hash(loader) == hash(TokenizerLoader.of(TINY))
    assert loader().pad_token_id == load_tokenizer(TINY).pad_token_id
    payload = cloudpickle.dumps((tokenize_rows, loader, 32, True))
    probe = ("import pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
             "print([m for m in ('torch', 'transformers', 'peft', 'pipeline.models') if m in sys.modules])")
    imported = subprocess.run([sys.executable, "-c", probe], input=payload, capture_output=True, check=True).stdout.decode().strip()
    assert imported == "[]"


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(
        num_cpus=3,
        include_dashboard=False,
        object_store_memory=200 * 1024**2,
        _temp_dir=f"/tmp/ray-procl-{uuid.uuid4().hex[:6]}",
        # workers unpickle this module's loop function: let them import it
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent)])}},
    )
    yield ray
    ray.shutdown()


def _read_shard(config: dict) -> None:
    """A Ray Train worker: reads its shard as torch batches and runs the model's loss on them."""
    import ray.train

    model, _ = load_model_and_tokenizer(ModelSpec(name="tiny-llama"))
    rows, losses, widths = 0, [], []
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=4, collate_fn=TrainingCollate()):
        batch.pop("segments")
        rows += batch["input_ids"].shape[0]
        widths.append(batch["input_ids"].shape[1])
        losses.append(model(**batch).loss.item())
    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"rows": rows, "losses": losses, "widths": widths}))


def test_ray_data_streams_into_a_torch_trainer_beside_workers_that_hold_their_cpus(local_ray, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    task = load_stream(CONFIGS / "topics.yaml", "order1")[1]  # amazon reviews, real text
    dataset = tokenized_dataset(task.training_texts(), TokenizerLoader.of(TINY), max_length=1024)
    assert dataset.count() == 48
    tokenizer = load_tokenizer(TINY)
    answers = [tokenizer(" " + answer, add_special_tokens=False)["input_ids"] for answer in task.answers]
    for row in dataset.take(10):  # the loss sees exactly the answer word and EOS
        kept = [int(t) for t in row["labels"] if t != IGNORE_INDEX]
        assert kept[-1] == tokenizer.eos_token_id and kept[:-1] in answers
    assert count_tokens(dataset) > 48 * 10

    trainer = TorchTrainer(
        _read_shard,
        train_loop_config={"out": str(tmp_path)},
        # the workers hold 2 of the 3 CPUs; the lazy dataset is tokenised as they read it, on the third
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        datasets={"train": dataset},
        dataset_config=ingest_config(1.0),
        run_config=RunConfig(name=f"preprocess-{uuid.uuid4().hex[:8]}", storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sum(r["rows"] for r in results) == 48  # sharded, every row seen once
    assert all(r["rows"] > 0 for r in results)
    assert all(torch.isfinite(torch.tensor(loss)) for r in results for loss in r["losses"])
    assert max(w for r in results for w in r["widths"]) < 1024  # trimmed, not padded to max_length


def test_each_epoch_reads_a_shard_in_its_own_seeded_order_the_same_on_every_run(local_ray):
    import numpy as np
    import ray.data

    from pipeline.config import ChainConfig
    from pipeline.train_worker import _micro_batches

    rows = ray.data.from_items([{"input_ids": np.array([i, 1]), "attention_mask": np.array([1, 1]), "labels": np.array([i, 1])}
                                for i in range(40)])
    collate = TrainingCollate()

    def epochs(config: ChainConfig, task_index: int) -> list[list[int]]:
        order = [int(i) for batch in _micro_batches(rows.iterator(), config, task_index, collate, torch.device("cpu"))
                 for i in batch["input_ids"][:, 0]]
        return [order[e * 40 : (e + 1) * 40] for e in range(config.training.epochs)]

    config = ChainConfig.model_validate({"training": {"epochs": 3, "batch_size": 8, "seed": 5}})
    first = epochs(config, task_index=1)
    assert all(sorted(epoch) == list(range(40)) for epoch in first)  # every row once per epoch
    assert len({tuple(epoch) for epoch in first}) == 3 and tuple(range(40)) not in map(tuple, first)  # reshuffled each epoch
    assert epochs(config, task_index=1) == first  # seeded: a resumed task skips exactly the batches it trained on
    assert epochs(config, task_index=2)[0] != first[0]  # another task, another order
    unshuffled = ChainConfig.model_validate({"training": {"epochs": 2, "batch_size": 8, "shuffle_buffer": 0}})
    assert epochs(unshuffled, task_index=1) == [list(range(40))] * 2

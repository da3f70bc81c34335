"""training.packing: a micro-batch's examples packed into fewer rows train exactly as the padded micro-batch,
for ProCL too, whose routing must then see each example on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import VOCAB, tiny_gpt2, tiny_llama

from pipeline.preprocess import TrainingCollate, pack_examples
from pipeline.tokenizing import IGNORE_INDEX, build_training_row
from procl import LoraSettings, ProCLConfig, make_strategy
from procl import model as memory
from procl.layer import TokenExamples

LENGTHS = (9, 3, 14, 5, 7, 4)  # prompt tokens per example; each gets a 3-token target
MAX_LENGTH = 20


def padded_micro_batch(lengths=LENGTHS, max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(0)
    rows = [build_training_row([int(t) for t in generator.integers(3, VOCAB, n)], [5, 6, 7], max_length=max_length,
                               pad_id=0, mask_prompt=True, cue_ids=[3]) for n in lengths]
    return {name: np.array(column) for name, column in zip(("input_ids", "attention_mask", "labels"), zip(*rows))}


def test_packing_puts_every_example_whole_and_once_into_fewer_rows():
    batch = padded_micro_batch()
    packed = pack_examples(batch, MAX_LENGTH)
    lengths = batch["attention_mask"].sum(axis=1)
    assert packed["input_ids"].shape[0] < len(LENGTHS) and packed["input_ids"].shape[1] <= MAX_LENGTH
    assert (packed["segments"] >= 0).sum() == lengths.sum()  # no token lost, none added
    found = set()
    for row in range(packed["input_ids"].shape[0]):
        for segment in set(packed["segments"][row].tolist()) - {-1}:
            at = np.flatnonzero(packed["segments"][row] == segment)
            assert (np.diff(at) == 1).all()  # one example is contiguous
            assert packed["position_ids"][row, at].tolist() == list(range(len(at)))  # with its own positions
            tokens = packed["input_ids"][row, at].tolist()
            example = next(e for e in range(len(LENGTHS)) if batch["input_ids"][e, : lengths[e]].tolist() == tokens)
            # the same labels, except that the first one predicts nothing (it would follow the previous example)
            assert packed["labels"][row, at[0]] == IGNORE_INDEX
            assert packed["labels"][row, at[1:]].tolist() == batch["labels"][example, 1 : lengths[example]].tolist()
            found.add(example)
    assert found == set(range(len(LENGTHS))) and sorted(set(packed["segments"].ravel()) - {-1}) == list(range(len(LENGTHS)))


def test_an_example_that_fills_max_length_gets_a_row_of_its_own():
    packed = pack_examples(padded_micro_batch((17, 2)), MAX_LENGTH)  # 20 tokens and 5 tokens
    assert packed["input_ids"].shape == (2, MAX_LENGTH)


def test_routing_queries_average_an_examples_own_tokens_not_the_rows_padding():
    x = torch.randn(2, 5, 3)
    segments = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, -1, -1]])  # two examples packed in row 0, padding in row 1
    examples = TokenExamples.of(segments)
    means = examples.mean(x)
    torch.testing.assert_close(means, torch.stack([x[0, :2].mean(0), x[0, 2:].mean(0), x[1, :3].mean(0)]))
    per_token = examples.per_token(torch.tensor([[1.0], [2.0], [3.0]]))
    assert per_token[..., 0].tolist() == [[1, 1, 2, 2, 2], [3, 3, 3, 0, 0]]
    with pytest.raises(ValueError, match="does not match the micro-batch's segments"):
        examples.mean(torch.randn(2, 4, 3))


def test_unpacked_rows_route_each_row_as_its_example_and_layers_on_one_input_share_its_means():
    """One example a row (padding aside): the means are the same as packed rows get, taken by one batched matmul, and
    per-example values broadcast over each row's tokens; q/k/v (gate/up) read one tensor, whose means are taken once."""
    x = torch.randn(2, 5, 3)
    segments = torch.tensor([[0, 0, 0, 0, -1], [1, 1, -1, -1, -1]])
    examples = TokenExamples.of(segments)
    assert examples.row_weights is not None
    means = examples.mean(x)
    torch.testing.assert_close(means, torch.stack([x[0, :4].mean(0), x[1, :2].mean(0)]))
    assert examples.mean(x) is means
    again = examples.mean(x.clone())
    assert again is not means
    torch.testing.assert_close(again, means)
    assert examples.per_token(torch.tensor([[1.0], [2.0]])).shape == (2, 1, 1)
    assert TokenExamples.of(torch.tensor([[1, 1, -1], [0, 0, 0]])).row_weights is None  # example 1 in row 0


def _trained_strategy(name: str, make_model, options: dict):
    """A strategy on its second task (ProCL: program memory attached) with W moved off W0 and the slot keys off
    zero (uniform routing whatever the query), so that routing changes the loss and gets gradient."""
    targets = ["q_proj", "v_proj"] if make_model is tiny_llama else ["c_attn"]
    strategy = make_strategy(name, lora=LoraSettings(r=4, lora_alpha=8, target_modules=targets), **options)
    model = strategy.build(make_model())
    for task in (0, 1):
        strategy.before_task(model, task)
        if task == 0:
            strategy.after_task(model, task, [])
    torch.manual_seed(1)
    with torch.no_grad():
        for name_, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    model.train()
    for module in model.modules():  # GPT-2's dropout would make two forward passes differ
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, strategy


def _loss_and_gradients(model, strategy, batch: dict[str, torch.Tensor], route_by_example: bool = True):
    model.zero_grad()
    batch = dict(batch)
    segments = batch.pop("segments")
    with strategy.micro_batch(model, segments if route_by_example else None):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


STRATEGIES = {
    "seq_lora": ("seq_lora", {}),
    "procl": ("procl", {"procl": ProCLConfig(num_slots=2)}),
    "procl_fixed": ("procl", {"procl": ProCLConfig(num_slots=2, routing="fixed")}),
    "procl_reference": ("procl", {"procl": ProCLConfig(num_slots=2, formulation="reference", routed_factors="both")}),
}


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
def test_a_packed_micro_batch_trains_as_the_padded_one(strategy_name, make_model):
    name, options = STRATEGIES[strategy_name]
    model, strategy = _trained_strategy(name, make_model, options)
    batch = padded_micro_batch()
    padded_loss, padded_grads = _loss_and_gradients(model, strategy, TrainingCollate(labeled_logits_only=True)(batch))
    packed_batch = TrainingCollate(labeled_logits_only=True, pack_to=MAX_LENGTH)(batch)
    assert packed_batch["input_ids"].numel() < TrainingCollate()(batch)["input_ids"].numel()  # less computed
    packed_loss, packed_grads = _loss_and_gradients(model, strategy, packed_batch)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == padded_grads.keys()
    if name == "procl" and options["procl"].routing != "fixed":
        assert any("procl_router" in n or "router" in n for n in packed_grads)  # routing is trained and compared
    for parameter, gradient in packed_grads.items():
        torch.testing.assert_close(gradient, padded_grads[parameter], rtol=1e-4, atol=1e-6, msg=parameter)
    if name == "procl" and options["procl"].routing != "fixed":
        # the same packed rows routed per row mix their examples' queries: another loss
        mixed_loss, _ = _loss_and_gradients(model, strategy, packed_batch, route_by_example=False)
        assert not torch.isclose(mixed_loss, padded_loss, rtol=1e-4, atol=0)


def test_procl_routing_statistics_count_examples_not_rows():
    model, strategy = _trained_strategy("procl", tiny_llama, STRATEGIES["procl"][1])
    batch = padded_micro_batch()
    for collate in (TrainingCollate(), TrainingCollate(pack_to=MAX_LENGTH)):
        _loss_and_gradients(model, strategy, collate(batch))
    rhos = [router.last_rho for router in memory._routers(model)]
    assert all(rho.shape[0] == len(LENGTHS) for rho in rhos)


class _TorchEngine:
    """What `train_steps` calls of a DeepSpeed engine, in plain torch."""

    def __init__(self, model, optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def __call__(self, **batch):
        return self.model(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def test_train_steps_on_packed_micro_batches_follow_the_padded_run():
    from pipeline.runtime import train_steps

    batches = [padded_micro_batch(lengths) for lengths in (LENGTHS, (4, 12, 6, 8, 3, 10), (15, 2, 5, 5, 9, 6))]
    losses = {}
    for pack_to in (None, MAX_LENGTH):
        model, strategy = _trained_strategy("procl", tiny_llama, STRATEGIES["procl"][1])
        optimizer = torch.optim.AdamW(strategy.param_groups(model, 1e-2), lr=1e-2)
        progress = {"steps": 0, "losses": []}
        collate = TrainingCollate(labeled_logits_only=True, pack_to=pack_to)
        train_steps(_TorchEngine(model, optimizer), model, strategy, [collate(b) for b in batches], progress, 3, 1)
        losses[pack_to] = progress["losses"]
    assert len(losses[None]) == 3
    torch.testing.assert_close(torch.tensor(losses[MAX_LENGTH]), torch.tensor(losses[None]), rtol=1e-4, atol=1e-5)

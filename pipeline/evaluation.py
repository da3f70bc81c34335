"""Scoring a causal LM on one task: label scoring (classification) or greedy generation.

Tokenisation contract, shared by every function here so that scores are comparable: a prompt is
tokenised with the tokenizer's usual special tokens (a BOS where the tokenizer adds one) and a
candidate's continuation ``target_continuation(candidate)`` separately, without special tokens;
the model reads their concatenation. ``pipeline.preprocess`` tokenises training examples the same way.

Label scoring runs the prompts once (left-padded, so every prompt ends at the last column and its
KV cache can be continued directly) and then all K candidates of every prompt in one forward that
reuses the prompt cache repeated K times, instead of K full forwards of prompt + candidate
(``naive_label_log_likelihoods``, the reference the fast path must match). The prefix all prompts
share (a task's instruction) runs once per call, and prompts are batched by length, so little of the
compute goes to repeated or padded tokens.

Ranks that score shards of a task on one ZeRO-3-partitioned model pass a ``Lockstep``: every forward
gathers each layer's weights from all ranks, so they must run the same forward passes.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import string
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.distributed as dist

from pipeline.prompts import target_continuation

Metric = Literal["accuracy", "exact_match", "contains"]
METRICS: tuple[str, ...] = ("accuracy", "exact_match", "contains")

# What the candidate pass may hold at a time, by default: each (prompt, candidate) row carries its copy of the
# prompt's KV cache and its logits (candidate tokens x vocab floats). 256 rows of SmolLM2 prompts held ~1.5 GB,
# three copies of the model (benchmarks/worker_memory.py), so rows are chunked to fit this.
CANDIDATE_PASS_MIB = 256


class Lockstep:
    """The ranks of the default process group agreeing on what would otherwise depend on their own examples:
    how many examples each scores, the shared prefix's length, the candidate chunk size and when greedy
    decoding stops (as transformers' ``generate(synced_gpus=True)`` does). Under ZeRO-3 a rank that ran one
    forward pass fewer than the others would leave them waiting for its share of the weights."""

    def __init__(self, device: torch.device):
        self.device = device  # where the collective's tensor lives: cpu for gloo, the GPU for nccl

    def _all_reduce(self, value: int, op: dist.ReduceOp) -> int:
        tensor = torch.tensor([value], device=self.device)
        dist.all_reduce(tensor, op=op)
        return int(tensor.item())

    def min(self, value: int) -> int:
        return self._all_reduce(value, dist.ReduceOp.MIN)

    def max(self, value: int) -> int:
        return self._all_reduce(value, dist.ReduceOp.MAX)

    def any(self, flag: bool) -> bool:
        return bool(self.max(int(flag)))


# ----------------------------------------------------------------------------- tokenisation


def _prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    ids = [tokenizer(prompt).input_ids for prompt in prompts]
    for prompt, tokens in zip(prompts, ids):
        if not tokens:
            raise ValueError(f"prompt {prompt!r} tokenises to no tokens; expected at least one to predict the answer from")
    return ids


def _candidate_ids(tokenizer, candidates: Sequence[str]) -> list[list[int]]:
    """Token ids of each candidate's continuation; rejects what label scoring cannot rank."""
    if not candidates:
        raise ValueError("label scoring needs at least one candidate label, got an empty list")
    ids = [tokenizer(target_continuation(c), add_special_tokens=False).input_ids for c in candidates]
    seen: dict[tuple[int, ...], str] = {}
    for candidate, tokens in zip(candidates, ids):
        if not tokens:
            raise ValueError(
                f"candidate {candidate!r} tokenises to no tokens; every candidate needs at least one token "
                f"after the prompt (its continuation is {target_continuation(candidate)!r})"
            )
        if tuple(tokens) in seen:
            raise ValueError(
                f"candidates {seen[tuple(tokens)]!r} and {candidate!r} tokenise identically; "
                "expected distinct labels, otherwise the first always wins"
            )
        seen[tuple(tokens)] = candidate
    return ids


def _pad_id(tokenizer) -> int:
    # Padded positions are masked out, so any valid id will do when the tokenizer has no pad token.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _pad(
    sequences: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of shape (len(sequences), longest)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only: a left-padded prompt starts at 0 as it does unpadded.

    Without them, GPT-2's absolute position embeddings (and, numerically, RoPE) would see a padded prompt
    shifted by its padding and score it differently from the same prompt alone. Padding positions get a
    repeat of a real position (never beyond the longest real sequence), and are masked anyway.
    """
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def _inference(model) -> Iterator[None]:
    """eval mode (no dropout) and no autograd for the duration; the caller's train/eval mode is restored.

    no_grad, not inference_mode: the workers train the model they score, and tensors made in inference mode
    cannot enter autograd afterwards (ZeRO-3's gathered weights were, and the next task's training failed)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return (slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size))


def _length_sorted_batches(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices of `prompt_ids` in batches of similar lengths (shortest first).

    Every batch is padded to its longest prompt, so batching prompts in the given order computes padding
    too (a third more tokens than the prompts hold on the demo stream); sorted, a batch pads little.
    Callers write each result back to its index, so the output order is the input order.
    """
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    return (order[batch] for batch in _batches(len(order), batch_size))


# ----------------------------------------------------------------------------- label scoring


def label_log_likelihoods(model, tokenizer, prompts: list[str], candidates: list[str], batch_size: int = 8,
                          candidate_pass_mib: float = CANDIDATE_PASS_MIB, lockstep: Lockstep | None = None) -> torch.Tensor:
    """Summed log-probability of each candidate's continuation tokens after each prompt, shape (prompts, candidates).

    The tokens every prompt starts with (a task's instruction) run once, and their KV cache serves every
    batch. Per batch of prompts: one forward over the prompts' own tokens, left-padded after that prefix
    (its last column holds every prompt's next-token distribution, which scores each candidate's first
    token), then the candidates' remaining tokens in forwards over batch x K rows that continue the prompt KV
    cache, as many rows at a time as fit `candidate_pass_mib`. Matches ``naive_label_log_likelihoods`` up to
    float rounding. With a ``lockstep``, every rank runs the same forward passes (the same number of prompts
    on each rank makes the same number of batches).
    """
    candidate_ids = _candidate_ids(tokenizer, candidates)
    prompt_ids = _prompt_ids(tokenizer, prompts)
    pad_id = _pad_id(tokenizer)
    prefix_length = _shared_prefix_length(prompt_ids)
    if lockstep:
        prefix_length = lockstep.min(prefix_length)
    prefix = prompt_ids[0][:prefix_length]
    scores = torch.empty(len(prompts), len(candidates))
    with _inference(model):
        prefix_cache = _prefix_cache(model, prefix)
        for batch in _length_sorted_batches(prompt_ids, batch_size):
            scores[batch] = _score_batch(model, [prompt_ids[i] for i in batch], candidate_ids, pad_id, prefix_cache,
                                         candidate_pass_mib, lockstep).cpu()
    return scores


def _shared_prefix_length(prompt_ids: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all prompts share, leaving every prompt at least one token of its own."""
    return min(len(os.path.commonprefix(prompt_ids)), min(len(ids) for ids in prompt_ids) - 1)


def _last_column(ids: torch.Tensor) -> torch.Tensor:
    """`logits_to_keep` for the last position of `ids` only, as an index: transformers then gathers the last
    hidden column into a contiguous tensor. The int 1 slices a strided view, and in bf16 on a CPU torch
    multiplies a strided 3-D input by a weight that needs no grad (a peft model's frozen LM head) as a batched
    matmul over a copy of the weight per row: 16 prompts through SmolLM2's 49k x 576 head took 864 MiB (and
    label scoring ran 2.4x slower)."""
    return torch.tensor([ids.shape[1] - 1], device=ids.device)


def _prefix_cache(model, prefix: list[int]):
    """The KV cache of the shared prefix (batch 1), or None when there is none."""
    if not prefix:
        return None
    ids = torch.tensor([prefix], device=model.device)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=_last_column(ids)).cache


def _score_batch(model, prompt_ids: list[list[int]], candidate_ids: list[list[int]], pad_id: int, prefix_cache=None,
                 candidate_pass_mib: float = CANDIDATE_PASS_MIB, lockstep: Lockstep | None = None) -> torch.Tensor:
    device = model.device
    # Rows are [shared prefix][padding][the prompt's own tokens]: the prefix cache serves every row, and every
    # prompt still ends at the last column. The mask and positions skip the padding.
    prefix_length = 0 if prefix_cache is None else prefix_cache.get_seq_length()
    own, own_mask = _pad([ids[prefix_length:] for ids in prompt_ids], pad_id, "left", device)
    prompt_mask = torch.cat([own_mask.new_ones(len(prompt_ids), prefix_length), own_mask], dim=1)
    cache = None
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)  # batch_repeat_interleave works in place; later batches need batch 1
        cache.batch_repeat_interleave(len(prompt_ids))
    # only the last column's logits are needed, and the lm_head is a large share of a small model's compute
    out = model(
        input_ids=own, attention_mask=prompt_mask, position_ids=_positions(prompt_mask)[:, prefix_length:], cache=cache,
        use_cache=True, logits_to_keep=_last_column(own),
    )
    first = out.logits[:, -1].float().log_softmax(-1)  # (B, V)

    # a row's bytes in the candidate pass: its copy of the prompt cache, and logits (with their float copy and
    # log-softmax) over the candidate tokens
    cache_row = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.cache.layers) / len(prompt_ids)
    logits_row = 12 * out.logits.shape[-1] * max(len(ids) for ids in candidate_ids)
    rows = max(1, int(candidate_pass_mib * 2**20 // (cache_row + logits_row)))
    chunk = max(1, rows // len(prompt_ids))
    if lockstep:  # the same candidate chunks everywhere: the same forwards (a 1-token chunk runs none)
        chunk = lockstep.min(chunk)
    starts = range(0, len(candidate_ids), chunk)
    scores = []
    for start in starts:
        # batch_repeat_interleave expands the cache in place; keep the prompt cache intact for later chunks.
        cache = out.cache if len(starts) == 1 else copy.deepcopy(out.cache)
        scores.append(_score_candidates(model, cache, prompt_mask, first, candidate_ids[start : start + chunk], pad_id))
    return torch.cat(scores, dim=1)


def _score_candidates(
    model, cache, prompt_mask: torch.Tensor, first: torch.Tensor, candidate_ids: list[list[int]], pad_id: int
) -> torch.Tensor:
    """(B, K) summed log-probs of K candidates, continuing the left-padded prompts' cache (consumed here)."""
    batch, k = prompt_mask.shape[0], len(candidate_ids)
    cand, cand_mask = _pad(candidate_ids, pad_id, "right", prompt_mask.device)  # (K, L)
    scores = first[:, cand[:, 0]]  # (B, K): the first token is predicted by the prompt's last position
    if cand.shape[1] == 1:
        return scores

    # Row b * K + k continues prompt b with candidate k: repeat_interleave for the prompt side (the cache
    # does the same), tile for the candidate side. The last candidate token is only predicted, never read.
    cache.batch_repeat_interleave(k)
    mask = torch.cat([prompt_mask.repeat_interleave(k, dim=0), cand_mask[:, :-1].repeat(batch, 1)], dim=1)
    out = model(
        input_ids=cand[:, :-1].repeat(batch, 1),
        attention_mask=mask,
        position_ids=_positions(mask)[:, prompt_mask.shape[1] :],
        cache=cache,
        use_cache=True,
    )
    logprobs = out.logits.float().log_softmax(-1)  # (B * K, L - 1, V)
    targets = cand[:, 1:].repeat(batch, 1)
    token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * cand_mask[:, 1:].repeat(batch, 1)
    return scores + token_logprobs.sum(-1).view(batch, k)


def naive_label_log_likelihoods(
    model, tokenizer, prompts: list[str], candidates: list[str], batch_size: int = 8
) -> torch.Tensor:
    """Reference for ``label_log_likelihoods``: K full forwards of prompt + candidate per batch, no cache reuse.

    Sequences are right-padded, so every real token keeps its unpadded positions and the causal mask keeps
    padding out of every scored position.
    """
    candidate_ids = _candidate_ids(tokenizer, candidates)
    prompt_ids = _prompt_ids(tokenizer, prompts)
    pad_id = _pad_id(tokenizer)
    scores = torch.empty(len(prompts), len(candidates))
    with _inference(model):
        for batch in _batches(len(prompts), batch_size):
            for k, cand in enumerate(candidate_ids):
                sequences = [p + cand for p in prompt_ids[batch]]
                ids, mask = _pad(sequences, pad_id, "right", model.device)
                logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
                for row, p in enumerate(prompt_ids[batch]):
                    # position t predicts token t + 1
                    predicted = logprobs[row, len(p) - 1 : len(p) - 1 + len(cand)]
                    targets = torch.tensor(cand, device=predicted.device)[:, None]
                    scores[batch.start + row, k] = predicted.gather(-1, targets).sum()
    return scores


def classify(
    model, tokenizer, prompts: list[str], candidates: list[str], batch_size: int = 8, length_normalize: bool = False,
    candidate_pass_mib: float = CANDIDATE_PASS_MIB, lockstep: Lockstep | None = None,
) -> list[int]:
    """Index of the most likely candidate for each prompt.

    Sum of log-probs by default: it is the probability of generating exactly that label, so the prediction is
    what greedy-ish decoding would favour, and it is the standard label-scoring rule. It does prefer short
    labels; ``length_normalize=True`` ranks by the mean per-token log-prob instead, for label sets whose
    lengths differ a lot.
    """
    scores = label_log_likelihoods(model, tokenizer, prompts, candidates, batch_size, candidate_pass_mib, lockstep)
    if length_normalize:
        lengths = torch.tensor([len(ids) for ids in _candidate_ids(tokenizer, candidates)], dtype=scores.dtype)
        scores = scores / lengths
    return scores.argmax(-1).tolist()


# ----------------------------------------------------------------------------- generation


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 8,
                     lockstep: Lockstep | None = None) -> list[str]:
    """Greedy continuation of each prompt up to EOS, a newline or max_new_tokens; decoded and stripped.

    A small greedy loop rather than ``model.generate``: it pads by hand (left, same tokenisation as label
    scoring, the tokenizer's padding_side untouched), ignores a checkpoint's sampling defaults, and stops a
    row at any token that decodes to a newline (byte-level BPE has many such tokens). With a ``lockstep``, a
    batch decodes until every rank's batch has finished.
    """
    eos = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer)
    prompt_ids = _prompt_ids(tokenizer, prompts)
    answers = [""] * len(prompts)
    with _inference(model):
        for batch in _length_sorted_batches(prompt_ids, batch_size):
            rows = [prompt_ids[i] for i in batch]
            for index, tokens in zip(batch, _greedy(model, tokenizer, rows, max_new_tokens, eos, pad_id, lockstep)):
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                answers[index] = text.split("\n", 1)[0].strip()
    return answers


def _eos_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS and the checkpoint's (chat models often end turns with another token, e.g. <|im_end|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else [])
    return ids


def _greedy(
    model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, eos: set[int], pad_id: int,
    lockstep: Lockstep | None = None,
) -> list[list[int]]:
    ids, mask = _pad(prompt_ids, pad_id, "left", model.device)
    positions = _positions(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=_last_column(ids))
    generated: list[list[int]] = [[] for _ in prompt_ids]
    done = [False] * len(prompt_ids)
    for step in range(max_new_tokens):
        next_tokens = out.logits[:, -1].argmax(-1)
        for row, token in enumerate(next_tokens.tolist()):
            if done[row]:
                continue
            if token in eos:
                done[row] = True
                continue
            generated[row].append(token)
            done[row] = "\n" in tokenizer.decode([token])
        finished = all(done)
        if lockstep:
            finished = not lockstep.any(not finished)
        if finished or step == max_new_tokens - 1:
            break
        # Finished rows keep decoding alongside (rows are independent); their tokens are just not recorded.
        mask = torch.cat([mask, mask.new_ones(len(prompt_ids), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=next_tokens[:, None], attention_mask=mask, position_ids=positions, cache=out.cache, use_cache=True
        )
    return generated


def _normalize(text: str) -> str:
    text = " ".join(text.lower().split())
    return text.rstrip(string.punctuation + " ")


def exact_match(prediction: str, gold: str) -> bool:
    """Equal after lowercasing, collapsing whitespace and dropping trailing punctuation ("Paris." == "paris")."""
    return _normalize(prediction) == _normalize(gold)


def contains_match(prediction: str, gold: str) -> bool:
    """The normalised gold occurs in the normalised prediction as whole words ("no" is not in "not sure")."""
    target = _normalize(gold)
    if not target:
        raise ValueError(f"gold answer {gold!r} is empty after normalisation; every prediction would contain it")
    return re.search(rf"(?<!\w){re.escape(target)}(?!\w)", _normalize(prediction)) is not None


# ----------------------------------------------------------------------------- one task


def answered_correctly(
    model,
    tokenizer,
    prompts: list[str],
    targets: list[str],
    metric: Metric,
    candidates: list[str] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    candidate_pass_mib: float = CANDIDATE_PASS_MIB,
    lockstep: Lockstep | None = None,
) -> list[bool]:
    """Per example, whether the model's answer counts as correct: label-scoring accuracy over ``candidates``
    (metric "accuracy"), or a match of the greedy answer ("exact_match", "contains"). A task's score is their mean.

    ``candidates`` is required for "accuracy" (each target must be one of them) and unused otherwise;
    ``max_new_tokens`` bounds the answers of the generation metrics. Scoring several splits of a task in
    one call batches all their prompts by length together. Ranks scoring shards of one ZeRO-3 model pass a
    ``lockstep`` and the same number of prompts each.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts for {len(targets)} targets; expected one target per prompt")
    if not prompts:
        raise ValueError("no examples to score; expected at least one prompt")
    if metric == "accuracy":
        if not candidates:
            raise ValueError("metric 'accuracy' scores labels and needs a non-empty candidates list, got none")
        index = {c.strip(): i for i, c in enumerate(candidates)}
        missing = sorted({t for t in targets if t.strip() not in index})
        if missing:
            raise ValueError(f"targets {missing!r} are not among the candidates {list(candidates)!r}")
        predictions = classify(model, tokenizer, prompts, candidates, batch_size, candidate_pass_mib=candidate_pass_mib,
                               lockstep=lockstep)
        return [prediction == index[t.strip()] for prediction, t in zip(predictions, targets)]
    empty = sorted({t for t in targets if not _normalize(t)})
    if empty:
        raise ValueError(f"targets {empty!r} are empty after normalisation; expected a non-empty answer to match")
    match = exact_match if metric == "exact_match" else contains_match
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, lockstep)
    return [match(a, t) for a, t in zip(answers, targets)]

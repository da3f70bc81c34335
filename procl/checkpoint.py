"""Save and load a strategy's state as safetensors + JSON (never pickle), atomically and verified.

A state folder holds `strategy_state.safetensors` (adapter, program memory and strategy tensors)
and `strategy_meta.json` (JSON-able metadata plus the sha256 of the tensor file). It is written
into a temporary sibling folder and renamed into place, so a crash never leaves a half-written
state that looks complete; a truncated or altered tensor file fails the hash check on load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from procl.atomic import atomic_directory
from procl.strategies import ContinualStrategy

TENSORS_FILE = "strategy_state.safetensors"
META_FILE = "strategy_meta.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_strategy_state(strategy: ContinualStrategy, model: nn.Module, directory: str | Path) -> Path:
    """Write the strategy's (tensors, metadata) into `directory`, replacing it atomically."""
    tensors, meta = strategy.state(model)
    return write_state(directory, tensors, meta)


def write_state(directory: str | Path, tensors: dict, meta: dict) -> Path:
    """Write (tensors, metadata) from `strategy.state` atomically. Under data parallelism every rank
    calls `state` (it is collective) and one rank calls this."""
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        save_file(tensors, str(staging / TENSORS_FILE))
        meta = meta | {"tensors_sha256": sha256_file(staging / TENSORS_FILE)}
        try:
            text = json.dumps(meta, indent=1, sort_keys=True)
        except TypeError as error:
            raise TypeError(f"{meta.get('strategy')} state metadata must be JSON-serialisable: {error}") from error
        (staging / META_FILE).write_text(text)
    return directory


def recorded_sha256(directory: str | Path) -> str:
    """The sha256 of the tensor file that `write_state` recorded in the folder's metadata (no re-hash)."""
    return json.loads((Path(directory) / META_FILE).read_text())["tensors_sha256"]


def read_state(directory: str | Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a state folder, verified against its recorded sha256."""
    directory = Path(directory)
    tensors_path, meta_path = directory / TENSORS_FILE, directory / META_FILE
    for path in (tensors_path, meta_path):
        if not path.is_file():
            raise FileNotFoundError(f"strategy state {directory} is incomplete: {path.name} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{meta_path} is not valid JSON: {error}") from error
    if sha256_file(tensors_path) != meta.get("tensors_sha256"):
        raise ValueError(f"{tensors_path} does not match the sha256 recorded in {meta_path.name}: truncated or altered")
    return load_file(str(tensors_path)), meta


def load_strategy_state(strategy: ContinualStrategy, model: nn.Module, directory: str | Path) -> dict:
    """Verify and load a state folder into `model` (built by `strategy.build`); returns the metadata."""
    tensors, meta = read_state(directory)
    strategy.restore_state(model, tensors, meta)
    return meta

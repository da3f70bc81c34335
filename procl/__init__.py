"""ProCL: continual LoRA fine-tuning via program memory (torch + peft only; no Ray here).

Public surface:
- `ProCLConfig`, `LoraSettings`: hyperparameters (pydantic, validated).
- `make_strategy(name, ...)`: procl and the baselines behind one hook interface.
- `procl.model`: attach / consolidate / detach program memory on a peft LoRA model.
- `procl.metrics`: accuracy-matrix metrics (AA, AIA, BWT, forgetting, FWT).
- `export_adapter`: write a plain peft LoRA adapter.
"""

from importlib import import_module

# Loaded on first use (PEP 562): a process that needs only `procl.atomic` or `procl.metrics` (Ray Train's
# controller, Ray Data's tokenizing tasks) then imports neither peft nor transformers' model code (~4 s).
_PUBLIC = {
    "ContinualStrategy": "procl.strategies",
    "LoraSettings": "procl.config",
    "ProCLConfig": "procl.config",
    "STRATEGIES": "procl.strategies",
    "export_adapter": "procl.export",
    "make_strategy": "procl.strategies",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'procl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))

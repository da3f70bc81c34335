"""ProCL: continual LoRA fine-tuning via program memory (torch + peft only; no Ray here).

Public surface:
- `ProCLConfig`, `LoraSettings`: hyperparameters (pydantic, validated).
- `make_strategy(name, ...)`: procl and the baselines behind one hook interface.
- `procl.model`: attach / consolidate / detach program memory on a peft LoRA model.
- `procl.metrics`: accuracy-matrix metrics (AA, AIA, BWT, forgetting, FWT).
- `export_adapter`: write a plain peft LoRA adapter.
"""

from procl.config import LoraSettings, ProCLConfig
from procl.export import export_adapter
from procl.strategies import STRATEGIES, ContinualStrategy, make_strategy

__all__ = ["ContinualStrategy", "LoraSettings", "ProCLConfig", "STRATEGIES", "export_adapter", "make_strategy"]

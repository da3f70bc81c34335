"""Export the carried adapter as a standard peft LoRA adapter folder.

The folder holds `adapter_config.json` and `adapter_model.safetensors` with peft's own key layout
(`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`), so vanilla peft loads it with
`PeftModel.from_pretrained` in a process that never imports procl. It is written atomically
(`procl.atomic`): an interrupted export never leaves a half-written adapter.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from procl.atomic import atomic_directory
from procl.distributed import read_full
from procl.layer import MLPFactor, ProgramFactor


def plain_lora_state_dict(model: PeftModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """peft's saved-adapter keys -> full (gathered) factor weights of `adapter_name`."""
    state: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        for factor_name in ("lora_A", "lora_B"):
            factor = getattr(module, factor_name)[adapter_name]
            if isinstance(factor, MLPFactor) or (isinstance(factor, ProgramFactor) and factor.mlp is not None):
                raise ValueError(
                    f"{path}.{factor_name} carries the reference MLP (procl.reference_mlp=True): the model is not a "
                    "plain LoRA, so it cannot be exported as one"
                )
            state[f"{path}.{factor_name}.weight"] = read_full(factor.weight).to(factor.weight.dtype).cpu().contiguous()
    if not state:
        raise ValueError(f"the model has no LoRA layers for adapter {adapter_name!r}")
    return state


def export_adapter(model: PeftModel, directory: str | Path, adapter_name: str) -> Path:
    """Write `adapter_name` of `model` as a plain peft LoRA adapter into `directory` (atomically)."""
    directory = Path(directory)
    state = plain_lora_state_dict(model, adapter_name)
    config = dataclasses.replace(model.peft_config[adapter_name], inference_mode=True)
    with atomic_directory(directory) as staging:
        config.save_pretrained(str(staging))
        save_file(state, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory

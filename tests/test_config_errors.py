"""Bad hyperparameters fail with the parameter's name and what is allowed."""

import pytest
from conftest import tiny_llama
from pydantic import ValidationError

from procl import LoraSettings, ProCLConfig, make_strategy


@pytest.mark.parametrize(
    "options, field",
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"ema_lambda": 0.0}, "ema_lambda"),
        ({"ema_lambda": 1.5}, "ema_lambda"),
        ({"num_slots": 0}, "num_slots"),
        ({"consolidate_every": 0}, "consolidate_every"),
        ({"formulation": "mlp"}, "formulation"),
        ({"unknown_knob": 1}, "unknown_knob"),
        ({"reference_mlp": True}, "reference_mlp"),
        ({"routing": "top2"}, "routing"),
        ({"routing": "budgeted", "num_slots": 4, "plasticity_budget": 4}, "plasticity_budget=4 must be below num_slots=4"),
        ({"routing": "budgeted", "plasticity_budget": 1.5}, "plasticity_budget"),
        ({"routing": "fixed", "formulation": "reference"}, "routing='fixed' applies to formulation='residual' only"),
        ({"fixed_plasticity": 1.0}, "fixed_plasticity"),
    ],
)
def test_invalid_procl_settings_name_the_field(options, field):
    with pytest.raises(ValidationError, match=field):
        ProCLConfig(**options)


def test_rank_zero_is_rejected():
    with pytest.raises(ValidationError, match="r\n.*greater than 0"):
        LoraSettings(r=0)


def test_slots_must_divide_the_rank():
    with pytest.raises(ValueError, match=r"num_slots=3 does not divide lora.r \(8\); allowed num_slots for it: \[1, 2, 4, 8\]"):
        make_strategy("procl", lora=LoraSettings(r=8), procl=ProCLConfig(num_slots=3))


def test_reference_slots_must_divide_factor_rows():
    strategy = make_strategy("procl", lora=LoraSettings(r=8), procl=ProCLConfig(formulation="reference", num_slots=3))
    model = strategy.build(tiny_llama())
    with pytest.raises(ValueError, match="num_slots=3 does not divide the rows of LoRA factor A"):
        strategy.before_task(model, 1)


def test_unknown_strategy_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown strategy 'ewc'; choose one of \['inc_lora', 'l2_prev', 'multitask', 'n_lora', 'o_lora', 'procl', 'replay', 'seq_lora'\]"):
        make_strategy("ewc")


def test_missing_target_modules_are_named():
    strategy = make_strategy("seq_lora", lora=LoraSettings(target_modules=["q_proj", "query_key_value"]))
    with pytest.raises(ValueError, match=r"lora.target_modules \['query_key_value'\] do not exist in the model"):
        strategy.build(tiny_llama())


def test_negative_baseline_options_are_rejected():
    with pytest.raises(ValueError, match="lambda1 must be >= 0"):
        make_strategy("o_lora", lambda1=-1.0)
    with pytest.raises(ValueError, match="buffer_per_task must be >= 1"):
        make_strategy("replay", buffer_per_task=0)

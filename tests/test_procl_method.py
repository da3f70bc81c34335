"""The ProCL method on tiny random Llama models: equations, lifecycle, consolidation, export."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch, run_task, tiny_llama, train_steps
from peft.tuners.lora import LoraLayer

from procl import LoraSettings, ProCLConfig, make_strategy
from procl import equations as eq
from procl import model as memory
from procl.layer import ProgramFactor

LORA = LoraSettings(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def procl_strategy(**procl_options) -> object:
    return make_strategy("procl", lora=LORA, seed=0, procl=ProCLConfig(**procl_options))


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(("lora_A.default.weight", "lora_B.default.weight"))}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- equations -----------------------------------------------------------------------------------


def test_attention_sums_to_one_and_sharpens_as_tau_drops():
    torch.manual_seed(0)
    queries, keys = torch.randn(5, 4, 16), torch.randn(4, 4, 16)
    entropies = []
    for tau in (10.0, 1.0, 0.1):
        a = eq.slot_attention(queries, keys, tau)
        assert a.shape == (5, 4, 4)
        torch.testing.assert_close(a.sum(-1), torch.ones(5, 4))
        entropies.append(eq.routing_entropy(a).mean().item())
    assert entropies[0] > entropies[1] > entropies[2]
    assert entropies[0] < math.log(4) + 1e-6


def test_reference_executing_factor_matches_block_formula():
    torch.manual_seed(0)
    w0, w = torch.randn(8, 3), torch.randn(8, 3)
    alpha, gamma = torch.rand(4, 4), torch.tensor(0.7)
    expected = torch.cat([gamma * w0[2 * h : 2 * h + 2] + sum(alpha[h, n] * w[2 * n : 2 * n + 2] for n in range(4)) for h in range(4)])
    torch.testing.assert_close(eq.reference_executing_factor(w0, w, alpha, gamma), expected)


def test_gamma_init_is_one_over_one_plus_rms():
    w0 = torch.full((4, 4), 0.5)
    assert torch.sigmoid(torch.tensor(eq.gamma_logit_init(w0))).item() == pytest.approx(1 / 1.5)
    # a zero factor (a model rebuilt before its checkpoint is loaded) gives gamma ~ 1, not a division by zero
    assert torch.sigmoid(torch.tensor(eq.gamma_logit_init(torch.zeros(4, 4)))).item() == pytest.approx(1.0, abs=1e-5)


def test_slot_plasticity_is_capped_at_one_for_the_top_slot():
    attention = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    rho = eq.slot_plasticity(attention, torch.zeros(4))
    torch.testing.assert_close(rho, torch.tensor([[1.0, 1 / 7, 1 / 7, 1 / 7], [1.0, 1.0, 1.0, 1.0]]))


def test_budgeted_plasticity_writes_exactly_k_slots_with_the_soft_budgets_gradient():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    gates = torch.randn(4)
    for budget in (1, 2, 3):
        rho = eq.budgeted_plasticity(logits.softmax(-1), gates, budget)
        assert set(rho.detach().unique().tolist()) <= {0.0, 1.0} and (rho.detach().sum(-1) == budget).all()
        mass = torch.sigmoid(gates) * logits.softmax(-1)
        assert (rho.detach() * mass).sum(-1).allclose(mass.topk(budget, -1).values.sum(-1))  # the k largest m
    # the gradient is the soft budget's, min(1, k m / sum m), through the values of the hard choice
    rho = eq.budgeted_plasticity(logits.softmax(-1), gates, 2)
    (grad,) = torch.autograd.grad((rho * torch.arange(4.0)).sum(), logits)
    mass = torch.sigmoid(gates) * logits.softmax(-1)
    (expected,) = torch.autograd.grad(((2 * mass / mass.sum(-1, keepdim=True)).clamp(max=1) * torch.arange(4.0)).sum(), logits)
    torch.testing.assert_close(grad, expected)
    # ties (uniform attention, equal gates) go to the lower slots
    torch.testing.assert_close(eq.budgeted_plasticity(torch.full((1, 4), 0.25), torch.zeros(4), 2), torch.tensor([[1.0, 1, 0, 0]]))


def test_fixed_routing_gives_every_input_the_same_rho_and_has_nothing_to_learn():
    strategy = procl_strategy(routing="fixed", fixed_plasticity=0.6)
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0)
    strategy.before_task(model, 1)
    assert memory.routing_parameters(model) == []
    model.train()
    model(input_ids=batch(3))
    tops = []
    for router in memory._routers(model):
        assert (router.last_rho == router.last_rho[0]).all()  # no input dependence
        assert sorted(router.last_rho[0].tolist()) == pytest.approx([0.6, 0.6, 0.6, 1.0])
        tops.append(int(router.last_rho[0].argmax()))
    # one top slot per layer, drawn from the seed and the task: another task draws again
    strategy.after_task(model, 1, [])
    strategy.before_task(model, 2)
    assert [int(r.rho.argmax()) for r in memory._routers(model)] != tops


# -- lifecycle -----------------------------------------------------------------------------------


def test_task_one_is_plain_lora_identical_to_seq_lora():
    procl_model, seq_model = tiny_llama(), tiny_llama()
    procl, seq = procl_strategy(), make_strategy("seq_lora", lora=LORA, seed=0)
    procl_model, seq_model = procl.build(procl_model), seq.build(seq_model)
    run_task(procl_model, procl, 0)
    run_task(seq_model, seq, 0)
    assert not memory.is_attached(procl_model)
    for key, value in lora_weights(seq_model).items():
        torch.testing.assert_close(lora_weights(procl_model)[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("formulation", ["residual", "reference"])
def test_shapes_and_gradients_reach_lora_and_routing(formulation):
    strategy = procl_strategy(formulation=formulation)
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0)
    strategy.before_task(model, 1)
    assert sum(1 for _ in memory.program_factors(model)) == 2 * 2 * 2  # layers x (q, v) x (A, B)
    model.train()
    train_steps(model, strategy, 1, seed=5)  # residual routing gets gradient once W has moved from W0
    model.train()
    ids = batch(7)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (4, 12, 64)
    out.loss.backward()
    for _, factor in memory.program_factors(model):
        assert factor.weight.grad is not None and factor.weight.grad.abs().sum() > 0
    routing = memory.routing_parameters(model)
    assert routing and all(p.grad is not None for p in routing)
    assert sum(p.grad.abs().sum().item() for p in routing) > 0


@pytest.mark.parametrize("formulation", ["residual", "reference"])
def test_a_router_is_one_parameter_and_a_state_from_before_packing_restores(formulation):
    """DeepSpeed hooks, gathers and steps each parameter on its own, so a router's encoder, keys and gates are one
    flat Parameter. A chain state written before that holds them under their own names, and restores the same router."""
    strategy = procl_strategy(formulation=formulation)
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0)
    strategy.before_task(model, 1)
    train_steps(model, strategy, 1, seed=5)
    assert all(len(list(router.parameters())) == 1 for router in memory._routers(model))
    tensors, meta = strategy.state(model)
    before_packing = {}  # each router tensor under its own name, as states were written before
    for name, tensor in tensors.items():
        if name.endswith(".packed"):
            router = model.get_submodule(name.removesuffix(".packed"))
            before_packing |= {name.removesuffix("packed") + part: value for part, value in router.unpacked(tensor).items()}
        else:
            before_packing[name] = tensor
    assert len(before_packing) > len(tensors)
    restored_strategy = procl_strategy(formulation=formulation)
    restored = restored_strategy.build(tiny_llama())
    restored_strategy.restore_state(restored, before_packing, meta)
    for router, restored_router in zip(memory._routers(model), memory._routers(restored), strict=True):
        torch.testing.assert_close(restored_router.packed, router.packed, rtol=0, atol=0)


@pytest.mark.parametrize("role", ["A", "B"])
def test_residual_factor_applies_each_inputs_executing_factor_in_its_forward(role):
    """Mid-task (W moved away from W0, routing not uniform) the fused forward is W_exec[b] x for each input b,
    W_exec[b] = W0 + rho[b] ⊙ (W - W0) of the equations."""
    from procl.layer import ResidualRouter

    torch.manual_seed(0)
    config = ProCLConfig(formulation="residual", num_slots=4)
    rank, d_in, d_out = 8, 12, 10
    linear = torch.nn.Linear(d_in if role == "A" else rank, rank if role == "A" else d_out, bias=False)
    router = ResidualRouter(d_in, config, None)
    with torch.no_grad():
        router.unpacked()["keys"].normal_()  # routing that differs per input
    factor = ProgramFactor(linear, role, config, router).train()
    with torch.no_grad():
        factor.weight.add_(torch.randn_like(factor.weight))  # W != W0, as after some steps of the task
    layer_input = torch.randn(3, 5, d_in)  # the router reads the layer input (A's input)
    rho = router(layer_input)
    x = layer_input if role == "A" else torch.randn(3, 5, rank)
    out = factor(x)
    rho_rank = eq.expand_slots_to_rank(rho, rank)
    for b in range(3):
        executing = eq.residual_executing_factor(factor.w0, factor.weight, rho_rank[b], factor.rank_dim)
        torch.testing.assert_close(out[b], torch.nn.functional.linear(x[b], executing), rtol=1e-5, atol=1e-6)


def test_residual_executing_adapter_equals_carried_adapter_at_task_switch():
    strategy = procl_strategy(formulation="residual")
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0, steps=6)
    ids = batch(99)
    model.train()  # training mode: the carried adapter vs ...
    before = logits(model, ids)
    strategy.before_task(model, 1)
    model.train()  # ... the executing adapter of the first step of task 2
    after = logits(model, ids)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_reference_formulation_changes_the_model_at_task_switch():
    """The documented finding: gamma * W0 + alpha-mixed blocks is not the carried adapter."""
    strategy = procl_strategy(formulation="reference")
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0, steps=6)
    ids = batch(99)
    before = logits(model.train(), ids)
    strategy.before_task(model, 1)
    after = logits(model.train(), ids)
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("formulation", ["residual", "reference"])
def test_consolidation_follows_the_ema_rule_exactly(formulation):
    lam = 0.6
    strategy = procl_strategy(formulation=formulation, ema_lambda=lam, consolidate_every=1000)
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0)
    strategy.before_task(model, 1)
    train_steps(model, strategy, 3, seed=3)  # no consolidation yet (period 1000): W moved by Adam only
    factors = dict(memory.program_factors(model))
    stepped = {path: f.weight.detach().clone() for path, f in factors.items()}
    memory.consolidate(model)
    for path, factor in factors.items():
        w, w0 = stepped[path], factor.w0
        if formulation == "residual":
            rho = factor.residual_router.synced[:4]
            rho_rank = rho.repeat_interleave(2)  # r = 8, N = 4: two rank rows/cols per slot
            scale = rho_rank[:, None] if factor.role == "A" else rho_rank[None, :]
            expected = (1 - lam) * w + lam * (w0 + scale * (w - w0))
        else:
            alpha, gamma = factor.router.synced[:16].reshape(4, 4), factor.router.synced[-1]
            rows = w.shape[0] // 4
            blocks = [gamma * w0[h * rows : (h + 1) * rows] + sum(alpha[h, n] * w[n * rows : (n + 1) * rows] for n in range(4)) for h in range(4)]
            expected = (1 - lam) * w + lam * torch.cat(blocks)
        torch.testing.assert_close(factor.weight.detach(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rank_dim", [0, 1])
def test_residual_consolidation_is_one_pull_toward_w0(rank_dim):
    """lerp(W, W0, lambda (1 - rho)) is consolidate(W, W_exec, lambda) with the residual W_exec, for A (rank rows) and B."""
    torch.manual_seed(0)
    shape = (8, 5) if rank_dim == 0 else (5, 8)
    w, w0 = torch.randn(shape), torch.randn(shape)
    rho_rank = eq.expand_slots_to_rank(torch.tensor([1.0, 0.5, 0.25, 0.0]), 8)
    expected = eq.consolidate(w, eq.residual_executing_factor(w0, w, rho_rank, rank_dim), 0.6)
    pull = eq.along_rank(eq.residual_consolidation_pull(rho_rank, 0.6), rank_dim)
    torch.testing.assert_close(w.lerp(w0, pull), expected, rtol=1e-6, atol=1e-6)


def test_routing_statistics_average_the_steps_since_the_last_consolidation():
    strategy = procl_strategy(consolidate_every=3)
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0)
    strategy.before_task(model, 1)
    untrained = strategy.routing_statistics(model)  # before any pass: zeros, not an error
    assert all(set(layer["slot_usage"]) == {0.0} for layer in untrained.values())
    train_steps(model, strategy, 3, seed=4)
    stats = strategy.routing_statistics(model)
    assert len(stats) == 4  # one residual router per LoRA layer
    for layer_stats in stats.values():
        assert sum(layer_stats["slot_usage"]) == pytest.approx(1.0, abs=1e-5)
        assert 0 <= layer_stats["example_entropy"] <= math.log(4) + 1e-6
        assert max(layer_stats["slot_plasticity"]) <= 1.0 + 1e-6


def second_task_routed_to_slot_0(**procl_options):
    """(strategy, model, W0 per factor) at ProCL's second task with the gates pinned so every input routes to slot 0."""
    strategy = procl_strategy(protect_weight=0.0, **procl_options)
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0)
    strategy.before_task(model, 1)
    for router in memory._routers(model):
        with torch.no_grad():
            router.unpacked()["gate_logits"].copy_(torch.tensor([30.0, -30.0, -30.0, -30.0]))
        frozen_gates = torch.ones_like(router.packed)
        router.unpacked(frozen_gates)["gate_logits"].zero_()
        router.packed.register_hook(lambda grad, mask=frozen_gates: grad * mask)  # the gates do not train
    return strategy, model, {path: f.w0.clone() for path, f in memory.program_factors(model)}


def test_unrouted_slots_stay_untouched():
    """Gates pinned so every input routes to slot 0: slots 1..3 of A (rank rows) and B (rank cols) keep W0."""
    strategy, model, w0 = second_task_routed_to_slot_0()
    train_steps(model, strategy, 5, seed=11)
    strategy.after_task(model, 1, [])
    final = {f"{path}.{name}.default": getattr(layer, name)["default"].weight.detach() for path, layer in memory.lora_layers(model) for name in ("lora_A", "lora_B")}
    for path, w in final.items():
        is_a = path.endswith("lora_A.default")
        moved, kept = (w[:2], w[2:]) if is_a else (w[:, :2], w[:, 2:])
        moved0, kept0 = (w0[path][:2], w0[path][2:]) if is_a else (w0[path][:, :2], w0[path][:, 2:])
        assert (moved - moved0).abs().max() > 1e-4  # slot 0 learned
        torch.testing.assert_close(kept, kept0, rtol=0, atol=1e-8)  # the other slots were not written


def test_consolidation_pulls_half_plastic_slots_back_by_the_closed_form():
    """rho pinned at 0.5 (fixed routing, c = 0.5), W = W0 + D, k consolidations with no optimiser step:
    W = W0 + (1 - lambda/2)^k D in the half-plastic slots, W0 + D in the top slot; the task-end fold then
    keeps rho_task = 0.5 of the rest."""
    lam, k = 0.6, 3
    strategy = procl_strategy(routing="fixed", fixed_plasticity=0.5, ema_lambda=lam)
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0)
    strategy.before_task(model, 1)
    factors = dict(memory.program_factors(model))
    torch.manual_seed(1)
    shifts = {path: torch.randn_like(f.weight) for path, f in factors.items()}
    with torch.no_grad():
        for path, factor in factors.items():
            factor.weight.add_(shifts[path])
    model.train()
    for step in range(k):
        model(input_ids=batch(step))  # records the routing consolidation reads
        memory.consolidate(model)
    kept = (1 - lam / 2) ** k
    strategy_rho = {path: f.residual_router.rho.repeat_interleave(2) for path, f in factors.items()}  # r = 8, N = 4
    for path, factor in factors.items():
        rank_shape = (-1, 1) if factor.role == "A" else (1, -1)
        keep = torch.where(strategy_rho[path] == 1.0, 1.0, kept).reshape(rank_shape)
        torch.testing.assert_close(factor.weight.detach(), factor.w0 + keep * shifts[path], rtol=1e-5, atol=1e-6)
    w0 = {path: f.w0.clone() for path, f in factors.items()}
    strategy.after_task(model, 1, [])  # nothing pending: the fold alone
    for path, factor in factors.items():
        rank_shape = (-1, 1) if factor.role == "A" else (1, -1)
        keep = torch.where(strategy_rho[path] == 1.0, 1.0, 0.5 * kept).reshape(rank_shape)
        torch.testing.assert_close(factor.weight.detach(), w0[path] + keep * shifts[path], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("routed", ["A", "B"])
def test_an_unrouted_factor_trains_as_plain_lora(routed):
    """Routing pinned to slot 0: the routed factor keeps slots 1..3 at W0; consolidation and the task-end
    fold leave the other factor exactly as its optimiser steps wrote it (every rank written)."""
    strategy, model, w0 = second_task_routed_to_slot_0(routed_factors=routed, consolidate_every=100)
    train_steps(model, strategy, 5, seed=11)
    trained = lora_weights(model)  # no consolidation yet: after_task consolidates the 5 steps and folds
    strategy.after_task(model, 1, [])
    for path, layer in memory.lora_layers(model):
        for name in ("lora_A", "lora_B"):
            key = f"{path}.{name}.default"
            w = getattr(layer, name)["default"].weight.detach()
            other_slots = (w - w0[key])[2:] if name == "lora_A" else (w - w0[key])[:, 2:]
            if name == f"lora_{routed}":
                torch.testing.assert_close(other_slots, torch.zeros_like(other_slots), rtol=0, atol=1e-8)
            else:
                assert other_slots.abs().max() > 1e-4
                torch.testing.assert_close(w, trained[f"{key}.weight"], rtol=0, atol=0)


def test_routed_factors_is_residual_only():
    with pytest.raises(ValueError, match="routed_factors applies to formulation='residual'"):
        ProCLConfig(formulation="reference", routed_factors="A")


def _first_slot_plasticity(protect_weight: float, routing: str) -> float:
    """Mean over layers of slot 0's task plasticity rho-bar when earlier tasks kept only slot 0."""
    strategy = procl_strategy(protect_weight=protect_weight, routing=routing)
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0)
    strategy.slot_usage = {path: torch.tensor([1.0, 0.0, 0.0, 0.0]) for path, _ in memory.lora_layers(model)}
    strategy.before_task(model, 1)
    train_steps(model, strategy, 20, seed=12, lr=1e-3)
    return sum(s["task_plasticity"][0] for s in strategy.routing_statistics(model).values()) / len(memory._routers(model))


@pytest.mark.parametrize("routing", ["learned", "budgeted"])
def test_protection_loss_lowers_the_plasticity_of_slots_earlier_tasks_kept(routing):
    """On rho, the plasticity itself (after the gates), against the same task trained without protection."""
    assert _first_slot_plasticity(1.0, routing) < _first_slot_plasticity(0.0, routing) - 0.05


def test_budgeted_routing_routes_task_one_so_task_two_protects_it():
    strategy = procl_strategy(routing="budgeted")
    model = strategy.build(tiny_llama())
    strategy.before_task(model, 0)
    assert memory.is_attached(model)
    train_steps(model, strategy, 4, seed=0)
    strategy.after_task(model, 0, [])
    assert len(strategy.task_slot_usage) == 1
    strategy.before_task(model, 1)
    for path, layer in memory.lora_layers(model):
        router = getattr(layer, memory.ROUTER_ATTRIBUTE)
        torch.testing.assert_close(router.earlier_usage, torch.tensor(strategy.task_slot_usage[0][path]))
        assert router.earlier_usage.sum() == pytest.approx(1.0)  # task one wrote into k = 1 slot per input
    assert memory.protection_loss(model) is None  # no forward yet
    model.train()
    model(input_ids=batch(1))
    strategy.extra_loss(model).backward()
    # on rho, after the gates: the protection's gradient reaches them (on the attention it would not)
    assert all(router.unpacked(router.packed.grad)["gate_logits"].abs().sum() > 0 for router in memory._routers(model))


def test_detach_restores_a_plain_peft_lora_model():
    strategy = procl_strategy()
    model = strategy.build(tiny_llama())
    for t in range(3):
        run_task(model, strategy, t)
    assert not memory.is_attached(model)
    for _, layer in memory.lora_layers(model):
        assert type(layer.lora_A["default"]) is torch.nn.Linear and type(layer.lora_B["default"]) is torch.nn.Linear
        assert not hasattr(layer, memory.ROUTER_ATTRIBUTE)
    assert len(strategy.task_slot_usage) == 2 and set(strategy.slot_usage) == {p for p, _ in memory.lora_layers(model)}


def test_eval_mode_mid_task_is_the_carried_plain_lora():
    """No routing at inference: an attached model in eval mode computes exactly base + B W A with the carried W."""
    strategy = procl_strategy()
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0)
    strategy.before_task(model, 1)
    train_steps(model, strategy, 3, seed=21)
    ids = batch(5)
    counts = [len(r.recorded) for r in memory._routers(model)]
    out = logits(model.eval(), ids)
    assert [len(r.recorded) for r in memory._routers(model)] == counts  # routers never ran
    for _, layer in memory.lora_layers(model):
        assert isinstance(layer.lora_A["default"], ProgramFactor)
        layer.merge()  # peft's merge reads the carried W through get_delta_weight
    torch.testing.assert_close(logits(model, ids), out, rtol=1e-5, atol=1e-5)


def test_lora_layers_found_on_gpt2_conv1d_too():
    from conftest import tiny_gpt2

    strategy = make_strategy("procl", lora=LoraSettings(r=4, target_modules=["c_attn"]), procl=ProCLConfig(num_slots=2))
    model = strategy.build(tiny_gpt2())
    run_task(model, strategy, 0, steps=2)
    run_task(model, strategy, 1, steps=2)
    assert sum(1 for _ in memory.lora_layers(model)) == 2
    assert all(isinstance(layer, LoraLayer) for _, layer in memory.lora_layers(model))


def mixed_batches(steps: int, seed: int) -> list[torch.Tensor]:
    """Half of every batch from each half of the vocabulary: two kinds of input in one task."""
    return [torch.cat([batch(seed * 1000 + step, size=2), batch(seed * 1000 + step, size=2, offset=32)]) for step in range(steps)]


def test_routing_learns_input_dependent_slot_choices():
    """Input dependence, not one sharp constant routing: the entropy of the mean routing exceeds the mean
    per-input entropy (they are equal when every input is routed alike)."""
    strategy = procl_strategy()
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0, steps=6)
    strategy.before_task(model, 1)
    train_steps(model, strategy, 30, seed=1, batches=mixed_batches(30, seed=1))
    stats = strategy.routing_statistics(model).values()
    gaps = [s["usage_entropy"] - s["example_entropy"] for s in stats]
    assert sum(gaps) / len(gaps) > 0.1


@pytest.mark.parametrize("routing", ["learned", "budgeted"])
def test_training_forward_is_the_weight_form_executing_adapter_once_w_moved(routing):
    """The whole model: the fused activation-form forward of one input equals the plain LoRA whose factors are
    W_exec = W0 + rho ⊙ (W - W0) at that input's rho, after training has moved W away from W0."""
    strategy = procl_strategy(routing=routing)
    model = strategy.build(tiny_llama())
    run_task(model, strategy, 0)
    strategy.before_task(model, 1)
    train_steps(model, strategy, 5, seed=2, offset=32)
    factors = dict(memory.program_factors(model))
    assert all((f.weight - f.w0).abs().max() > 1e-4 for f in factors.values())
    ids = batch(77, size=1)
    activation_form = logits(model.train(), ids)
    executing = {
        path: eq.residual_executing_factor(f.w0, f.weight, eq.expand_slots_to_rank(f.residual_router.last_rho[0], 8), f.rank_dim)
        for path, f in factors.items()
    }
    assert any(not torch.equal(w, factors[p].weight) for p, w in executing.items())  # some slot is not fully plastic
    with torch.no_grad():
        for path, factor in factors.items():
            factor.weight.copy_(executing[path])
    torch.testing.assert_close(logits(model.eval(), ids), activation_form, rtol=1e-5, atol=1e-5)

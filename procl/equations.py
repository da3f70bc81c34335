"""The ProCL equations, one function each, named as in docs/METHOD.md.

Shapes: B batch, T tokens, N slots (programs), H row blocks (H = N), d_k query/key size.
A LoRA factor W has `rows` x `cols`; it is split into N equal row blocks P_1..P_N.
Nothing here holds state: the modules in `procl.layer` call these functions.
"""

from __future__ import annotations

import math

import torch


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """x̄_b: mean over tokens of the layer input. (B, T, d) -> (B, d); a 2-D (T, d) input is one sequence."""
    if x.dim() == 2:
        return x.mean(dim=0, keepdim=True)
    return x.reshape(-1, x.shape[-2], x.shape[-1]).mean(dim=1)


def example_mean(x: torch.Tensor, token_example: torch.Tensor, example_tokens: torch.Tensor) -> torch.Tensor:
    """x̄_s: mean of the layer input over the tokens of each example s, where a row may hold several (packing)
    and padding belongs to none. x (B, T, d); token_example (B*T,): each token's example 0..S-1, S for
    padding; example_tokens (S,): tokens per example -> (S, d). Summed in float32."""
    flat = x.reshape(-1, x.shape[-1]).float()
    sums = flat.new_zeros(example_tokens.shape[0] + 1, flat.shape[-1]).index_add_(0, token_example, flat)
    return (sums[:-1] / example_tokens[:, None]).to(x.dtype)


def slot_attention(queries: torch.Tensor, keys: torch.Tensor, tau: float, scale: float = 1.0) -> torch.Tensor:
    """a[b, h, n] = softmax_n(scale * <q[b, h], K[h, n]> / tau).

    queries (B, H, d_k) and keys (H, N, d_k) -> (B, H, N). The reference uses scale = 1; the
    residual formulation uses scale = 1/sqrt(d_k), the usual dot-product attention scaling.
    """
    logits = torch.einsum("bhd,hnd->bhn", queries, keys) * (scale / tau)
    return logits.softmax(dim=-1)


def slot_weights(attention: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Reference: alpha[h, n] = sigmoid(s_n) * mean_b a[b, h, n].  (B, H, N) -> (H, N)."""
    return torch.sigmoid(gate_logits)[None, :] * attention.mean(dim=0)


def gamma_logit_init(w0: torch.Tensor) -> float:
    """g such that gamma = sigmoid(g) = 1 / (1 + rms(W0)).

    W0 = 0 (a zero-initialised LoRA B, e.g. a model rebuilt before its checkpoint is loaded) gives
    gamma = 1, an infinite logit: gamma is capped just below 1."""
    gamma = min(1.0 / (1.0 + w0.float().pow(2).mean().sqrt().item()), 1.0 - 1e-6)
    return math.log(gamma / (1.0 - gamma))


def row_blocks(weight: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Split W (rows, cols) row-wise into its N programs: (N, rows / N, cols)."""
    return weight.reshape(num_blocks, weight.shape[0] // num_blocks, weight.shape[1])


def reference_executing_factor(
    w0: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    """Reference: block h of W_exec = gamma * W0_h + sum_n alpha[h, n] * P_n.  -> (rows, cols)."""
    num_blocks = alpha.shape[0]
    programs = row_blocks(weight, num_blocks)
    mixed = torch.einsum("hn,nrc->hrc", alpha.to(programs.dtype), programs)
    return (gamma * row_blocks(w0, num_blocks) + mixed).reshape_as(weight)


def slot_plasticity(attention: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Residual: rho[b, n] = m[b, n] / max_m' m[b, m'], with m[b, n] = sigmoid(s_n) * a[b, n].

    (B, N) -> (B, N) in (0, 1]: the slot an input is routed to most is fully plastic, the others
    proportionally less. Capping at 1 keeps consolidation a contraction (no slot can grow
    geometrically, which is what the reference's EMA toward gamma * W0 + alpha * P risks).
    """
    mass = torch.sigmoid(gate_logits)[None, :] * attention
    return mass / mass.amax(dim=-1, keepdim=True)


def budgeted_plasticity(attention: torch.Tensor, gate_logits: torch.Tensor, budget: int) -> torch.Tensor:
    """Budgeted: rho[b] = 1 on the k slots of largest m[b, n] = sigmoid(s_n) * a[b, n], 0 elsewhere, in the forward
    pass; the gradient is that of the soft budget min(1, k * m / sum_m' m) (a straight-through estimator).  (B, N) -> (B, N).

    sum_n rho[b, n] = k < N: an input writes into exactly k slots, so the loss, which wants every slot
    plastic, must choose which. Hard values keep a chosen slot fully plastic from the first step (a soft
    budget starts every slot at k / N, which consolidation pulls back by 1 - lambda (1 - k / N) per step,
    and learned nothing in docs/RESULTS.md's probe). Ties go to the lower slot.
    """
    mass = torch.sigmoid(gate_logits)[None, :] * attention
    soft = (budget * mass / mass.sum(dim=-1, keepdim=True)).clamp(max=1.0)
    order = torch.arange(mass.shape[-1], device=mass.device, dtype=mass.dtype)
    chosen = (mass.detach() - 1e-6 * order).topk(budget, dim=-1).indices
    hard = torch.zeros_like(mass).scatter(-1, chosen, 1.0)
    return hard + (soft - soft.detach())  # exactly the hard values forward


def fixed_plasticity(top_slot: int, num_slots: int, constant: float) -> torch.Tensor:
    """Fixed (the routing-off control): rho_n = 1 for the top slot, c for the others.  -> (N,)."""
    rho = torch.full((num_slots,), float(constant))
    rho[top_slot] = 1.0
    return rho


def expand_slots_to_rank(rho: torch.Tensor, rank: int) -> torch.Tensor:
    """Residual slot n owns rank rows/cols [n*r/N, (n+1)*r/N): (..., N) -> (..., r)."""
    return rho.repeat_interleave(rank // rho.shape[-1], dim=-1)


def along_rank(values: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """Per-rank values (..., r) shaped to scale the rank rows (rank_dim 0, factor A: r x d_in) or the rank columns
    (rank_dim 1, factor B: d_out x r) of a factor."""
    return values.unsqueeze(-1) if rank_dim == 0 else values.unsqueeze(-2)


def residual_executing_factor(w0: torch.Tensor, weight: torch.Tensor, rho_rank: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """Residual: W_exec = W0 + rho ⊙ (W - W0), rho applied along the rank dimension (`along_rank`).

    rho_rank (..., r): leading dimensions give one W_exec per input, (..., rows, cols). At the start of a task
    W = W0, so W_exec = W whatever the routing: the executing adapter is the carried one.
    """
    # not torch.lerp: its backward reads `weight` itself, which DeepSpeed ZeRO-3 has released by then
    return w0 + along_rank(rho_rank, rank_dim).to(weight.dtype) * (weight - w0)


def consolidate(weight: torch.Tensor, executing: torch.Tensor, ema_lambda: float) -> torch.Tensor:
    """W <- (1 - lambda) * W + lambda * stopgrad(W_exec)."""
    return (1.0 - ema_lambda) * weight + ema_lambda * executing.detach()


def residual_consolidation_pull(rho_rank: torch.Tensor, ema_lambda: float) -> torch.Tensor:
    """Residual consolidation as one interpolation toward W0: consolidate(W, residual_executing_factor(W0, W, rho),
    lambda) = W + lambda (1 - rho) ⊙ (W0 - W). Returns the pull lambda (1 - rho) per rank row or column (..., r),
    to apply `along_rank`: elementwise, so each data-parallel rank can apply it to its own part of W
    (`procl.distributed.lerp_full`)."""
    return ema_lambda * (1.0 - rho_rank)


def protection_loss(mean_routing: torch.Tensor, earlier_usage: torch.Tensor) -> torch.Tensor:
    """Residual: L_protect = sum_n u_n * r̄_n, u_n = how much earlier tasks kept in slot n (mean of their rho).

    r̄ is the batch's mean attention ā (learned routing) or mean plasticity ρ̄ (budgeted: after the
    gates, so they cannot undo it). Steers this task's plasticity toward slots earlier tasks used least.
    """
    return (earlier_usage.to(mean_routing.dtype) * mean_routing).sum()


def routing_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_n p_n log p_n over the last dimension (nats)."""
    return -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=-1)

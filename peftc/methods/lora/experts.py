"""``lora experts``: a LoRA on each stacked expert weight of a mixture-of-experts block, computed as HF PEFT
0.21's ``target_parameters`` LoRA (``peft.tuners.lora.layer.ParamWrapper``) computes it.

W is experts × out × in: transformers 5's ``mlp.experts.gate_up_proj`` (E × 2I × H) and ``down_proj``
(E × H × I), which a grouped matmul reads transposed. Every expert e gets its own rank-r LoRA, all with one
scale s (alpha/r, or alpha/sqrt(r) with rslora), added to the weight before the experts run:
W'[e] = W[e] + s · B_e A_e, which HF PEFT computes as ``torch.baddbmm(W, B, A, alpha=s)`` in W's dtype. The
factors are stored as HF PEFT stores them, so its files hold them unchanged:

- ``lora_A`` is (E·r) × in, and A_e is its rows e·r … e·r + r − 1;
- ``lora_B`` is out × (r·E), which HF PEFT reshapes to out × r × E: B_e is its columns e, E + e, 2E + e, …

The update is on the weight, not on an input of its own, so there is nothing for a dropout to act on: HF PEFT
refuses lora_dropout on such a LoRA, and so does peftc."""
from __future__ import annotations

import torch
from torch.fx import Graph, Node

aten = torch.ops.aten


def factors(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B as E × out × r, A as E × r × in) from HF PEFT's ``lora_B`` (out × r·E) and ``lora_A`` (E·r × in)."""
    rhs = a.reshape(experts, -1, a.shape[-1])
    lhs = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)
    return lhs, rhs


def delta(a: torch.Tensor, b: torch.Tensor, experts: int, scale: float) -> torch.Tensor:
    """s · B_e A_e for every expert: E × out × in, shaped like the stacked weight."""
    lhs, rhs = factors(a, b, experts)
    return scale * torch.bmm(lhs, rhs)


def emit(graph: Graph, weight: Node, a: Node, b: Node, shape: tuple[int, int, int], r: int, scale: float,
         cast: torch.dtype | None) -> list[Node]:
    """Graph nodes computing ``baddbmm(W, B, A, alpha=s)`` from the get_attr nodes of W and the factors (the
    factors first cast to ``cast``, W's dtype, when they are kept in another), in graph order; the last is
    the adapted weight."""
    experts, out_features, in_features = shape
    rhs = graph.call_function(aten.reshape.default, (a, [experts, r, in_features]))
    columns = graph.call_function(aten.reshape.default, (b, [out_features, r, experts]))
    lhs = graph.call_function(aten.permute.default, (columns, [2, 0, 1]))
    nodes = [rhs, columns, lhs]
    if cast is not None:
        rhs = graph.call_function(aten._to_copy.default, (rhs,), {"dtype": cast})
        lhs = graph.call_function(aten._to_copy.default, (lhs,), {"dtype": cast})
        nodes += [rhs, lhs]
    nodes.append(graph.call_function(aten.baddbmm.default, (weight, lhs, rhs), {"alpha": scale}))
    return nodes

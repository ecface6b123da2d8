"""Which output features of a fused projection feed which role, found by probing the graph's dataflow.

A fused projection computes several roles in one matmul: GPT-2's ``c_attn`` (q, k, v as three column
blocks), GPT-NeoX's ``query_key_value`` (q, k, v interleaved per head), Phi-3's ``qkv_proj`` and
``gate_up_proj``. Following every split, view, slice and rotary embedding symbolically is fragile, so the
graph answers instead: run it once on a small example input with the projection's output made a leaf
that requires gradients, and read which features the attention's query input (or the activation's input)
depends on from the sparsity of the gradient. A feature the role's input does not depend on gets an exact
zero gradient whatever the weights, so the answer does not depend on the example input; a random
weighting of the output guards against gradients that cancel by accident."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Interpreter, Node

from peftc.graph.capture import example_inputs
from peftc.graph.signature import DECODER, SIGNATURE, TEXT


@dataclass
class Probe:
    """One fused linear to probe: ``watch`` maps a role to the nodes whose values it reaches."""
    linear: str
    watch: dict[str, list[Node]]


class _LeafInterpreter(Interpreter):
    def __init__(self, gm: GraphModule, leaves: set[str]):
        super().__init__(gm, garbage_collect_values=False)
        self.leaves = leaves
        self.stand_ins: dict[str, torch.Tensor] = {}

    def fetch_attr(self, target: str):
        """A weight on the meta device (a model built from its config) probes as seeded random values: the
        zeros of a gradient come from the graph's structure, not from the weights."""
        value = super().fetch_attr(target)
        if isinstance(value, torch.Tensor) and value.is_meta:
            if target not in self.stand_ins:
                gen = torch.Generator().manual_seed(len(self.stand_ins))
                self.stand_ins[target] = (torch.randn(value.shape, generator=gen).to(value.dtype)
                                          if value.is_floating_point() else torch.zeros(value.shape, dtype=value.dtype))
            value = self.stand_ins[target]
        return value

    def run_node(self, n: Node):
        result = super().run_node(n)
        if n.name in self.leaves and isinstance(result, torch.Tensor):
            result = result.detach().requires_grad_(True)
        return result


def probe_inputs(gm: GraphModule, vocab: int) -> tuple[torch.Tensor, ...]:
    """Example inputs for the graph's inputs (:data:`peftc.graph.signature.SIGNATURE` in its meta names them):
    tokens below ``vocab``, masks of ones, and the fixed-size inputs (pixels, audio features) at their shape
    with a batch of 2."""
    names = gm.meta.get(SIGNATURE, None)
    names = names.names if names is not None else TEXT
    ids, mask = example_inputs(batch=2, seq=7, vocab=max(2, min(vocab, 1000)), seed=3)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    gen = torch.Generator().manual_seed(4)
    out = []
    for name, node in zip(names, placeholders):
        if name in TEXT:
            out.append(ids if name == "input_ids" else mask)
        elif name == DECODER:
            out.append(torch.randint(0, max(2, min(vocab, 1000)), (2, 4), generator=gen))
        else:
            shape = [d if isinstance(d, int) else 2 for d in node.meta["val"].shape]
            out.append(torch.randn(shape, generator=gen))
    return tuple(out)


def support(probes: list[Probe], gm: GraphModule, vocab: int) -> dict[str, dict[str, set[int]]]:
    """For each probe, each watched role's set of output features of the linear that it depends on."""
    if not probes:
        return {}
    interpreter = _LeafInterpreter(gm, {p.linear for p in probes})
    with torch.enable_grad():
        interpreter.run(*probe_inputs(gm, vocab))
        env = {n.name: v for n, v in interpreter.env.items()}
        gen = torch.Generator().manual_seed(0)
        out: dict[str, dict[str, set[int]]] = {}
        for probe in probes:
            leaf = env[probe.linear]
            features = leaf.shape[-1]
            found: dict[str, set[int]] = {}
            for role, nodes in probe.watch.items():
                total = None
                for node in nodes:
                    value = env[node.name]
                    if not isinstance(value, torch.Tensor) or not value.requires_grad:
                        continue
                    weight = torch.rand(value.shape, generator=gen, dtype=torch.float64) + 0.5
                    term = (value.double() * weight).sum()
                    total = term if total is None else total + term
                if total is None:
                    found[role] = set()
                    continue
                (grad,) = torch.autograd.grad(total, leaf, retain_graph=True, allow_unused=True)
                if grad is None:
                    found[role] = set()
                    continue
                used = (grad.reshape(-1, features) != 0).any(dim=0)
                found[role] = set(torch.nonzero(used).flatten().tolist())
            out[probe.linear] = found
    return out


def ranges(indices) -> list[tuple[int, int]]:
    """Sorted indices as half-open [start, stop) runs."""
    runs: list[tuple[int, int]] = []
    for i in sorted(indices):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def describe(indices) -> str:
    """``0:64`` for one run; ``0:16 every 48 x4`` for equal runs at a fixed stride (per-head interleaving)."""
    runs = ranges(indices)
    if not runs:
        return "-"
    if len(runs) == 1:
        return f"{runs[0][0]}:{runs[0][1]}"
    lengths = {b - a for a, b in runs}
    strides = {runs[i + 1][0] - runs[i][0] for i in range(len(runs) - 1)}
    if len(lengths) == 1 and len(strides) == 1:
        return f"{runs[0][0]}:{runs[0][1]} every {strides.pop()} x{len(runs)}"
    return ",".join(f"{a}:{b}" for a, b in runs)

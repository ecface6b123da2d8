"""Prefix tuning on an encoder-decoder, as HF PEFT 0.21 computes it (``PeftModelForSeq2SeqLM`` with
``get_prompt``): the prefixes go through the decoder's KV cache only, so

- only the decoder's self-attentions get prefixes; the encoder gets none, and the cross-attentions none
  (HF PEFT resets the cross-attention cache it builds);
- only the decoder's positions move by P (its tokens sit at P..P+T-1 after the cached prefix); the
  encoder's stay;
- decoder layer i reads HF PEFT's block 2i mod L of its (P × L·2·d) prefix tensor: ``get_prompt`` repeats
  the L·2 blocks and cuts the result into groups of 4 (self key, self value, cross key, cross value) per
  layer, so group i holds blocks 4i, 4i+1 of the repetition. Layers i and i + L/2 (L even) share one
  prefix, and the odd blocks are never read. peftc builds exactly that: one prefix per block that is read,
  shared by the layers reading it, so training, HF PEFT's files and outputs are HF PEFT's.

A decoder whose self-attention scores add a learned relative-position bias (T5's ``memory − context``
positions, bucketed and looked up in a table) gets it over the prefix keys too, as HF PEFT's cache gives:
the real queries sit at P..P+T-1 and the prefix keys at 0..P-1, so their columns are the same bias
subgraph run again on ``arange(P) − (context + P)`` (:func:`relative_bias_columns`); the real columns keep
their values, since both positions move by P."""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from peftc.errors import PassError
from peftc.graph.signature import DECODER, SIGNATURE
from peftc.methods.prefix.dataflow import downstream, upstream

aten = torch.ops.aten
TABLE_LOOKUPS = {aten.embedding.default, aten.index.Tensor, aten.index_select.default}


def decoder_nodes(gm: GraphModule) -> set[Node]:
    """The nodes computed from the decoder's input ids (empty for a model without a decoder input)."""
    signature = gm.meta.get(SIGNATURE)
    names = signature.names if signature is not None else ()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return downstream(gm.graph, (node for name, node in zip(names, placeholders) if name == DECODER))


def hf_blocks(count: int, encoder_decoder: bool) -> list[int]:
    """The block of HF PEFT's prefix tensor each of ``count`` attentions reads (see the module doc)."""
    return [(2 * i) % count for i in range(count)] if encoder_decoder else list(range(count))


def _lookup(node: Node) -> bool:
    """A float lookup in a table of the model's: a learned bias."""
    table, val = node.args[0] if node.args else None, node.meta.get("val")
    return (node.op == "call_function" and node.target in TABLE_LOOKUPS and isinstance(table, Node)
            and table.op == "get_attr" and isinstance(val, torch.Tensor) and val.is_floating_point())


def learned_bias(mask) -> bool:
    """Whether an attention mask adds values looked up in a table of the model's (a relative-position
    bias, as T5's)."""
    return isinstance(mask, Node) and any(_lookup(n) for n in upstream([mask]))


def _relative_positions(mask: Node, above: set[Node]) -> tuple[Node, Node, Node]:
    """The ``memory − context`` subtraction feeding the learned bias of ``mask`` (``above``: the nodes it
    is computed from), with its key positions (1 × keys) and query positions (queries × 1)."""
    lookup = next(n for n in above if _lookup(n))
    for sub in (n for n in upstream([lookup.args[1]]) if n.target is aten.sub.Tensor):
        memory, context = sub.args[:2]
        shapes = [getattr(a, "meta", {}).get("val") for a in (memory, context)]
        if all(isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point() for v in shapes) \
                and shapes[0].shape[0] == 1 and shapes[1].shape[1] == 1:
            return sub, memory, context
    raise PassError(f"cannot extend the relative-position bias of mask {mask.name} over prefix keys: no "
                    "key-minus-query position subtraction feeds its lookup")


def relative_bias_columns(emit, mask: Node, tokens: int) -> Node:
    """The P prefix columns of a mask holding a learned relative-position bias (inserted by ``emit``, the
    prefix pass's :class:`peftc.methods.prefix.attention.Emit`): the bias subgraph run again
    from ``arange(P) − (context + P)``. Where the bias meets the rest of the mask (the causal or padding
    part, another input's branch), the prefix columns take the bias alone: every query sees the prefix."""
    above = upstream([mask])
    sub, memory, context = _relative_positions(mask, above)
    branch = downstream(emit.graph, [sub]) & above
    varying = downstream(emit.graph, (n for n in emit.graph.nodes if n.op == "placeholder"))
    ones = emit(aten.new_ones.default, memory, [1, tokens])
    keys = emit(aten.sub.Tensor, emit(aten.cumsum.default, ones, 1), 1)               # 0..P-1
    env = {sub: emit(aten.sub.Tensor, keys, emit(aten.add.Tensor, context, tokens))}
    for node in list(emit.graph.nodes):
        if node in branch and node not in env:
            # where the bias meets another input's branch (the mask), the prefix columns are visible
            if any(a not in branch and a in varying for a in node.all_input_nodes):
                env[node] = next(env[a] for a in node.all_input_nodes if a in env)
            else:
                env[node] = emit.copy(node, lambda n: env.get(n, n))
        if node is mask:
            break
    batch = emit(aten.sym_size.int, mask, 0)
    return emit(aten.expand.default, env[mask], [batch, -1, -1, -1])

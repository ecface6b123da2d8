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

A decoder whose self-attention scores add a learned relative-position bias (T5) is refused: with a cached
prefix, HF PEFT gives the prefix keys bias columns of their own relative positions, which the graph
rewrite does not compute."""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from peftc.graph.signature import DECODER, SIGNATURE

aten = torch.ops.aten
TABLE_LOOKUPS = {aten.embedding.default, aten.index.Tensor, aten.index_select.default}


def decoder_nodes(gm: GraphModule) -> set[Node]:
    """The nodes computed from the decoder's input ids (empty for a model without a decoder input)."""
    signature = gm.meta.get(SIGNATURE)
    names = signature.names if signature is not None else ()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    start = {node for name, node in zip(names, placeholders) if name == DECODER}
    out: set[Node] = set()
    for node in gm.graph.nodes:              # graph order: inputs come before their users
        if node in start or any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def hf_blocks(count: int, encoder_decoder: bool) -> list[int]:
    """The block of HF PEFT's prefix tensor each of ``count`` attentions reads (see the module doc)."""
    return [(2 * i) % count for i in range(count)] if encoder_decoder else list(range(count))


def learned_bias(mask) -> bool:
    """Whether an attention mask adds values looked up in a table of the model's (a relative-position
    bias, as T5's): a float lookup whose table no input reaches."""
    if not isinstance(mask, Node):
        return False
    seen, frontier = set(), [mask]
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_function" and node.target in TABLE_LOOKUPS:
            table, val = node.args[0], node.meta.get("val")
            if (isinstance(table, Node) and table.op == "get_attr" and isinstance(val, torch.Tensor)
                    and val.is_floating_point()):
                return True
        frontier.extend(node.all_input_nodes)
    return False

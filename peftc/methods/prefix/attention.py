"""The prefix pass's rewrite of one attention: the attentions of a graph (SDPA calls, and softmax attention
spelt out in aten ops) as :class:`AttentionSite` (the key heads the attention receives and those the k
projection makes), and each rewritten to attend over key and value prefixes first
(:func:`extend_attention`): ``sdpa(q, k, v, mask)`` becomes ``sdpa(q, [Pk; k], [Pv; v], [cols; mask])``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from peftc.compiler.passmanager import CompileContext
from peftc.errors import PassError
from peftc.graph.analysis import ATTENTION_OPS, layer_of
from peftc.graph.capture import module_path
from peftc.methods.prefix.explicit import (PROBABILITY_OPS, RESHAPE_OPS, SOFTMAX_OPS, AttentionCall,
                                           explicit_attention)
from peftc.methods.prefix.seq2seq import learned_bias, relative_bias_columns

aten = torch.ops.aten
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
SDPA_DEFAULTS = (None, None, None, None, 0.0, False)


@dataclass
class AttentionSite:
    """One SDPA call: what records need (``path``, ``layer``) and the shapes the prefixes take."""
    node: str              # name of the scaled_dot_product_attention node
    path: str              # module path of the attention, e.g. model.layers.0.self_attn
    layer: int | None
    heads: int             # heads of the keys as SDPA receives them (after any repeat_kv)
    kv_heads: int          # heads of the keys as the k projection computes them
    head_dim: int

    @property
    def token_dim(self) -> int:
        return self.kv_heads * self.head_dim


class Emit:
    """Insert aten calls into a graph, tagging each and remembering it."""

    def __init__(self, ctx: CompileContext, statement, index: int, keyword: str):
        self.ctx, self.statement, self.index, self.keyword = ctx, statement, index, keyword
        self.graph = ctx.gm.graph
        self.nodes: list[Node] = []
        self.memo: dict[Node, Node] = {}     # per mask: its extension, built once for the attentions sharing it

    def __call__(self, target, *args, **kwargs) -> Node:
        node = self.graph.call_function(target, args, kwargs)
        return self._keep(node)

    def copy(self, node: Node, arg_transform) -> Node:
        """A copy of ``node`` with its inputs mapped by ``arg_transform`` (and no recorded value: its shape
        is the copy's own)."""
        copied = self.graph.node_copy(node, arg_transform)
        copied.meta.pop("val", None)
        copied.meta.pop("tensor_meta", None)
        return self._keep(copied)

    def attr(self, target: str) -> Node:
        return self._keep(self.graph.get_attr(target))

    def _keep(self, node: Node) -> Node:
        self.ctx.tag(node, self.keyword, self.statement, self.index)
        self.nodes.append(node)
        return node


def sdpa_args(node: Node) -> dict:
    """The SDPA call's arguments by name (defaults filled in)."""
    out = {name: (node.args[i] if i < len(node.args) else node.kwargs.get(name, default))
           for i, (name, default) in enumerate(zip(SDPA_ARGS, SDPA_DEFAULTS))}
    out["scale"] = node.kwargs.get("scale")
    out["enable_gqa"] = node.kwargs.get("enable_gqa", False)
    return out


def extend_attention(emit: Emit, attention: Node, key_prefix: Node, value_prefix: Node, tokens: int,
                     heads: int, kv_heads: int, dtype: torch.dtype = torch.float32,
                     window: int | None = None) -> None:
    """Rewrite ``attention`` (an SDPA call, or the ``matmul(probabilities, v)`` of a spelt-out softmax
    attention, see :mod:`peftc.methods.prefix.explicit`) to attend over ``tokens`` prefix positions first.
    ``key_prefix``/``value_prefix`` are (kv_heads, P, head_dim) nodes of ``dtype`` (cast to the keys' dtype
    where that differs) that exist before its scores are computed. With SDPA's ``enable_gqa`` SDPA repeats
    the heads itself, else prefixes are repeated like transformers' ``repeat_kv`` (head h reads kv head
    h // (heads / kv_heads)). Every query sees every prefix position, unless ``window`` W is given (a
    sliding-window attention, whose mask must then be given): real query i sees prefix position p only
    while ``P + i - p < W``, as a KV cache holding the prefix at positions 0..P-1 would give."""
    call = attention_call(attention)
    gqa = call.scores is None and sdpa_args(attention)["enable_gqa"]
    k_val = call.key.meta.get("val")
    readers = (call.key_reader or call.node, call.value_reader or call.node)
    new = []
    for prefix, real, reader in zip((key_prefix, value_prefix), (call.key, call.value), readers):
        with emit.graph.inserting_before(reader):
            if heads != kv_heads and not gqa:
                rep = heads // kv_heads
                prefix = emit(aten.unsqueeze.default, prefix, 1)
                prefix = emit(aten.expand.default, prefix, [kv_heads, rep, tokens, -1])
                prefix = emit(aten.reshape.default, prefix, [heads, tokens, -1])
            if k_val is not None and k_val.dtype != dtype:
                prefix = emit(aten._to_copy.default, prefix, dtype=k_val.dtype)
            prefix = emit(aten.unsqueeze.default, prefix, 0)
            batch = emit(aten.sym_size.int, real, 0)
            new.append(emit(aten.cat.default, [emit(aten.expand.default, prefix, [batch, -1, -1, -1]), real], 2))
    with emit.graph.inserting_before(call.mask_add or call.node):
        new_mask = _new_mask(emit, call, tokens, window)
    if call.scores is None:
        _rewire_sdpa(call.node, new[0], new[1], new_mask)
        return
    readers[0].replace_input_with(call.key, new[0])
    readers[1].replace_input_with(call.value, new[1])
    if call.mask_add is not None:
        call.mask_add.replace_input_with(call.mask, new_mask)
    if call.bias is not None:
        with emit.graph.inserting_before(call.scores):
            call.scores.replace_input_with(call.bias, _extend_bias(emit, call.bias, tokens))


def attention_call(node: Node) -> AttentionCall:
    """The SDPA call ``node``, or the spelt-out attention whose ``matmul(probabilities, v)`` it is."""
    if node.target in ATTENTION_OPS:
        a = sdpa_args(node)
        return AttentionCall(node, a["query"], a["key"], a["value"], a["attn_mask"], a["is_causal"])
    softmax = _probabilities_softmax(node)
    call = explicit_attention(softmax) if softmax is not None else None
    if call is None or call.node is not node:
        raise PassError(f"{node.name} is neither an SDPA call nor the output of a softmax attention")
    return call


def _probabilities_softmax(node: Node) -> Node | None:
    """The softmax whose probabilities ``matmul(probabilities, v)`` (or ``bmm``) reads, through casts,
    dropout and reshapes."""
    current = node.args[0] if node.target in (aten.matmul.default, aten.bmm.default) else None
    while isinstance(current, Node) and current.target in PROBABILITY_OPS | RESHAPE_OPS:
        current = current.args[0]
    return current if isinstance(current, Node) and current.target in SOFTMAX_OPS else None


def _new_mask(emit: Emit, call: AttentionCall, tokens: int, window: int | None) -> Node | None:
    """The mask over the prefix positions and the keys (None where there is none, and no causal flag)."""
    q, k, mask = call.query, call.key, call.mask
    if mask is not None:
        seen = _in_window(emit, q, k, tokens, window) if window is not None else None
        return _extend_mask(emit, mask, tokens, seen)
    if window is not None:
        raise PassError(f"attention {call.node.name} has a sliding window but no mask to extend")
    if not call.causal:
        return None
    # is_causal is top-left aligned: query i sees keys 0..i; the prefix columns are seen by all
    tq, tk = emit(aten.sym_size.int, q, 2), emit(aten.sym_size.int, k, 2)
    tri = emit(aten.tril.default, emit(aten.new_ones.default, q, [tq, tk], dtype=torch.bool))
    seen = emit(aten.new_ones.default, q, [tq, tokens], dtype=torch.bool)
    return emit(aten.cat.default, [seen, tri], 1)


def _rewire_sdpa(sdpa: Node, new_k: Node, new_v: Node, new_mask: Node | None) -> None:
    a = sdpa_args(sdpa)
    kwargs = {"scale": a["scale"]} if a["scale"] is not None else {}
    if a["enable_gqa"]:
        kwargs["enable_gqa"] = True
    sdpa.args = (a["query"], new_k, new_v, new_mask, a["dropout_p"], False)
    sdpa.kwargs = kwargs


def _extend_mask(emit: Emit, mask: Node, tokens: int, seen: Node | None = None) -> Node:
    """[prefix columns, mask] along the last axis. The P columns are visible (True for a bool mask, 0 for an
    additive float mask) to every query, or where ``seen`` (queries × P, bool) says; else False, or the
    dtype's lowest value as transformers masks."""
    val = mask.meta.get("val")
    is_bool = val is None or val.dtype == torch.bool
    ndim = val.dim() if val is not None else 4
    if seen is None and learned_bias(mask):         # T5's relative-position bias, over the prefix keys too
        if mask not in emit.memo:
            emit.memo[mask] = emit(aten.cat.default, [relative_bias_columns(emit, mask, tokens), mask], ndim - 1)
        return emit.memo[mask]
    first = emit(aten.slice.Tensor, mask, ndim - 1, 0, 1)
    fill = emit(aten.full_like.default, first, True if is_bool else 0.0)
    if seen is None:
        cols = emit(aten.expand.default, fill, [-1] * (ndim - 1) + [tokens])
    elif is_bool:
        cols = emit(aten.logical_and.default, fill, seen)
    else:
        hidden = emit(aten.full_like.default, first, torch.finfo(val.dtype).min)
        cols = emit(aten.where.self, seen, fill, hidden)
    return emit(aten.cat.default, [cols, mask], ndim - 1)


def _extend_bias(emit: Emit, bias: Node, tokens: int) -> Node:
    """[prefix columns, bias] for a per-key score bias computed from the attention-mask input (Bloom's
    ALiBi). HF PEFT's prefix lengthens that mask by P ones, so the prefix keys take positions 0..P-1 and
    the real ones P more than the graph gives them: every bias of a row then moves by the same amount,
    which the softmax ignores. So the bias subgraph is run again on ``ones(batch, P + 1)`` and the prefix
    columns are its first P less its last: the prefix positions' bias counted from the first real key."""
    needed, frontier = set(), [bias]
    while frontier:
        node = frontier.pop()
        if node not in needed:
            needed.add(node)
            if node.target is not aten.sym_size.int:     # a size (the batch) is not a value the bias reads
                frontier.extend(node.all_input_nodes)
    sources = [n for n in needed if n.op == "placeholder"]
    if len(sources) != 1:
        raise PassError(f"cannot extend the attention bias {bias.name}: it reads {len(sources)} inputs, not "
                        "only the attention mask")
    ones = emit(aten.new_ones.default, sources[0], [emit(aten.sym_size.int, sources[0], 0), tokens + 1])
    env = {sources[0]: ones}
    for node in list(emit.graph.nodes):
        if node in needed and node not in env and any(a in env for a in node.all_input_nodes):
            env[node] = emit.copy(node, lambda n: env.get(n, n))
        if node is bias:
            break
    tail = emit(aten.slice.Tensor, env[bias], -1, tokens, tokens + 1)
    cols = emit(aten.sub.Tensor, emit(aten.slice.Tensor, env[bias], -1, 0, tokens), tail)
    return emit(aten.cat.default, [cols, bias], -1)


def _in_window(emit: Emit, q: Node, k: Node, tokens: int, window: int) -> Node:
    """(queries, P) bool: real query r sees prefix position p while ``P + i - p < window``, i = r + Tk - Tq
    its position among the keys (the queries are the last Tq of the Tk keys: all of them in a whole-sequence
    forward, the new ones when keys come from a cache). Counted with cumsums of ones made from ``q``, so the
    nodes follow the model's device."""
    tq, tk = emit(aten.sym_size.int, q, 2), emit(aten.sym_size.int, k, 2)
    ones = emit(aten.new_ones.default, q, [tq, tokens], dtype=torch.long)
    rows, cols = emit(aten.cumsum.default, ones, 0), emit(aten.cumsum.default, ones, 1)   # r + 1, p + 1
    since = emit(aten.sub.Tensor, emit(aten.add.Tensor, emit(aten.sub.Tensor, rows, cols), tk), tq)  # i - p
    return emit(aten.lt.Scalar, since, window - tokens)


def attention_calls(gm) -> list[AttentionCall]:
    """Every attention of the graph in order: SDPA calls, and softmax attention spelt out in aten ops."""
    calls = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in ATTENTION_OPS:
            calls.append(attention_call(node))
        elif node.target in SOFTMAX_OPS and (call := explicit_attention(node)) is not None:
            calls.append(call)
    return calls


def attention_sites(ctx: CompileContext) -> list[AttentionSite]:
    """Every attention in graph order (:func:`attention_calls`), with the key heads it receives and those
    its k projection makes."""
    found = []
    for call in attention_calls(ctx.gm):
        node, k = call.node, call.key
        val = k.meta.get("val") if isinstance(k, Node) else None
        if val is None or val.dim() != 4:
            raise PassError(f"cannot read the key shape of attention {node.name}")
        heads, head_dim = int(val.shape[1]), int(val.shape[3])
        path = module_path(node) or node.name
        kv_features = _key_features(k, ctx.sites)
        kv_heads = heads
        if kv_features and kv_features % head_dim == 0 and heads % (kv_features // head_dim) == 0:
            kv_heads = kv_features // head_dim
        found.append(AttentionSite(node.name, path, layer_of(path), heads, kv_heads, head_dim))
    return found


def _key_features(k: Node, sites) -> int | None:
    """Output features computing the keys: the k projection's, or the k slice of a fused one."""
    seen, frontier = set(), [k]
    while frontier:
        node = frontier.pop()
        if not isinstance(node, Node) or node in seen:
            continue
        seen.add(node)
        site = sites.by_node.get(node.name)
        if site is not None:
            if site.slices and "k" in site.slices:
                return len(site.slices["k"])
            if site.role == "k":
                return site.out_features
            continue
        frontier.extend(node.all_input_nodes)
    return None

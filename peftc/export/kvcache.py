"""A KV cache for a compiled causal LM, by rewriting its captured graph (:func:`cache_decoder`).

The capture maps ``(input_ids, attention_mask)`` of one whole sequence to its logits. The rewrite turns it
into a decoder step ``(input_ids, attention_mask, past...) -> (logits, present...)``:

- ``input_ids`` are the S new tokens; ``attention_mask`` covers every position so far (T = P + S, the P past
  ones first), as Hugging Face's and ONNX Runtime GenAI's decoders take it;
- every attention ``sdpa(q, k, v, mask)`` gets two inputs, the past keys and values (batch, kv heads, P,
  head dim), and attends over ``[past; k]`` and ``[past; v]``, which are also its ``present`` outputs. A
  prefix (``prefix`` statements stay graph ops after merging) stays in front of them: it is a constant part
  of the cache that is never returned. So does a soft prompt, whose keys and values are computed once
  (:mod:`peftc.export.constant_past`);
- the model's mask is replaced by one over the T positions: key j is visible to new token i when the
  attention mask keeps j, ``j <= P + i`` and, under a sliding window W, ``j > P + i - W`` (which attentions
  slide, and W, are read off the masks the graph computes, as the prefix pass reads them); a token always
  sees itself, so a padded row computes finite values that no real token reads;
- inputs the model's graph takes beyond ``input_ids`` and ``attention_mask`` (a task id per row, say) are
  :class:`ExtraInput` s the caller declares: they stay inputs of the step, after the cache;
- position ids become what ``transformers``' ``generate()`` gives: the count of kept positions before each
  token (``cumsum(attention_mask) - 1``), so cached and left-padded rows get their true positions. The
  rewrite adds ``positions - arange(S)`` to the model's own position tensor (found as the prefix pass finds
  it: an integer ``arange`` reaching the attention's inputs), so a prefix's shift is kept; a model that
  counts positions from the mask itself (OPT's ``cumsum``) keeps the last S columns of its count.

What the rewrite cannot place (no SDPA, positions it cannot find, a mask read elsewhere) is an ExportError
that names the node."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Graph, GraphModule, Node

from peftc.errors import ExportError
from peftc.graph.capture import copy_graph_module, max_positions
from peftc.export.constant_past import graph_windows, prompt_as_past, sdpa_nodes
from peftc.methods.prefix.attention import sdpa_args
from peftc.methods.prefix.dataflow import upstream
from peftc.methods.prefix.positions import _value_path, position_roots

aten = torch.ops.aten
#: stand-in for "to the end" in aten.slice
END = 2 ** 63 - 1
PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"


@dataclass(frozen=True)
class ExtraInput:
    """An input of the decoder step besides the tokens, the mask and the cache, fed at every step: its name,
    dtype and axes, each the name of a dynamic axis (``"batch"`` is the tokens' batch) or a fixed size."""
    name: str
    dtype: torch.dtype
    axes: tuple[str | int, ...]

    def example(self, batch: int, other: int = 3) -> torch.Tensor:
        """A zero tensor of this input's shape, ``batch`` rows on a batch axis, ``other`` on other named ones."""
        shape = [batch if a == "batch" else other if isinstance(a, str) else a for a in self.axes]
        return torch.zeros(shape, dtype=self.dtype)


@dataclass
class CacheLayout:
    """The shape of the cache: per attention, (kv heads, head dim), in graph order; and the step's extra
    inputs, which follow the cache."""
    heads: list[tuple[int, int]]
    max_length: int
    extras: list[ExtraInput] = field(default_factory=list)

    @property
    def layers(self) -> int:
        return len(self.heads)

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] + [PAST.format(i, kind) for i in range(self.layers)
                                                  for kind in ("key", "value")] + [e.name for e in self.extras]

    def output_names(self) -> list[str]:
        return ["logits"] + [PRESENT.format(i, kind) for i in range(self.layers) for kind in ("key", "value")]

    def empty(self, batch: int, dtype=torch.float32) -> list[torch.Tensor]:
        """A cache holding nothing yet (past length 0)."""
        return [torch.zeros(batch, h, 0, d, dtype=dtype) for h, d in self.heads for _ in (0, 1)]


class CacheDecoder(torch.nn.Module):
    """One decoder step with a KV cache: ``(input_ids, attention_mask, *past, *extras) -> (logits, *present)``."""

    def __init__(self, gm: GraphModule, layout: CacheLayout, config):
        super().__init__()
        self.gm = gm
        self.layout = layout
        self.config = config

    def forward(self, input_ids, attention_mask, *past_and_extras):
        return tuple(self.gm(input_ids, attention_mask, *past_and_extras))


def cache_decoder(model, extras: list[ExtraInput] = ()) -> CacheDecoder:
    """The KV-cache decoder step of ``model`` (a CompiledModel of a causal LM, typically merged), sharing
    its weights; the rewrite is described in the module doc. The graph's inputs after ``input_ids`` and
    ``attention_mask`` are ``extras``, in order."""
    if getattr(model, "kind", None) != "causal-lm":
        raise ExportError(f"a KV-cache decoder needs a causal LM; this model is {getattr(model, 'kind', '?')}")
    gm, prefixes, windows = _graph_and_prefixes(model)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 2 + len(extras):
        raise ExportError(f"the model's graph takes {len(placeholders)} inputs; the decoder was told of "
                          f"input_ids, attention_mask and {len(extras)} more")
    ids, mask = placeholders[:2]
    sdpas = sdpa_nodes(graph)
    if not sdpas:
        raise ExportError("the model has no scaled_dot_product_attention call to give a KV cache")
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(node)          # it checks the capture's shapes: ids and mask of one length
    _sizes_from_ids(graph, ids, mask)
    pasts = _add_inputs(graph, mask, len(sdpas))
    first = _first_compute(graph)
    with graph.inserting_before(first):
        seq = graph.call_function(aten.sym_size.int, (ids, 1))
        past_len = graph.call_function(aten.sym_size.int, (pasts[0], 2))
        positions = _positions(graph, mask, seq, past_len)
    readers = _shift_positions(gm, ids, positions, past_len)
    masks: dict[tuple, Node] = {}
    presents, heads = [], []
    for i, sdpa in enumerate(sdpas):
        key, value, old_mask, consumer = _model_inputs(sdpa, prefixes.get(sdpa.name))
        window = windows.get(sdpa.name)
        with graph.inserting_before(key.next):
            new_k = graph.call_function(aten.cat.default, ([pasts[2 * i], key], 2))
        with graph.inserting_before(value.next):
            new_v = graph.call_function(aten.cat.default, ([pasts[2 * i + 1], value], 2))
        consumer.replace_input_with(key, new_k)
        consumer.replace_input_with(value, new_v)
        dtype = old_mask.meta["val"].dtype if old_mask is not None else torch.bool
        if (window, dtype) not in masks:
            with graph.inserting_before(first):
                masks[(window, dtype)] = _visibility(graph, mask, seq, past_len, window, dtype)
        _use_mask(sdpa, consumer, old_mask, masks[(window, dtype)])
        presents += [new_k, new_v]
        val = key.meta["val"]
        heads.append((int(val.shape[1]), int(val.shape[3])))
    output = next(n for n in graph.nodes if n.op == "output")
    logits = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    output.args = ((logits, *presents),)
    graph._codegen = torch.fx.graph.CodeGen()
    for node in [n for n in graph.nodes if n.target is aten._assert_tensor_metadata.default]:
        graph.erase_node(node)          # dtype checks of the capture; they would keep the old mask alive
    graph.eliminate_dead_code()
    _check_mask_uses(mask, set(masks.values()) | set(readers))
    graph.lint()
    gm.recompile()
    return CacheDecoder(gm, CacheLayout(heads, max_positions(model.config), list(extras)), model.config)


def _graph_and_prefixes(model) -> tuple[GraphModule, dict, dict[str, int]]:
    """A copy of the model's graph; {SDPA node: the prefix in front of its keys}: the prefix statement's, or a
    soft prompt's keys and values as constants (:mod:`peftc.export.constant_past`); and {SDPA node: its
    sliding window}, read off the masks the graph computes as the prefix pass reads them
    (:func:`peftc.methods.prefix.window.attention_windows`)."""
    records = list(getattr(model, "records", ()))
    if any(r.method == "prompt" for r in records):
        return prompt_as_past(model)
    prefixes = {r.site.node: r for r in records if r.method == "prefix"}
    if prefixes:
        return copy_graph_module(model.graph_module), prefixes, {n: r.window for n, r in prefixes.items() if r.window}
    gm = copy_graph_module(model.graph_module)
    return gm, {}, graph_windows(gm, model.config)


def _first_compute(graph: Graph) -> Node:
    return next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))


def _sizes_from_ids(graph: Graph, ids: Node, mask: Node) -> None:
    """The capture reads batch and sequence sizes off the mask too; with a cache the mask is longer, so they
    are read off the new tokens."""
    for node in list(mask.users):
        if node.op == "call_function" and node.target is aten.sym_size.int:
            node.args = (ids, node.args[1])


def _add_inputs(graph: Graph, mask: Node, layers: int) -> list[Node]:
    pasts, last = [], mask
    for i in range(layers):
        for kind in ("key", "value"):
            with graph.inserting_after(last):
                last = graph.placeholder(f"past_key_values_{i}_{kind}")
            pasts.append(last)
    return pasts


def _positions(graph: Graph, mask: Node, seq: Node, past_len: Node) -> Node:
    """(batch, S) positions of the new tokens: kept positions before each one (0 for a padded one)."""
    call = graph.call_function
    kept = call(aten.cumsum.default, (mask, 1))
    before = call(aten.clamp_min.default, (call(aten.sub.Tensor, (kept, 1)), 0))
    return call(aten.slice.Tensor, (before, 1, past_len, END))


def _shift_positions(gm: GraphModule, ids: Node, positions: Node, past_len: Node) -> list[Node]:
    """Give the model's position tensors on the attention's path the new tokens' positions; returns the
    nodes that now read the mask for that. An ``arange`` over the sequence (LLaMA, GPT-2, ...) gets
    ``positions - arange(S)`` added where it becomes (1 or batch, S); a ``cumsum`` of the mask (OPT) already
    counts over every position, so its last S columns are kept."""
    on_path = _value_path(gm)
    seq_sym = str(ids.meta["val"].shape[1])
    readers = []
    for root in position_roots(gm):                # none with ALiBi: the mask alone says what is where
        if root.target is aten.cumsum.default:
            readers.append(_keep_last(gm.graph, _last_elementwise(root, on_path), past_len))
            continue
        node = root
        while not _is_2d_over(node, seq_sym):
            users = [u for u in node.users if u in on_path]
            val = _val(node)
            if len(users) != 1 or not isinstance(val, torch.Tensor) or val.dim() > 2:
                raise ExportError(f"cannot place cached positions: the position ids from {root.name} do not "
                                  f"become a (batch, sequence) tensor (at {node.name})")
            node = users[0]
        users = [u for u in node.users if u in on_path]
        graph = gm.graph
        with graph.inserting_before(node.next):
            arange = graph.call_function(aten.arange.default, (graph.call_function(aten.sym_size.int, (ids, 1)),))
            delta = graph.call_function(aten.sub.Tensor, (positions, arange))
            moved = graph.call_function(aten.add.Tensor, (node, delta))
        for user in users:
            user.replace_input_with(node, moved)
        readers.append(positions)
    return readers


def _is_2d_over(node: Node, seq_sym: str) -> bool:
    val = _val(node)
    return isinstance(val, torch.Tensor) and val.dim() == 2 and str(val.shape[1]) == seq_sym


POSITION_ARITHMETIC = {aten.mul.Tensor, aten.sub.Tensor, aten.add.Tensor, aten.sub.Scalar, aten.add.Scalar,
                       aten.mul.Scalar, aten._to_copy.default, aten.to.dtype, aten.slice.Tensor,
                       aten.type_as.default}


def _last_elementwise(root: Node, on_path: set[Node]) -> Node:
    """The end of the elementwise arithmetic that follows a mask's cumsum (OPT's ``cumsum * mask - 1``)."""
    node = root
    while True:
        users = [u for u in node.users if u in on_path]
        if len(users) != 1 or users[0].target not in POSITION_ARITHMETIC:
            return node
        node = users[0]


def _keep_last(graph: Graph, node: Node, past_len: Node) -> Node:
    """Replace ``node`` (batch, T) on its way to the attention by its last S columns (those after the past)."""
    users = list(node.users)
    with graph.inserting_before(node.next):
        kept = graph.call_function(aten.slice.Tensor, (node, 1, past_len, END))
    for user in users:
        user.replace_input_with(node, kept)
    return kept


def _val(node: Node):
    """A node's value as the capture recorded it; a pass's ``x + c`` has that of ``x``."""
    val = node.meta.get("val")
    if val is None and node.target in (aten.add.Tensor, aten.sub.Tensor) and isinstance(node.args[0], Node):
        return _val(node.args[0])
    return val


def _model_inputs(sdpa: Node, prefix) -> tuple[Node, Node, Node | None, Node]:
    """(keys, values, mask) as the model computes them, and the node that reads them: the SDPA call, or the
    prefix's concatenations in front of it."""
    a = sdpa_args(sdpa)
    key, value, mask = a["key"], a["value"], a["attn_mask"]
    if prefix is None:
        if not isinstance(key, Node) or not isinstance(key.meta.get("val"), torch.Tensor):
            raise ExportError(f"cannot read the keys of attention {sdpa.name}")
        return key, value, mask, sdpa
    # the prefix pass made key = cat([P, k]), value = cat([P, v]), mask = cat([visible, mask])
    real_k, real_v = key.args[0][-1], value.args[0][-1]
    real_mask = mask.args[0][-1] if isinstance(mask, Node) and mask.target is aten.cat.default else None
    inserted = {n for n in sdpa.graph.nodes if n.name in set(prefix.nodes)}
    return real_k, real_v, real_mask, _PrefixConsumer(inserted)


class _PrefixConsumer:
    """The nodes a prefix inserted before an SDPA (its concatenations, and the mask columns it derives from
    the model's mask), replaced in as one reader."""

    def __init__(self, nodes: set[Node]):
        self.nodes = nodes

    def replace_input_with(self, old: Node, new: Node) -> None:
        for node in self.nodes:
            node.replace_input_with(old, new)


def _visibility(graph: Graph, mask: Node, seq: Node, past_len: Node, window: int | None,
                dtype: torch.dtype) -> Node:
    """(batch, 1, S, T) mask over the cached and new positions (see the module doc), bool or additive."""
    call = graph.call_function
    total = call(aten.sym_size.int, (mask, 1))
    query = call(aten.add.Tensor, (call(aten.arange.default, (seq,)), past_len))      # (S,) absolute index
    query = call(aten.unsqueeze.default, (query, 1))
    key = call(aten.unsqueeze.default, (call(aten.arange.default, (total,)), 0))     # (1, T)
    seen = call(aten.le.Tensor, (key, query))
    if window is not None:
        seen = call(aten.logical_and.default, (seen, call(aten.gt.Tensor, (key, call(aten.sub.Tensor,
                                                                                       (query, window))))))
    kept = call(aten.ne.Scalar, (mask, 0))
    kept = call(aten.unsqueeze.default, (call(aten.unsqueeze.default, (kept, 1)), 1))   # (B, 1, 1, T)
    seen = call(aten.logical_and.default, (call(aten.unsqueeze.default, (call(aten.unsqueeze.default,
                                                                             (seen, 0)), 0)), kept))
    seen = call(aten.logical_or.default, (seen, call(aten.eq.Tensor, (key, query))))
    if dtype == torch.bool:
        return seen
    return call(aten.where.ScalarSelf, (seen, 0.0, call(aten.full.default, ([], torch.finfo(dtype).min),
                                                         {"dtype": dtype})))


def _use_mask(sdpa: Node, consumer, old_mask: Node | None, new_mask: Node) -> None:
    if old_mask is not None:
        consumer.replace_input_with(old_mask, new_mask)
        return
    a = sdpa_args(sdpa)
    if a["attn_mask"] is not None:
        raise ExportError(f"cannot give attention {sdpa.name} a cached mask: its mask is not the model's")
    kwargs = {k: v for k, v in sdpa.kwargs.items() if k not in ("attn_mask", "is_causal")}
    sdpa.args = (a["query"], a["key"], a["value"], new_mask, a["dropout_p"], False)
    sdpa.kwargs = kwargs


def _check_mask_uses(mask: Node, ours: set[Node]) -> None:
    """After the rewrite the attention mask may only reach our masks and positions."""
    reached = upstream(ours)
    for user in mask.users:
        if user.op == "call_function" and user.target is aten.sym_size.int or user in reached:
            continue
        raise ExportError(f"the model reads attention_mask at {user.name} in a way the KV-cache rewrite "
                          "does not know (positions from the mask, say)")

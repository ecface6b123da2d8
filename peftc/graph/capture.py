"""Capture a model as an aten graph with torch.export (non-strict), dynamic batch and sequence length.

The captured module takes the model's inputs in the order of its :class:`~peftc.graph.signature.Signature`
(``(input_ids, attention_mask)`` for a text model) and returns what the signature's kind says: logits for a
language model or a classifier, the last hidden state for a base model. Module paths in node metadata and weight targets carry the prefix
``hf.``, which :func:`module_path` strips so that paths are the Hugging Face model's own names.

Captures are cached in process, per model object (held weakly) and a fingerprint of what the capture
depends on; a hit hands out a copy of the cached graph module that reads the same weight tensors.
:func:`clear_cache` empties the cache and ``PEFTC_CAPTURE_CACHE=0`` turns it off."""
from __future__ import annotations

import copy
import os
import time
import warnings
import weakref
from dataclasses import dataclass
from itertools import chain

import torch
from torch.export import Dim
from torch.fx import GraphModule, Node

from peftc.errors import ModelError
from peftc.graph.signature import SIGNATURE, TEXT, Signature, signature_of

PREFIX = "hf."
INPUT_NAMES = ("input_ids", "attention_mask")


class _Wrapper(torch.nn.Module):
    def __init__(self, hf: torch.nn.Module, signature: Signature):
        super().__init__()
        self.hf = hf
        self.signature = signature

    def forward(self, *inputs):
        return self.signature.call(self.hf, inputs)


@dataclass
class Captured:
    gm: GraphModule
    kind: str            # the signature's kind: "causal-lm", "seq2seq-lm", "classifier" or "encoder"
    config: object       # the Hugging Face config
    seconds: float
    cached: bool = False  # the graph is a copy of a cached capture of the same model
    #: the program torch.export gave, which the ONNX export reuses while the graph is unchanged
    base: "BaseProgram | None" = None
    signature: Signature = Signature(TEXT, "causal-lm", "logits")


@dataclass
class BaseProgram:
    """The ExportedProgram of a capture and the code of its unmodified graph module: a compiled model whose
    graph still has exactly that code (a merge that folded every adapter) is this program with other
    weights, so :func:`peftc.export.onnx.export_onnx` converts it instead of capturing the model again."""
    program: torch.export.ExportedProgram
    code: str


def example_inputs(batch: int = 2, seq: int = 8, vocab: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return ids, torch.ones_like(ids)


def dynamic_shapes(max_seq: int):
    batch = Dim("batch", min=1, max=4096)
    seq = Dim("sequence", min=1, max=max(2, max_seq))
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}


def max_positions(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return 8192


def capture(model: torch.nn.Module) -> Captured:
    """Capture ``model`` (a transformers model) as a GraphModule with dynamic batch and sequence; from the
    cache when this model object was captured before and its fingerprint has not changed."""
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError(f"{type(model).__name__} has no .config: peftc captures Hugging Face models")
    signature = output_of(model)
    inputs = signature.examples(config)
    max_seq = max_positions(config)
    if os.environ.get("PEFTC_CAPTURE_CACHE", "1") == "0":
        return _export(model, config, signature, inputs, max_seq)
    start = time.perf_counter()
    key = fingerprint(model, config, inputs, max_seq)
    entry = _CACHE.get(model)
    if entry is not None and entry.fingerprint == key:
        gm = copy_graph_module(entry.gm)
        return Captured(gm=gm, kind=signature.kind, config=config, seconds=time.perf_counter() - start,
                        cached=True, base=entry.base, signature=signature)
    captured = _export(model, config, signature, inputs, max_seq)
    _CACHE[model] = _Entry(key, captured.gm, captured.base)
    gm = copy_graph_module(captured.gm)
    return Captured(gm=gm, kind=signature.kind, config=config, seconds=time.perf_counter() - start,
                    base=captured.base, signature=signature)


def _export(model: torch.nn.Module, config, signature: Signature, inputs: tuple, max_seq: int) -> Captured:
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        ep = torch.export.export(_Wrapper(model, signature), inputs,
                                 dynamic_shapes=(signature.dynamic(max_seq),), strict=False)
    except Exception as exc:
        raise ModelError(f"torch.export could not capture {type(model).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    gm = ep.module()
    gm.meta[SIGNATURE] = signature
    if any(p.is_meta for p in gm.parameters()):
        for graph in (gm.graph, ep.graph_module.graph):
            on_cpu(graph)
    _freeze(gm)
    if grouped_query_attention(gm.graph):
        gm.recompile()
    return Captured(gm=gm, kind=signature.kind, config=config, seconds=time.perf_counter() - start,
                    base=BaseProgram(weightless(ep), gm.code), signature=signature)


def weightless(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` with every weight and constant tensor replaced by a meta tensor of its shape and dtype: what a
    :class:`BaseProgram` keeps, which names the tensors a compiled model supplies. Holding the capture's own
    tensors would keep the float weights a quant pass replaced alive for as long as the compiled model."""
    def meta(value):
        if not isinstance(value, torch.Tensor):
            return value
        empty = torch.empty(value.shape, dtype=value.dtype, device=META)
        return torch.nn.Parameter(empty, requires_grad=False) if isinstance(value, torch.nn.Parameter) else empty
    return torch.export.ExportedProgram(
        root=ep.graph_module, graph=ep.graph, graph_signature=ep.graph_signature,
        state_dict={name: meta(t) for name, t in ep.state_dict.items()}, range_constraints=ep.range_constraints,
        module_call_graph=ep.module_call_graph, constants={name: meta(t) for name, t in ep.constants.items()},
        verifiers=ep.verifiers)


META, CPU = torch.device("meta"), torch.device("cpu")


def on_cpu(graph) -> None:
    """Make a graph captured from a model whose weights were on the meta device compute on the CPU:
    torch.export writes the device its example values had into the graph (``arange(..., device=meta)`` for
    positions, device checks in ``_assert_tensor_metadata``), and the weights read in later are CPU tensors."""
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.kwargs.get("device") == META:
            node.kwargs = {**node.kwargs, "device": CPU}
        if any(a == META for a in node.args if isinstance(a, torch.device)):
            node.args = tuple(CPU if isinstance(a, torch.device) and a == META else a for a in node.args)
    graph.owning_module.recompile()


def output_of(model: torch.nn.Module) -> Signature:
    """The signature of ``model``: a transformers model's from its class and config, without running it (its
    weights may be on the meta device, :func:`peftc.graph.signature.signature_of`); another module's from
    what one eager forward on text returns."""
    if hasattr(type(model), "get_output_embeddings"):       # a transformers model: its class tells
        return signature_of(model)
    return _probe(model)


def _probe(model: torch.nn.Module) -> Signature:
    """The text signature of a module that is not a transformers model, from what one eager forward returns."""
    ids, mask = example_inputs(vocab=min(32, getattr(model.config, "vocab_size", 32) or 32))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probe = model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        model.train(was_training)
    for kind, output in (("causal-lm", "logits"), ("encoder", "last_hidden_state")):
        if getattr(probe, output, None) is not None:
            return Signature(TEXT, kind, output)
    raise ModelError(f"{type(model).__name__} returns neither logits nor last_hidden_state")


def grouped_query_attention(graph) -> int:
    """Let SDPA read grouped keys and values as they are (``enable_gqa=True``) where the captured graph
    copies them to every query head first (transformers' ``repeat_kv``: unsqueeze, expand, reshape). Same
    result (tested bit-identical), without the copies of K and V per layer and their gradients' sums.
    Returns how many attentions changed."""
    aten = torch.ops.aten
    changed = 0
    for node in graph.nodes:
        if node.target is not aten.scaled_dot_product_attention.default or node.kwargs.get("enable_gqa"):
            continue
        key, value = _repeated(node.args[1]), _repeated(node.args[2])
        if key is None or value is None or key[1] != value[1]:
            continue
        old = node.args[1], node.args[2]
        node.args = (node.args[0], key[0], value[0]) + tuple(node.args[3:])
        node.kwargs = dict(node.kwargs, enable_gqa=True)
        for reshape in old:
            expand = reshape.args[0]
            unsqueeze = expand.args[0]
            for dead in (reshape, expand, unsqueeze):
                graph.erase_node(dead)
        changed += 1
    return changed


def _repeated(node) -> tuple[Node, int] | None:
    """``(x, rep)`` when ``node`` is ``reshape(expand(unsqueeze(x, 2), [b, h, rep, s, d]), [b, h·rep, s, d])``
    and nothing else reads the intermediate values; else None."""
    aten = torch.ops.aten
    chain = [node]
    for target in (aten.reshape.default, aten.expand.default, aten.unsqueeze.default):
        current = chain[-1]
        if not (isinstance(current, Node) and current.op == "call_function" and current.target is target
                and len(current.users) == 1):
            return None
        chain.append(current.args[0])
    reshape, expand, unsqueeze, x = chain
    if unsqueeze.args[1] != 2 or not all(isinstance(n.meta.get("val"), torch.Tensor) for n in chain):
        return None
    xv, ev, rv = x.meta["val"], expand.meta["val"], reshape.meta["val"]
    if xv.dim() != 4 or ev.dim() != 5 or rv.dim() != 4:
        return None
    rep = ev.shape[2]
    if not isinstance(rep, int) or ev.shape[1] != xv.shape[1] or rv.shape[1] != xv.shape[1] * rep:
        return None
    return x, rep


# --- the capture cache -----------------------------------------------------------------------------------
@dataclass
class _Entry:
    fingerprint: tuple
    gm: GraphModule      # pristine: never run through a pass; only copies of it are handed out
    base: BaseProgram


_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, _Entry] = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Forget every cached capture."""
    _CACHE.clear()


def fingerprint(model: torch.nn.Module, config, inputs: tuple, max_seq: int) -> tuple:
    """What a capture of ``model`` depends on: its class and config, which module objects it holds, which
    tensor objects its parameters and buffers are (with shape, dtype and device), and the example inputs.
    The captured graph reads the model's own tensor objects, so in-place weight updates leave it valid;
    replacing a module or a parameter, or moving the model to another dtype or device, changes this.
    Modules are held as weak references (equal while their referents are alive and the same object)."""
    tensors = tuple((name, id(t), tuple(t.shape), t.dtype, t.device)
                    for name, t in chain(model.named_parameters(remove_duplicate=False),
                                         model.named_buffers(remove_duplicate=False)))
    modules = tuple((name, weakref.ref(module)) for name, module in model.named_modules(remove_duplicate=False))
    shapes = tuple((tuple(t.shape), t.dtype) for t in inputs)
    return (type(model), _config_text(config), getattr(config, "_attn_implementation", None),
            tensors, modules, shapes, max_seq)


def _config_text(config) -> str:
    """A transformers config as its JSON; another config object as the repr of its attributes."""
    to_json = getattr(config, "to_json_string", None)
    return to_json() if to_json is not None else repr(sorted(vars(config).items()))


def deepcopy_quietly(obj, memo: dict | None = None):
    """``copy.deepcopy``, without the FutureWarning torch's pytree specs (held by captured graphs) give when
    they are deep-copied: nothing for a user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(obj, memo)


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A GraphModule with its own graph, submodules and node metadata dicts (whose values it shares), reading
    the very parameter and buffer tensors of ``gm`` that do not require gradients (the frozen base; the
    trainable ones are copied): passes and folds can rewrite the copy without touching ``gm``, and no base
    weight is held twice. The copy's parameters are frozen."""
    frozen = [t for t in chain(gm.parameters(), gm.buffers()) if not t.requires_grad]
    out = deepcopy_quietly(gm, {id(t): t for t in frozen})
    _freeze(out)
    return out


def _freeze(gm: GraphModule) -> None:
    """Base weights do not require gradients. They are the model's own parameter objects: a capture freezes
    the model's parameters too."""
    for param in gm.parameters():
        param.requires_grad_(False)


def module_path(node: Node) -> str | None:
    """The Hugging Face module path of the innermost module that produced ``node``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return strip_prefix(path)


def module_type(node: Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    typ = list(stack.values())[-1][1]
    return typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))


def strip_prefix(path: str) -> str:
    return path[len(PREFIX):] if path.startswith(PREFIX) else path

"""The pass manager: one pass per spec statement, looked up in a registry keyed by the DSL keyword.

A pass is a small class with ``keyword`` and ``run(ctx, statement) -> PassResult``, and optionally
``finish(ctx) -> PassResult``, run once after its last statement (LoRA fuses A projections there). Every
node it inserts is tagged through :meth:`CompileContext.tag` with the pass and the statement's span. After
each step that modified the graph it is linted, and recompiled once at the end; a failure is reported as
"error in pass X (file:line:col) after [A, B]"."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule, Node

from peftc.graph.analysis import ModelSites
from peftc.lang.diagnostics import SpecError
from peftc.errors import PassError, PeftcError
from peftc.weights import materialize

META_KEY = "peftc"
aten = torch.ops.aten


@dataclass
class PassResult:
    graph_module: GraphModule
    modified: bool


@dataclass
class CompileContext:
    gm: GraphModule
    sites: ModelSites
    spec: Any                       # peftc.lang.spec.Spec
    kind: str                       # "causal-lm" or "encoder"
    records: list = field(default_factory=list)   # what each pass inserted, in order
    timings: dict[str, float] = field(default_factory=dict)
    #: linear node name -> name of the node that now carries its output (after LoRA sums, IA3 scales...)
    outputs: dict[str, str] = field(default_factory=dict)
    #: the model reference (for its tokenizer) and its Hugging Face config, when known
    model_ref: str | None = None
    config: Any = None
    #: HF PEFT's ``autocast_adapter_dtype``: weights a pass inserts beside a bfloat16/float16 base are
    #: float32, their input is cast to float32 and their result back; False keeps them in the base's dtype
    autocast_adapter_dtype: bool = True
    #: a streamed model's checkpoint: its base tensors are on the meta device until read (value())
    checkpoint: Any = None
    #: (node name, dtype) -> the one cast of that node to that dtype, shared by every pass that needs it
    casts: dict[tuple[str, torch.dtype], Node] = field(default_factory=dict)

    def output_of(self, node_name: str) -> Node:
        """The node carrying a linear's output now: a pass that adds to or scales it builds on this."""
        site = self.sites.by_node.get(node_name)
        name = self.outputs.get(node_name) or (site.output if site and site.output else node_name)
        return next(n for n in self.gm.graph.nodes if n.name == name)

    def replace_output(self, node_name: str, new: Node, inserted=()) -> None:
        """Route every user of the linear's current output to ``new`` (which itself reads that output),
        except ``new`` and the ``inserted`` nodes that compute it."""
        tip = self.output_of(node_name)
        own = {new, *inserted}
        tip.replace_all_uses_with(new, delete_user_cb=lambda user: user not in own)
        self.outputs[node_name] = new.name

    def value(self, target: str) -> torch.Tensor:
        """The graph module's tensor ``target`` with its values: a streamed model's is read from the
        checkpoint first and kept in place (a pass copying a base weight, a prompt read from the embedding)."""
        if self.checkpoint is not None and attrgetter(target)(self.gm).is_meta:
            materialize(self.gm, self.checkpoint, [target])
        return attrgetter(target)(self.gm)

    def dtypes(self, node_name: str) -> tuple[torch.dtype, torch.dtype]:
        """(base, adapter): the dtype the captured node ``node_name`` computes in, and the dtype of the
        weights a pass inserts beside it (float32 on a half-precision base under autocast)."""
        node = next(n for n in self.gm.graph.nodes if n.name == node_name)
        base = node.meta["val"].dtype
        half = base in (torch.float16, torch.bfloat16)
        return base, torch.float32 if half and self.autocast_adapter_dtype else base

    def cast(self, node: Node, dtype: torch.dtype, current: torch.dtype) -> Node:
        """``node`` (of dtype ``current``) as ``dtype``: the node itself when they agree, else one
        ``_to_copy`` right after it, made once and shared (so LoRA's A projections of one input still fuse)."""
        if dtype == current:
            return node
        key = (node.name, dtype)
        if key not in self.casts:
            with self.gm.graph.inserting_after(node):
                self.casts[key] = self.gm.graph.call_function(aten._to_copy.default, (node,), {"dtype": dtype})
        return self.casts[key]

    def tag(self, node: Node, keyword: str, statement, index: int) -> Node:
        span = statement.span
        node.meta[META_KEY] = {"pass": keyword, "statement": index,
                               "span": f"{span.filename or '<spec>'}:{span.line}:{span.column}"}
        return node

    def add_module(self, name: str, module: torch.nn.Module) -> str:
        self.gm.add_submodule(name, module)
        return name

    def module_name(self, method: str) -> str:
        """A fresh attribute name for the next submodule ``method`` inserts: ``peftc_lora_3``."""
        return f"peftc_{method}_{sum(r.method == method for r in self.records)}"

    def refuse_reclaim(self, statement, earlier, claim: str, already: str = "already does", *,
                       joiner: str = "; ", note: str = "") -> None:
        """Stop a statement that claims what the ``earlier`` record's statement claimed: a located error
        naming both lines, ``this <method> statement <claim>; line L (column C) <already>``."""
        first = self.spec.statements[earlier.statement]
        raise SpecError.at(statement.span, f"this {statement.method} statement {claim}{joiner}line "
                           f"{first.span.line} (column {first.span.column}{note}) {already}", self.spec.source)


#: The phases passes run in, each after the ones before it; statements of one phase run in spec order.
PHASES = (
    "own-weights",    # full: trainable copies of whole weights (and biases), kept in full precision
    "quantize",       # quant: store the other frozen linears quantized; later passes build on them
    "own-biases",     # bitfit: trainable biases, of the weights as they now are
    "low-rank",       # lora: a branch added to a linear's output
    "scale",          # ia3: a scale on the output as lora left it (or on a down projection's input)
    "adapters",       # adapter: a module after a sublayer's (adapted, scaled) output
    "attention",      # prefix: rewrites only the attention calls, whatever the linears became
    "inputs",         # prompt: last, it pads the inputs and cuts the output
)


class Pass:
    """Base class of rewrite passes; subclasses set ``keyword`` and ``phase`` and implement ``run``."""
    keyword: ClassVar[str]
    #: one of :data:`PHASES`: where the pass runs among the others
    phase: ClassVar[str]

    def run(self, ctx: CompileContext, statement, index: int) -> PassResult:
        raise PassError(f"pass {type(self).__name__} does not implement run()")


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if cls.keyword in REGISTRY:
        raise PassError(f"two passes registered for '{cls.keyword}'")
    if cls.phase not in PHASES:
        raise PassError(f"pass '{cls.keyword}' names phase '{cls.phase}', not one of {', '.join(PHASES)}")
    REGISTRY[cls.keyword] = cls
    return cls


def load_passes() -> dict[str, type[Pass]]:
    """The registry: every pass of :data:`peftc.methods.PASSES`, registered when :mod:`peftc.methods` is
    imported (by :mod:`peftc.compiler.compiled`, and so by ``import peftc``)."""
    return REGISTRY


def order(statements) -> list[tuple[int, Any]]:
    """Deterministic order: by the pass's phase, then by position in the spec."""
    registry = load_passes()
    indexed = list(enumerate(statements))
    return sorted(indexed, key=lambda item: (PHASES.index(registry[item[1].method].phase)
                                             if item[1].method in registry else len(PHASES), item[0]))


class PassManager:
    def __init__(self, ctx: CompileContext):
        self.ctx = ctx
        self.done: list[str] = []
        self.modified = False

    def run(self) -> GraphModule:
        registry = load_passes()
        spec = self.ctx.spec
        for index, statement in order(spec.statements):
            if statement.method not in registry:
                raise SpecError.at(statement.span, f"'{statement.method}' is not supported yet: "
                                   "it parses and validates, but no pass compiles it in this version",
                                   spec.source)
        ordered = order(spec.statements)
        last = {statement.method: position for position, (_, statement) in enumerate(ordered)}
        for position, (index, statement) in enumerate(ordered):
            pass_ = registry[statement.method]()
            span = statement.span
            where = f"{span.filename or '<spec>'}:{span.line}:{span.column}"
            self._step(statement.method, where, lambda: pass_.run(self.ctx, statement, index))
            self.done.append(statement.method)
            finish = getattr(pass_, "finish", None)
            if finish is not None and last[statement.method] == position:
                self._step(statement.method, "finish", lambda: finish(self.ctx))
        if self.modified:       # no pass runs the graph module, so its code is generated once
            self.ctx.gm.recompile()
        return self.ctx.gm

    def _step(self, method: str, where: str, step) -> None:
        """Run one step (a statement's pass, or a pass's finish): lint, time, report failures."""
        start = time.perf_counter()
        try:
            result = step()
            self.ctx.gm = result.graph_module
            if result.modified:
                self.ctx.gm.graph.lint()
                self.modified = True
        except (SpecError, PeftcError):
            raise
        except Exception as exc:
            raise PassError(f"error in pass '{method}' ({where}) after "
                            f"[{', '.join(self.done)}]: {type(exc).__name__}: {exc}") from exc
        self.ctx.timings[f"{method}@{where}"] = time.perf_counter() - start

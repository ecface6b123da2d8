"""``quant nf4|int8 [targets]``: store the frozen base linears quantized and compute with them (QLoRA).

Each selected linear becomes one ``peftc::nf4_linear`` (or ``int8_linear``; ``_addmm`` for a GPT-2 Conv1D)
node reading buffers of a ``peftc_quant_<i>`` module; the float weight leaves the graph module. The node
keeps its name and the position of its input, so ``lora`` — which runs later (phase quantize before low-rank) — attaches
to it unchanged and trains against the dequantized weight. The default target ``base`` is every linear
but the output head, less the linears a ``full`` statement trains. ``fold`` (run by ``merge()`` before the
LoRA folds) turns the node back into a float linear holding ``dequant(W)``, so LoRA is merged onto the
weight it was trained against."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch.fx import GraphModule

from peftc.compiler.record import Record
from peftc.graph.owned import OwnedRecord
from peftc.graph.analysis import LinearSite
from peftc.lang.diagnostics import SpecError
from peftc.compiler.passmanager import CompileContext, Pass, PassResult, register
from peftc.quant.rewrite import dequantize_site, float_weight, quantize_site, quantize_weight, quantized_parts
from peftc.graph.targets import select_linears


@dataclass
class QuantRecord(Record):
    statement: int
    site: LinearSite
    module: str                 # attribute name of the QuantizedWeight on the graph module
    scheme: str
    numel: int                  # weights quantized
    nbytes: int                 # bytes they take quantized
    float_bytes: int            # bytes they took before
    nodes: list[str] = field(default_factory=list)   # the get_attr nodes of the buffers
    method: str = "quant"
    foldable: ClassVar[bool] = True      # nothing to train (its buffers are frozen); it folds to dequant(W)

    def fold(self, gm: GraphModule) -> None:
        QuantPass.fold_site(gm, self)

    def folded_weights(self) -> dict[str, str]:
        return {f"{self.module}_weight": self.site.weight}


@register
class QuantPass(Pass):
    keyword = "quant"
    phase = "quantize"

    def run(self, ctx: CompileContext, statement, index: int) -> PassResult:
        opts = statement.options
        scheme = statement.leading
        sites = [s for s in select_linears(statement, ctx.sites, ctx.spec) if s.node not in _trained_weights(ctx)]
        if not sites:
            raise SpecError.at(statement.span, f"'{statement}' selects only linears a 'full' statement trains",
                               ctx.spec.source)
        _check_overlap(ctx, statement, sites)
        for site in sites:
            weight = float_weight(ctx.gm, site, ctx.checkpoint)
            stored = quantize_weight(weight, scheme, block_size=opts["block"], double_quant=opts["double_quant"])
            record = QuantRecord(statement=index, site=site, module=ctx.module_name("quant"), scheme=scheme,
                                 numel=weight.numel(), nbytes=stored.nbytes,
                                 float_bytes=weight.numel() * weight.element_size())
            inserted = quantize_site(ctx.gm, site, record.module, stored)
            for node in inserted:
                ctx.tag(node, self.keyword, statement, index)
            record.nodes = [n.name for n in inserted]
            ctx.records.append(record)
        _own_storage(ctx.gm)
        return PassResult(ctx.gm, modified=True)

    @staticmethod
    def fold_site(gm: GraphModule, record: QuantRecord) -> None:
        """Put ``dequant(W)`` back as the site's float weight (what a LoRA on it trained against)."""
        _node, _scheme, _layout, module = quantized_parts(gm, record.site)
        (name,) = record.folded_weights()
        dequantize_site(gm, record.site, module.dequantize(), name)


def _own_storage(gm: GraphModule) -> None:
    """Give the float weights left unquantized storage of their own. A model loaded from safetensors
    keeps its weights in one memory-mapped file, and any weight left in it (the embedding, the norms)
    keeps the whole mapping, quantized weights included, resident. Tensors sharing storage (tied
    weights) keep sharing it."""
    copies: dict[int, torch.UntypedStorage] = {}
    floats = [t for name, t in list(gm.named_parameters()) + list(gm.named_buffers())
              if not name.startswith("peftc_quant_") and not t.is_meta]     # meta: no storage at all
    with torch.no_grad():
        for tensor in floats:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in copies:
                copies[key] = storage.clone()
            tensor.data = torch.empty(0, dtype=tensor.dtype).set_(copies[key], tensor.storage_offset(),
                                                                   tensor.size(), tensor.stride())


def _trained_weights(ctx: CompileContext) -> set[str]:
    """Nodes of the linears whose weight an earlier pass (``full``, phase own-weights) trains: ``base``
    leaves them in full precision."""
    return {r.site.node for r in ctx.records if isinstance(r, OwnedRecord) and "weight" in r.names}


def _check_overlap(ctx: CompileContext, statement, sites: list[LinearSite]) -> None:
    taken = {r.site.node: r for r in ctx.records if r.method == "quant"}
    for site in sites:
        if site.node in taken:
            ctx.refuse_reclaim(statement, taken[site.node], f"quantizes {site.path} again")

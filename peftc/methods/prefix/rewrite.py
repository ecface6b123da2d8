"""``prefix tokens=P [project=H] [layers=...]``: prefix tuning by rewriting each attention's SDPA call.

Every selected ``scaled_dot_product_attention(q, k, v, mask)`` becomes
``sdpa(q, [Pk; k], [Pv; v], [visible; mask])``: learned key and value prefixes (P positions, the number of
*key/value* heads, so grouped-query attention needs no more than HF PEFT stores; they are repeated like
``repeat_kv`` when the keys reach SDPA already repeated) are concatenated along the sequence axis, and the
mask gains P columns every query can see (bool, float and ``is_causal=True`` attention alike), or, in a
sliding-window attention, only while they are inside the query's window, as the window drops cached
tokens (:mod:`peftc.methods.prefix.window` finds which attentions slide, from their masks). Attention spelt
out as ``matmul(softmax(f(q·kᵀ) + mask), v)`` (eager attention, Bloom's with ALiBi;
:mod:`peftc.methods.prefix.explicit`) is rewritten the same way: the prefixes go into k and v, the columns
into the added mask (and into ALiBi's bias, counted from the first real key).

HF PEFT feeds its prefix through the KV cache, so the real tokens sit at positions P..P+T-1. To give the
same numbers the pass shifts the model's position ids by P: it finds the integer position tensors that
reach the attention's query, key or value inputs (an ``arange`` over the sequence, a ``cumsum`` of the
attention mask as OPT computes it, or a slice of a position-id buffer as BERT keeps it) and adds P to them
on that path only; the aranges that build the mask keep their values (q and kv indices shift together).

On an encoder-decoder only the decoder's self-attentions get prefixes and only its positions move, in HF
PEFT's layout of blocks (:mod:`peftc.methods.prefix.seq2seq`).

``project=H`` is HF PEFT's ``prefix_projection``: an embedding (P × kv_heads·head_dim) and a two-layer MLP
with tanh produce every layer's prefixes while training. ``merge()`` folds it into plain prefixes, so the
merged model and its ONNX export hold only the (P × kv_heads × head_dim) tensors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.compiler.record import Record
from peftc.compiler.passmanager import CompileContext, Pass, PassResult, register
from peftc.errors import PassError
from peftc.lang.diagnostics import SpecError, check_allocation
from peftc.graph.capture import module_path
from peftc.methods.prefix.attention import AttentionSite, Emit, attention_call, attention_sites, extend_attention
from peftc.methods.prefix.explicit import SOFTMAX_OPS, explicit_attention, weighs_values
from peftc.methods.prefix.positions import shift_positions
from peftc.methods.prefix.seq2seq import decoder_nodes, hf_blocks
from peftc.methods.prefix.window import attention_windows

aten = torch.ops.aten


class PrefixWeights(nn.Module):
    """The key and value prefixes of one attention, (kv_heads, P, head_dim) each. Initialised N(0, 1)
    like HF PEFT's (an ``nn.Embedding``'s) default. Under ``project=`` the module starts empty and
    ``merge()`` fills it with the folded prefixes."""

    def __init__(self, kv_heads: int, tokens: int, head_dim: int, empty: bool = False):
        super().__init__()
        if not empty:
            self.key = nn.Parameter(torch.randn(kv_heads, tokens, head_dim))
            self.value = nn.Parameter(torch.randn(kv_heads, tokens, head_dim))


class PrefixEncoder(nn.Module):
    """HF PEFT's ``PrefixEncoder`` with ``prefix_projection``: embedding (P × d), then
    Linear(d, H) · tanh · Linear(H, layers·2·d); d = kv_heads·head_dim. Same names and initialisation."""

    def __init__(self, tokens: int, token_dim: int, hidden: int, layers: int):
        super().__init__()
        self.embedding = nn.Embedding(tokens, token_dim)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(),
                                       nn.Linear(hidden, layers * 2 * token_dim))

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


@dataclass
class PrefixRecord(Record):
    """The prefixes of one attention."""
    statement: int
    site: AttentionSite
    module: str                  # attribute name of the PrefixWeights on the graph module
    tokens: int
    index: int                   # its block in HF PEFT's layout (the position among the attentions, or
                                 # on an encoder-decoder 2i mod L: see peftc.methods.prefix.seq2seq)
    nodes: list[str] = field(default_factory=list)
    #: the position-id nodes shifted by P (shared by the statement's records)
    shifted: list[str] = field(default_factory=list)
    #: the attention's sliding window, if its mask has one: prefix positions leave it like cached tokens
    window: int | None = None
    #: False where the prefixes are an earlier attention's (HF PEFT's encoder-decoder layout shares
    #: blocks): that record names the parameters
    owner: bool = True
    method: str = "prefix"

    @property
    def key(self) -> str:
        return f"{self.site.path}.prefix"

    @property
    def positions(self) -> int:
        """Positions the shifted position ids take from the model's maximum length (counted once)."""
        return self.tokens if self.shifted and self.index == 0 and self.owner else 0

    def parameters(self, gm: GraphModule) -> dict[str, nn.Parameter]:
        return self.weights(gm) if self.owner else {}

    def weights(self, gm: GraphModule) -> dict[str, nn.Parameter]:
        """The key and value prefixes this attention reads, whichever record owns them."""
        weights = gm.get_submodule(self.module)
        return {name: getattr(weights, name) for name in ("key", "value") if hasattr(weights, name)}

    def prefixes(self, gm: GraphModule, encoder: "PrefixEncoderRecord | None" = None):
        """(key, value), (kv_heads, P, head_dim) each, as the model computes them now."""
        params = self.weights(gm)
        if params:
            return params["key"].detach(), params["value"].detach()
        if encoder is None:
            raise PassError(f"the prefixes of {self.site.path} come from a prefix encoder; pass it")
        with torch.no_grad():
            flat = gm.get_submodule(encoder.module)()
        return split(flat, self.index, self.site)


@dataclass
class PrefixEncoderRecord(Record):
    """The reparameterisation MLP of a ``prefix project=H`` statement (folded away by ``merge()``)."""
    statement: int
    module: str
    tokens: int
    hidden: int
    sites: list[AttentionSite]   # the attentions it feeds, each reading block ``blocks[i]`` of its output
    blocks: list[int]
    nodes: list[str] = field(default_factory=list)   # every node it inserted (MLP and per-layer splits)
    #: (layer module, name of the node giving its key prefix, of its value prefix)
    outputs: list[tuple[str, str, str]] = field(default_factory=list)
    method: str = "prefix"
    foldable: ClassVar[bool] = True

    def fold(self, gm: GraphModule) -> None:
        PrefixPass.fold_encoder(gm, self)

    @property
    def key(self) -> str:
        return "prefix_encoder"

    @property
    def layer(self) -> None:
        """Model-wide: it feeds every layer's attention."""
        return None

    def parameters(self, gm: GraphModule) -> dict[str, nn.Parameter]:
        return dict(gm.get_submodule(self.module).named_parameters())


def split(flat: torch.Tensor, index: int, site: AttentionSite) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention ``index``'s (key, value) from HF PEFT's flat (P, layers·2·d) prefix tensor."""
    d = site.token_dim
    out = []
    for j in (0, 1):
        block = flat[:, (2 * index + j) * d:(2 * index + j + 1) * d]
        out.append(block.reshape(flat.shape[0], site.kv_heads, site.head_dim).permute(1, 0, 2).contiguous())
    return out[0], out[1]



@register
class PrefixPass(Pass):
    keyword = "prefix"
    phase = "attention"

    def run(self, ctx: CompileContext, statement, index: int) -> PassResult:
        tokens, hidden = statement.options["tokens"], statement.options.get("project")
        sites = self._sites(ctx, statement)
        emit = Emit(ctx, statement, index, self.keyword)
        nodes = {n.name: n for n in ctx.gm.graph.nodes}
        calls = {s.node: attention_call(nodes[s.node]) for s in sites}
        windows = attention_windows(ctx.gm, ctx.config, list(calls.values()), ctx.value)
        blocks = hf_blocks(len(sites), ctx.kind == "seq2seq-lm")
        records = [PrefixRecord(statement=index, site=s, module=f"peftc_prefix_{b}", tokens=tokens, index=b,
                                window=windows.get(s.node), owner=b not in blocks[:i])
                   for i, (s, b) in enumerate(zip(sites, blocks))]
        for record in (r for r in records if r.owner):
            s = record.site
            ctx.add_module(record.module, PrefixWeights(s.kv_heads, tokens, s.head_dim, empty=hidden is not None)
                           .to(ctx.dtypes(s.node)[1]))
        encoder = None
        if hidden is not None:
            encoder = PrefixEncoderRecord(statement=index, module="peftc_prefix_encoder", tokens=tokens,
                                          hidden=hidden, sites=sites, blocks=blocks)
            ctx.add_module(encoder.module, PrefixEncoder(tokens, sites[0].token_dim, hidden, len(sites))
                           .to(ctx.dtypes(sites[0].node)[1]))
            prefix_nodes = _emit_encoder(emit, encoder, records, calls[sites[0].node].first)
        for record in records:
            s = record.site
            start = len(emit.nodes)
            if hidden is None:
                with emit.graph.inserting_before(calls[s.node].first):
                    pair = (emit.attr(f"{record.module}.key"), emit.attr(f"{record.module}.value"))
            else:
                pair = prefix_nodes[record.module]
            extend_attention(emit, nodes[s.node], pair[0], pair[1], tokens, s.heads, s.kv_heads,
                             ctx.dtypes(s.node)[1], record.window)
            record.nodes = [n.name for n in emit.nodes[start:]]
        start = len(emit.nodes)
        shifted = shift_positions(emit, tokens, decoder_nodes(ctx.gm) if ctx.kind == "seq2seq-lm" else None)
        for record in records:
            record.nodes += [n.name for n in emit.nodes[start:]]
            record.shifted = shifted
        ctx.records.extend(records)
        if encoder is not None:
            ctx.records.append(encoder)
        return PassResult(ctx.gm, modified=True)

    @staticmethod
    def _sites(ctx: CompileContext, statement) -> list[AttentionSite]:
        """The attentions the statement selects, once the spec, the model and the size of what it would
        allocate are checked."""
        opts = statement.options
        tokens, hidden, layers = opts["tokens"], opts.get("project"), opts.get("layers")
        earlier = [r for r in ctx.records if r.method == "prefix"]
        if earlier:
            first = ctx.spec.statements[earlier[0].statement]
            raise SpecError.at(statement.span, f"a spec takes one prefix statement; line {first.span.line} "
                               "already has one (use layers= on it to choose attentions)", ctx.spec.source)
        unmatched = [n for n in ctx.gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX_OPS
                     and weighs_values(n) and explicit_attention(n) is None]
        if unmatched:
            where = module_path(unmatched[0]) or unmatched[0].name
            raise SpecError.at(statement.span, f"prefix cannot rewrite the attention at {where}: it is not "
                               "softmax(f(q·kᵀ) + mask)·v with scores from q·kᵀ alone (scores with "
                               "relative-position terms from q or k are not rewritten)", ctx.spec.source)
        sites = attention_sites(ctx)
        if ctx.kind == "seq2seq-lm":
            sites = _decoder_self_attentions(ctx, statement, sites)
        if not sites:
            raise SpecError.at(statement.span, "prefix needs scaled_dot_product_attention calls (or a spelt-out "
                               "softmax(q·kᵀ)·v) in the model, and it has no attention; the model has "
                               f"{ctx.sites.summary()}", ctx.spec.source)
        if layers is not None:
            sites = [s for s in sites if s.layer is not None and layers.contains(s.layer)]
            if not sites:
                raise SpecError.at(statement.span, f"'{statement}' selects no attention; the model has "
                                   f"{len(attention_sites(ctx))} attentions in layers "
                                   f"{sorted({s.layer for s in attention_sites(ctx)} - {None})}",
                                   ctx.spec.source)
        if hidden is not None and len({(s.kv_heads, s.head_dim) for s in sites}) > 1:
            raise SpecError.at(statement.span, "project= needs attentions of one key/value shape",
                               ctx.spec.source)
        if hidden is None:      # a key and a value prefix per attention
            count, where = sum(2 * s.kv_heads * tokens * s.head_dim for s in sites), "of prefixes"
        else:                   # PrefixEncoder: embedding, Linear(d, H), Linear(H, layers · 2 · d)
            d, out = sites[0].token_dim, len(sites) * 2 * sites[0].token_dim
            count, where = tokens * d + d * hidden + hidden + hidden * out + out, "in the prefix encoder"
        check_allocation(statement, ctx.spec.source, count, f"{where} for {len(sites)} attentions",
                         "lower tokens" + (" or project" if hidden is not None else ""))
        return sites

    @staticmethod
    def fold_encoder(gm: GraphModule, record: PrefixEncoderRecord) -> None:
        """Fold a prefix encoder (``project=``) into plain per-attention prefixes and remove the MLP; the
        prefixes stay graph inputs of the attentions (records of single attentions are not folded)."""
        with torch.no_grad():
            flat = gm.get_submodule(record.module)()
        if not torch.isfinite(flat).all():
            raise PassError("the prefix encoder's output contains NaN or inf; refusing to merge")
        nodes = {n.name: n for n in gm.graph.nodes}
        for (module, key_name, value_name), site, block in zip(record.outputs, record.sites, record.blocks):
            weights = gm.get_submodule(module)
            key, value = split(flat, block, site)
            weights.key = nn.Parameter(key)
            weights.value = nn.Parameter(value)
            for name, attr in ((key_name, "key"), (value_name, "value")):
                old = nodes[name]
                with gm.graph.inserting_before(old):
                    new = gm.graph.get_attr(f"{module}.{attr}")
                new.meta.update({k: v for k, v in old.meta.items() if k != "val"})
                old.replace_all_uses_with(new)
        for name in reversed(record.nodes):
            gm.graph.erase_node(nodes[name])
        gm.delete_submodule(record.module)


def _decoder_self_attentions(ctx: CompileContext, statement, sites: list[AttentionSite]) -> list[AttentionSite]:
    """An encoder-decoder's attentions that take prefixes: the decoder's self-attentions, whose keys come
    from the decoder's tokens (see :mod:`peftc.methods.prefix.seq2seq`)."""
    where = ctx.spec.source
    if statement.options.get("layers") is not None:
        raise SpecError.at(statement.span, "layers= is not taken on an encoder-decoder: HF PEFT's prefix "
                           "reaches every layer of the decoder", where)
    decoder = decoder_nodes(ctx.gm)
    nodes = {n.name: n for n in ctx.gm.graph.nodes}
    return [s for s in sites if attention_call(nodes[s.node]).key in decoder]


def _emit_encoder(emit: Emit, encoder: PrefixEncoderRecord, records: list[PrefixRecord],
                  first_sdpa: Node) -> dict[str, tuple[Node, Node]]:
    """The prefix encoder's MLP as graph ops before the first attention, its output cut into each
    attention's (key, value) prefix nodes (by record module), as HF PEFT lays its blocks out."""
    tokens, m = encoder.tokens, encoder.module
    prefix_nodes: dict[str, tuple[Node, Node]] = {}
    with emit.graph.inserting_before(first_sdpa):
        start = len(emit.nodes)
        emb = emit.attr(f"{m}.embedding.weight")
        h = emit(aten.linear.default, emb, emit.attr(f"{m}.transform.0.weight"),
                 emit.attr(f"{m}.transform.0.bias"))
        h = emit(aten.tanh.default, h)
        flat = emit(aten.linear.default, h, emit.attr(f"{m}.transform.2.weight"),
                    emit.attr(f"{m}.transform.2.bias"))
        for record in records:
            s, pair = record.site, []
            for j in (0, 1):
                lo = (2 * record.index + j) * s.token_dim
                block = emit(aten.slice.Tensor, flat, 1, lo, lo + s.token_dim)
                block = emit(aten.view.default, block, [tokens, s.kv_heads, s.head_dim])
                pair.append(emit(aten.permute.default, block, [1, 0, 2]))
            prefix_nodes[record.module] = (pair[0], pair[1])
            encoder.outputs.append((record.module, pair[0].name, pair[1].name))
        encoder.nodes = [n.name for n in emit.nodes[start:]]
    return prefix_nodes

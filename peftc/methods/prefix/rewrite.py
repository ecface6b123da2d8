"""``prefix tokens=P [project=H] [layers=...]``: prefix tuning by rewriting each attention's SDPA call.

Every selected ``scaled_dot_product_attention(q, k, v, mask)`` becomes
``sdpa(q, [Pk; k], [Pv; v], [visible; mask])``: learned key and value prefixes (P positions, the number of
*key/value* heads, so grouped-query attention needs no more than HF PEFT stores; they are repeated like
``repeat_kv`` when the keys reach SDPA already repeated) are concatenated along the sequence axis, and the
mask gains P columns every query can see (bool, float and ``is_causal=True`` attention alike).

HF PEFT feeds its prefix through the KV cache, so the real tokens sit at positions P..P+T-1. To give the
same numbers the pass shifts the model's position ids by P: it finds the integer position tensors that
reach the attention's query, key or value inputs (an ``arange`` over the sequence, a ``cumsum`` of the
attention mask as OPT computes it, or a slice of a position-id buffer as BERT keeps it) and adds P to them
on that path only; the aranges that build the mask keep their values (q and kv indices shift together).

``project=H`` is HF PEFT's ``prefix_projection``: an embedding (P × kv_heads·head_dim) and a two-layer MLP
with tanh produce every layer's prefixes while training. ``merge()`` folds it into plain prefixes, so the
merged model and its ONNX export hold only the (P × kv_heads × head_dim) tensors."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.graph.analysis import ATTENTION_OPS, _layer_of
from peftc.graph.capture import module_path
from peftc.lang.diagnostics import SpecError, check_allocation
from peftc.errors import PassError
from peftc.compiler.passmanager import CompileContext, Pass, PassResult, register

aten = torch.ops.aten
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
SDPA_DEFAULTS = (None, None, None, None, 0.0, False)
ARANGE_OPS = {aten.arange.default, aten.arange.start, aten.arange.start_step}
INT_DTYPES = {torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8}


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
class PrefixRecord:
    """The prefixes of one attention."""
    statement: int
    site: AttentionSite
    module: str                  # attribute name of the PrefixWeights on the graph module
    tokens: int
    index: int                   # position among the statement's attentions (its block in HF's layout)
    nodes: list[str] = field(default_factory=list)
    #: the position-id nodes shifted by P (shared by the statement's records)
    shifted: list[str] = field(default_factory=list)
    method: str = "prefix"
    foldable: bool = False       # stays a graph op in the merged model and the export

    @property
    def key(self) -> str:
        return f"{self.site.path}.prefix"

    @property
    def positions(self) -> int:
        """Positions the shifted position ids take from the model's maximum length (counted once)."""
        return self.tokens if self.shifted and self.index == 0 else 0

    def parameters(self, gm: GraphModule) -> dict[str, nn.Parameter]:
        weights = gm.get_submodule(self.module)
        return {name: getattr(weights, name) for name in ("key", "value") if hasattr(weights, name)}

    def prefixes(self, gm: GraphModule, encoder: "PrefixEncoderRecord | None" = None):
        """(key, value), (kv_heads, P, head_dim) each, as the model computes them now."""
        params = self.parameters(gm)
        if params:
            return params["key"].detach(), params["value"].detach()
        if encoder is None:
            raise PassError(f"the prefixes of {self.site.path} come from a prefix encoder; pass it")
        with torch.no_grad():
            flat = gm.get_submodule(encoder.module)()
        return _split(flat, self.index, self.site)


@dataclass
class EncoderSite:
    path: str = "prefix_encoder"
    layer: None = None


@dataclass
class PrefixEncoderRecord:
    """The reparameterisation MLP of a ``prefix project=H`` statement (folded away by ``merge()``)."""
    statement: int
    module: str
    tokens: int
    hidden: int
    sites: list[AttentionSite]   # the attentions it feeds, in the order of its output blocks
    site: EncoderSite = field(default_factory=EncoderSite)
    nodes: list[str] = field(default_factory=list)   # every node it inserted (MLP and per-layer splits)
    #: (layer module, name of the node giving its key prefix, of its value prefix)
    outputs: list[tuple[str, str, str]] = field(default_factory=list)
    method: str = "prefix"
    foldable: bool = True

    @property
    def key(self) -> str:
        return "prefix_encoder"

    def parameters(self, gm: GraphModule) -> dict[str, nn.Parameter]:
        return dict(gm.get_submodule(self.module).named_parameters())


def _split(flat: torch.Tensor, index: int, site: AttentionSite) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention ``index``'s (key, value) from HF PEFT's flat (P, layers·2·d) prefix tensor."""
    d = site.token_dim
    out = []
    for j in (0, 1):
        block = flat[:, (2 * index + j) * d:(2 * index + j + 1) * d]
        out.append(block.reshape(flat.shape[0], site.kv_heads, site.head_dim).permute(1, 0, 2).contiguous())
    return out[0], out[1]


class _Emit:
    """Insert aten calls into a graph, tagging each and remembering it."""

    def __init__(self, ctx: CompileContext, statement, index: int, keyword: str):
        self.ctx, self.statement, self.index, self.keyword = ctx, statement, index, keyword
        self.graph = ctx.gm.graph
        self.nodes: list[Node] = []

    def __call__(self, target, *args, **kwargs) -> Node:
        node = self.graph.call_function(target, args, kwargs)
        return self._keep(node)

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


def extend_attention(emit: _Emit, sdpa: Node, key_prefix: Node, value_prefix: Node, tokens: int,
                     heads: int, kv_heads: int) -> None:
    """Rewrite ``sdpa`` to attend over ``tokens`` prefix positions first. ``key_prefix``/``value_prefix``
    are (kv_heads, P, head_dim) nodes; emitted nodes go before ``sdpa``. With ``enable_gqa`` SDPA repeats
    the heads itself, else prefixes are repeated like transformers' ``repeat_kv`` (head h reads kv head
    h // (heads / kv_heads))."""
    a = sdpa_args(sdpa)
    q, k, v, mask, causal = a["query"], a["key"], a["value"], a["attn_mask"], a["is_causal"]
    k_val = k.meta.get("val")
    with emit.graph.inserting_before(sdpa):
        batch = emit(aten.sym_size.int, k, 0)
        expanded = []
        for prefix in (key_prefix, value_prefix):
            if heads != kv_heads and not a["enable_gqa"]:
                rep = heads // kv_heads
                prefix = emit(aten.unsqueeze.default, prefix, 1)
                prefix = emit(aten.expand.default, prefix, [kv_heads, rep, tokens, -1])
                prefix = emit(aten.reshape.default, prefix, [heads, tokens, -1])
            if k_val is not None and k_val.dtype != torch.float32:
                prefix = emit(aten._to_copy.default, prefix, dtype=k_val.dtype)
            prefix = emit(aten.unsqueeze.default, prefix, 0)
            expanded.append(emit(aten.expand.default, prefix, [batch, -1, -1, -1]))
        new_k = emit(aten.cat.default, [expanded[0], k], 2)
        new_v = emit(aten.cat.default, [expanded[1], v], 2)
        if mask is not None:
            new_mask = _extend_mask(emit, mask, tokens)
        elif causal:
            # is_causal is top-left aligned: query i sees keys 0..i; the prefix columns are seen by all
            tq = emit(aten.sym_size.int, q, 2)
            tk = emit(aten.sym_size.int, k, 2)
            tri = emit(aten.tril.default, emit(aten.new_ones.default, q, [tq, tk], dtype=torch.bool))
            seen = emit(aten.new_ones.default, q, [tq, tokens], dtype=torch.bool)
            new_mask = emit(aten.cat.default, [seen, tri], 1)
        else:
            new_mask = None
    kwargs = {"scale": a["scale"]} if a["scale"] is not None else {}
    if a["enable_gqa"]:
        kwargs["enable_gqa"] = True
    sdpa.args = (q, new_k, new_v, new_mask, a["dropout_p"], False)
    sdpa.kwargs = kwargs


def _extend_mask(emit: _Emit, mask: Node, tokens: int) -> Node:
    """[visible × P, mask] along the last axis: True for a bool mask, 0 for an additive float mask."""
    val = mask.meta.get("val")
    is_bool = val is None or val.dtype == torch.bool
    ndim = val.dim() if val is not None else 4
    first = emit(aten.slice.Tensor, mask, ndim - 1, 0, 1)
    fill = emit(aten.full_like.default, first, True if is_bool else 0.0)
    cols = emit(aten.expand.default, fill, [-1] * (ndim - 1) + [tokens])
    return emit(aten.cat.default, [cols, mask], ndim - 1)


def attention_sites(ctx: CompileContext) -> list[AttentionSite]:
    """Every SDPA call in graph order, with the key heads it receives and those its k projection makes."""
    gm, sites = ctx.gm, ctx.sites
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ATTENTION_OPS:
            continue
        k = sdpa_args(node)["key"]
        val = k.meta.get("val") if isinstance(k, Node) else None
        if val is None or val.dim() != 4:
            raise PassError(f"cannot read the key shape of attention {node.name}")
        heads, head_dim = int(val.shape[1]), int(val.shape[3])
        path = module_path(node) or node.name
        kv_features = _key_features(k, sites)
        kv_heads = heads
        if kv_features and kv_features % head_dim == 0 and heads % (kv_features // head_dim) == 0:
            kv_heads = kv_features // head_dim
        found.append(AttentionSite(node.name, path, _layer_of(path), heads, kv_heads, head_dim))
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


def _value_path(gm: GraphModule) -> set[Node]:
    """Nodes that reach some attention's query, key or value (not only its mask)."""
    out: set[Node] = set()
    frontier = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ATTENTION_OPS:
            frontier += [a for a in node.args[:3] if isinstance(a, Node)]
    while frontier:
        node = frontier.pop()
        if node in out:
            continue
        out.add(node)
        if node.op == "call_function" and node.target in ATTENTION_OPS:
            frontier += [a for a in node.args[:3] if isinstance(a, Node)]
        else:
            frontier += node.all_input_nodes
    return out


def _is_int(node: Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype in INT_DTYPES


def position_roots(gm: GraphModule) -> list[Node]:
    """The integer position tensors of the sequence that feed the attention's inputs (see the module doc)."""
    on_path = _value_path(gm)
    roots = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node not in on_path or not _is_int(node):
            continue
        if node.target in ARANGE_OPS or node.target is aten.cumsum.default:
            roots.append(node)
        elif node.target is aten.slice.Tensor and _is_arange_buffer(gm, node.args[0]):
            roots.append(node)
    # keep the outermost: a root computed from another root is shifted through it
    root_set = set(roots)
    return [r for r in roots if not any(a in root_set for a in _ancestors(r))]


def _ancestors(node: Node) -> set[Node]:
    seen, frontier = set(), list(node.all_input_nodes)
    while frontier:
        n = frontier.pop()
        if n not in seen:
            seen.add(n)
            frontier.extend(n.all_input_nodes)
    return seen


def _is_arange_buffer(gm: GraphModule, node) -> bool:
    if not (isinstance(node, Node) and node.op == "get_attr"):
        return False
    try:
        value = gm.get_buffer(node.target)
    except AttributeError:
        return False
    return value.dtype in INT_DTYPES and torch.equal(value.flatten(), torch.arange(value.numel()))


def shift_positions(emit: _Emit, tokens: int) -> list[str]:
    """Add ``tokens`` to the position ids on the path to the attention inputs; returns the roots shifted."""
    gm = emit.ctx.gm
    on_path = _value_path(gm)
    shifted = []
    for root in position_roots(gm):
        users = [u for u in root.users if u in on_path]
        if not users:
            continue
        with emit.graph.inserting_after(root):
            moved = emit(aten.add.Tensor, root, tokens)
        for user in users:
            user.replace_input_with(root, moved)
        shifted.append(root.name)
    return shifted


@register
class PrefixPass(Pass):
    keyword = "prefix"
    rank = 90          # after the passes on linears; it rewrites only the attention calls

    def run(self, ctx: CompileContext, statement, index: int) -> PassResult:
        opts = statement.options
        tokens, hidden, layers = opts["tokens"], opts.get("project"), opts.get("layers")
        earlier = [r for r in ctx.records if r.method == "prefix"]
        if earlier:
            first = ctx.spec.statements[earlier[0].statement]
            raise SpecError.at(statement.span, f"a spec takes one prefix statement; line {first.span.line} "
                               "already has one (use layers= on it to choose attentions)", ctx.spec.source)
        explicit = [n for n in ctx.gm.graph.nodes if n.op == "call_function"
                    and n.target in (aten.softmax.int, aten._softmax.default)]
        sites = attention_sites(ctx)
        if not sites:
            what = ("its attention is an explicit softmax(q·kᵀ)·v, which prefix does not rewrite yet"
                    if explicit and ctx.sites.attention_count else "it has no attention")
            raise SpecError.at(statement.span, f"prefix needs scaled_dot_product_attention calls in the "
                               f"model, and {what}; the model has {ctx.sites.summary()}", ctx.spec.source)
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
        emit = _Emit(ctx, statement, index, self.keyword)
        nodes = {n.name: n for n in ctx.gm.graph.nodes}
        records = [PrefixRecord(statement=index, site=s, module=f"peftc_prefix_{i}", tokens=tokens, index=i)
                   for i, s in enumerate(sites)]
        for record in records:
            s = record.site
            ctx.add_module(record.module, PrefixWeights(s.kv_heads, tokens, s.head_dim, empty=hidden is not None))
        encoder = None
        prefix_nodes: dict[str, tuple[Node, Node]] = {}
        if hidden is not None:
            encoder = PrefixEncoderRecord(statement=index, module="peftc_prefix_encoder", tokens=tokens,
                                          hidden=hidden, sites=sites)
            ctx.add_module(encoder.module, PrefixEncoder(tokens, sites[0].token_dim, hidden, len(sites)))
            first_sdpa = nodes[sites[0].node]
            with emit.graph.inserting_before(first_sdpa):
                start = len(emit.nodes)
                m = encoder.module
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
        for record in records:
            s = record.site
            sdpa = nodes[s.node]
            start = len(emit.nodes)
            if hidden is None:
                with emit.graph.inserting_before(sdpa):
                    pair = (emit.attr(f"{record.module}.key"), emit.attr(f"{record.module}.value"))
            else:
                pair = prefix_nodes[record.module]
            extend_attention(emit, sdpa, pair[0], pair[1], tokens, s.heads, s.kv_heads)
            record.nodes = [n.name for n in emit.nodes[start:]]
        start = len(emit.nodes)
        shifted = shift_positions(emit, tokens)
        for record in records:
            record.nodes += [n.name for n in emit.nodes[start:]]
            record.shifted = shifted
        ctx.records.extend(records)
        if encoder is not None:
            ctx.records.append(encoder)
        return PassResult(ctx.gm, modified=True)

    @staticmethod
    def fold(gm: GraphModule, record) -> None:
        """Fold a prefix encoder (``project=``) into plain per-attention prefixes and remove the MLP; the
        prefixes stay graph inputs of the attentions (records of single attentions are not folded)."""
        if not isinstance(record, PrefixEncoderRecord):
            return
        with torch.no_grad():
            flat = gm.get_submodule(record.module)()
        if not torch.isfinite(flat).all():
            raise PassError("the prefix encoder's output contains NaN or inf; refusing to merge")
        nodes = {n.name: n for n in gm.graph.nodes}
        for index, ((module, key_name, value_name), site) in enumerate(zip(record.outputs, record.sites)):
            weights = gm.get_submodule(module)
            key, value = _split(flat, index, site)
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

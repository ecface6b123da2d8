"""``prompt tokens=P [init="text"]``: a learned soft prompt of P embeddings before the input (prompt tuning).

HF PEFT runs the model on ``[prompt; embed(input_ids)]`` with the mask ``[1…1, attention_mask]``, so
every length-dependent part of the model (position ids, the causal and padding masks, reshapes) sees
P + T positions. The pass gets the same by rewriting the graph's inputs rather than each of those parts:

- ``input_ids`` and ``attention_mask`` are padded on the left with P positions (token 0, mask 1) for every
  node that reads them, so all shapes and positions computed from them have P + T entries;
- the token embedding module's output has its first P rows replaced by the learned prompt: the output of
  the module that looks the ids up, after whatever else it computes (Gemma's embedding multiplies by
  √hidden inside the module; HF PEFT prepends the prompt to ``word_embeddings(input_ids)``, so the scale
  applies to the input's rows, never to the prompt);
- the output drops the first P positions, so the compiled model keeps the contract
  ``(input_ids, attention_mask) -> logits`` (or the last hidden state) of the original length.

``init="text"`` starts the prompt from the embedding module's output for that text's tokens (HF PEFT's
``prompt_tuning_init="TEXT"``: the tokenizer's ids, repeated or cut to P); the default is N(0, 1), like
HF PEFT's ``RANDOM``. The prompt is never folded: it stays a graph op in the merged model and the export."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from peftc.compiler.record import Record
from peftc.lang.diagnostics import SpecError, check_allocation
from peftc.errors import ModelError
from peftc.models import load_tokenizer
from peftc.compiler.passmanager import CompileContext, Pass, PassResult, register
from peftc.graph.signature import DECODER, SIGNATURE, TEXT, Signature

aten = torch.ops.aten
END = 2 ** 62   # "to the end" for aten.slice


class PromptWeights(nn.Module):
    def __init__(self, tokens: int, dim: int, init: torch.Tensor | None = None):
        super().__init__()
        self.embedding = nn.Parameter(init.clone() if init is not None else torch.randn(tokens, dim))


@dataclass
class PromptSite:
    path: str                    # module path of the token embedding the prompt is prepended to
    layer: None = None


@dataclass
class PromptRecord(Record):
    statement: int
    site: PromptSite
    module: str
    tokens: int
    dim: int
    init_text: str | None = None
    nodes: list[str] = field(default_factory=list)
    method: str = "prompt"

    @property
    def positions(self) -> int:
        """Positions the prompt takes from the model's maximum sequence length."""
        return self.tokens

    @property
    def key(self) -> str:
        return "prompt_encoder"

    def parameters(self, gm: GraphModule) -> dict[str, nn.Parameter]:
        return {"embedding": gm.get_submodule(self.module).embedding}


def text_token_ids(tokenizer, text: str, tokens: int) -> list[int]:
    """HF PEFT's rule: the tokenizer's ids for ``text`` (special tokens included), repeated or cut to
    ``tokens``."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ModelError(f"the tokenizer gives no tokens for init text {text!r}")
    ids = ids * math.ceil(tokens / len(ids))
    return ids[:tokens]


@register
class PromptPass(Pass):
    keyword = "prompt"
    phase = "inputs"

    def run(self, ctx: CompileContext, statement, index: int) -> PassResult:
        tokens, text = statement.options["tokens"], statement.options.get("init")
        placeholders, embed = self._inputs(ctx, statement)
        site = _module_output(ctx, statement, embed)      # what HF PEFT's word_embeddings(input_ids) returns
        gm, graph = ctx.gm, ctx.gm.graph
        weight = ctx.value(embed.args[0].target) if embed.args[0].op == "get_attr" else None
        val = site.meta.get("val")
        dim = int(val.shape[-1]) if val is not None else int(weight.shape[1])
        check_allocation(statement, ctx.spec.source, tokens * dim, f"in a {tokens:,} × {dim} soft prompt",
                         "lower tokens")
        init = None
        if text is not None:
            init = self._text_init(ctx, statement, text, tokens, weight, embed, site)
        record = PromptRecord(statement=index, site=PromptSite(ctx.sites.embed_path or "embed"),
                              module=f"peftc_prompt_{index}", tokens=tokens, dim=dim, init_text=text)
        ctx.add_module(record.module, PromptWeights(tokens, dim, init).to(ctx.dtypes(site.name)[1]))
        inserted: list[Node] = []

        def emit(target, *args, **kwargs) -> Node:
            node = graph.call_function(target, args, kwargs)
            inserted.append(ctx.tag(node, self.keyword, statement, index))
            return node

        _pad_inputs(graph, emit, inserted, placeholders, tokens)   # 1. every reader sees P + T positions
        # 2. the prompt replaces the embeddings of the P padding positions
        with graph.inserting_before(site.next):
            prompt = graph.get_attr(f"{record.module}.embedding")
            inserted.append(ctx.tag(prompt, self.keyword, statement, index))
            batch = emit(aten.sym_size.int, site, 0)
            if val is not None and val.dtype != ctx.dtypes(site.name)[1]:
                prompt = emit(aten._to_copy.default, prompt, dtype=val.dtype)
            rows = emit(aten.expand.default, emit(aten.unsqueeze.default, prompt, 0), [batch, -1, -1])
            rest = emit(aten.slice.Tensor, site, 1, tokens, END)
            joined = emit(aten.cat.default, [rows, rest], 1)
        site.replace_all_uses_with(joined, delete_user_cb=lambda u: u not in inserted)
        # 3. the output drops the prompt's positions (an encoder-decoder's output is the decoder's: it has none)
        output = next(n for n in graph.nodes if n.op == "output")
        if DECODER not in _signature(gm).names:
            with graph.inserting_before(output):
                def drop(node: Node) -> Node:
                    return emit(aten.slice.Tensor, node, 1, tokens, END)
                output.args = map_arg(output.args, drop)
        record.nodes = [n.name for n in inserted]
        ctx.records.append(record)
        return PassResult(gm, modified=True)

    @staticmethod
    def _inputs(ctx: CompileContext, statement) -> tuple[list[Node], Node]:
        """The graph's (input_ids, attention_mask) placeholders and the token embedding lookup, once the
        spec is checked to hold one prompt statement and the model to have what it rewrites."""
        earlier = [r for r in ctx.records if r.method == "prompt"]
        if earlier:
            first = ctx.spec.statements[earlier[0].statement]
            raise SpecError.at(statement.span, f"a spec takes one prompt statement; line {first.span.line} "
                               "already has one", ctx.spec.source)
        placeholders = [n for n in ctx.gm.graph.nodes if n.op == "placeholder"][:2]
        embed = _token_embedding(ctx.gm, ctx.sites.embed, placeholders[0] if placeholders else None)
        if not _signature(ctx.gm).text or embed is None:
            raise SpecError.at(statement.span, "prompt needs a model whose graph looks up a token embedding "
                               "with input_ids; this one has none", ctx.spec.source)
        return placeholders, embed

    @staticmethod
    def _text_init(ctx: CompileContext, statement, text: str, tokens: int, weight: torch.Tensor,
                   embed: Node, site: Node):
        ref = ctx.model_ref
        where = statement.option_spans.get("init", statement.span)
        try:
            tokenizer = load_tokenizer(ref) if ref else None
        except ModelError as exc:
            raise SpecError.at(where, f"init text needs the model's tokenizer: {exc}", ctx.spec.source) from exc
        if tokenizer is None:
            raise SpecError.at(where, f"init text needs the model's tokenizer, and '{ref or 'this model'}' "
                               "has none (the tiny built-in models have no tokenizer); leave init out for a "
                               "random prompt, or use a model directory with a tokenizer", ctx.spec.source)
        ids = torch.tensor(text_token_ids(tokenizer, text, tokens))
        if int(ids.max()) >= weight.shape[0]:
            raise SpecError.at(where, f"the tokenizer of '{ref}' gives token id {int(ids.max())}, beyond the "
                               f"embedding's {weight.shape[0]} rows", ctx.spec.source)
        rows = _run_module(ctx, embed, site, weight, ids)
        if rows is None:
            raise SpecError.at(where, f"init text cannot run the token embedding module "
                               f"{ctx.sites.embed_path or 'of this model'} on the text's ids alone (its output "
                               "depends on more than the ids); leave init out for a random prompt",
                               ctx.spec.source)
        return rows.to(torch.float32)


def _signature(gm: GraphModule) -> Signature:
    """The captured inputs (a graph from before signatures were recorded takes text)."""
    return gm.meta.get(SIGNATURE) or Signature(TEXT, "causal-lm", "logits")


def _in_module(node: Node, key: str) -> bool:
    return key in (node.meta.get("nn_module_stack") or {})


def _module_key(embed: Node) -> str | None:
    """The nn_module_stack entry of the module call that runs the lookup ``embed``: the innermost, the
    module that owns the embedding weight (HF PEFT's ``word_embeddings`` is the module of that weight)."""
    stack = embed.meta.get("nn_module_stack")
    return list(stack)[-1] if stack else None


def _module_output(ctx: CompileContext, statement, embed: Node) -> Node:
    """The output of the token embedding module: the node computed inside that module from the lookup
    ``embed`` that is read outside it. For ``nn.Embedding`` that is the lookup itself; for Gemma's scaled
    embedding, the product with √hidden."""
    key = _module_key(embed)
    if key is None:
        return embed
    region, seen, frontier = [], set(), [embed]
    while frontier:
        node = frontier.pop()
        if node not in seen:
            seen.add(node)
            region.append(node)
            frontier.extend(u for u in node.users if _in_module(u, key))
    exits = [n for n in region if any(not _in_module(u, key) for u in n.users)]
    if len(exits) > 1:
        raise SpecError.at(statement.span, f"prompt needs the token embedding module "
                           f"{ctx.sites.embed_path or 'of this model'} to return one tensor of embeddings; its "
                           f"graph has {len(exits)} outputs computed from the lookup", ctx.spec.source)
    return exits[0] if exits else embed


class _NeedsMore(Exception):
    """The token embedding module's output depends on a node outside the module (not the ids)."""


def _run_module(ctx: CompileContext, embed: Node, site: Node, weight: torch.Tensor,
                ids: torch.Tensor) -> torch.Tensor | None:
    """The token embedding module's output for ``ids`` (1-D), computed by the captured graph's own nodes
    from the lookup ``embed`` to the module's output ``site`` (HF PEFT's text init calls
    ``word_embeddings(ids)``, Gemma's √hidden scale included); None when that output needs more than the ids
    and the module's own tensors."""
    key = _module_key(embed)
    values: dict[Node, object] = {}

    def value(node: Node):
        if node not in values:
            if node is embed:
                out = aten.embedding.default(weight.detach(), ids[None], *map_arg(embed.args[2:], value))
            elif node.op == "get_attr":
                out = ctx.value(node.target)
            elif node.op == "call_function" and key is not None and _in_module(node, key):
                out = node.target(*map_arg(node.args, value), **map_arg(node.kwargs, value))
            else:
                raise _NeedsMore(node.name)
            values[node] = out
        return values[node]

    try:
        with torch.no_grad():
            return value(site)[0].detach()
    except _NeedsMore:
        return None


def _pad_inputs(graph, emit, inserted: list[Node], placeholders: list[Node], tokens: int) -> None:
    """Pad ``input_ids`` and ``attention_mask`` on the left with ``tokens`` positions (token 0, mask 1)
    for every reader but the nodes inserted so far and the input guard (a call_module)."""
    ids, mask = placeholders
    with graph.inserting_before(placeholders[-1].next):
        padded = {}
        for node, value in ((mask, 1), (ids, 0)):
            first = emit(aten.slice.Tensor, node, 1, 0, 1)
            fill = emit(aten.full_like.default, first, value)
            cols = emit(aten.expand.default, fill, [-1, tokens])
            padded[node] = emit(aten.cat.default, [cols, node], 1)
    for node, new in padded.items():
        keep = set(inserted)
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u not in keep and u.op != "call_module")


def _token_embedding(gm: GraphModule, target: str | None, ids: Node | None) -> Node | None:
    """The aten.embedding node that looks up the token embedding with the input ids."""
    if target is None or ids is None:
        return None
    for node in gm.graph.nodes:
        if (node.op == "call_function" and node.target is aten.embedding.default
                and node.args[0].op == "get_attr" and node.args[0].target == target
                and _derives_from(node.args[1], ids)):
            return node
    return None


def _derives_from(node, source: Node) -> bool:
    seen, frontier = set(), [node]
    while frontier:
        cur = frontier.pop()
        if cur is source:
            return True
        if isinstance(cur, Node) and cur not in seen and cur.op == "call_function":
            seen.add(cur)
            frontier.extend(cur.all_input_nodes)
    return False

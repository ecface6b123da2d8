"""Structural analysis of a captured graph: linears with their role and layer, found from dataflow.

Roles come from the graph, not from a table of module names:
- q, k, v: the linears whose outputs reach the query, key or value input of an attention
  (``aten.scaled_dot_product_attention``) without passing another linear; o: the linear its output reaches;
- down: a linear reached from another linear's output through an activation; that other linear is ``gate``
  when a third linear (``up``) feeds the same down projection without an activation, else it is ``up``;
- head: the linear outside every block whose output reaches the model output;
- embed: the embedding looked up with ``input_ids``;
- router: a linear whose output reaches a top-k (a mixture-of-experts block's gate);
- experts: not a linear but a 3-D parameter (experts × out × in, transformers 5's stacked ``gate_up_proj`` and
  ``down_proj``) that a matmul reads, transposed, together with what a top-k chose (:attr:`ModelSites.experts`).
A linear that feeds several of q, k and v at once is *fused* (GPT-2's ``c_attn``); its role is ``qkv``.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from peftc.graph.capture import module_path, module_type, strip_prefix
from peftc.graph.slices import Probe, support

aten = torch.ops.aten
ATTENTION_OPS = {aten.scaled_dot_product_attention.default}
ACTIVATION_OPS = {aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default,
                  aten.sigmoid.default, aten.silu_.default, aten.relu_.default}
#: a mixture-of-experts router's output reaches a top-k, and its experts' matmuls read what the top-k chose:
#: that is how both are found
ROUTING_OPS = {aten.topk.default}
ATTENTION_ROLES = ("q", "k", "v", "o")
FFN_ROLES = ("gate", "up", "down")
ROLE_ORDER = ATTENTION_ROLES + FFN_ROLES + ("qkv", "qk", "qv", "kv", "gate_up", "router", "experts", "head")


@dataclass
class LinearSite:
    node: str                 # name of the fx node computing the linear
    path: str                 # module path, e.g. model.layers.0.self_attn.q_proj
    weight: str               # get_attr target of the weight
    bias: str | None          # get_attr target of the bias, if any
    kind: str                 # "linear" (weight out×in) or "conv1d" (addmm, weight in×out)
    in_features: int
    out_features: int
    layer: int | None         # transformer block index, None outside blocks
    module_type: str | None
    role: str | None = None   # q k v o gate up down head, a fused qkv/gate_up, or None when unlabelled
    #: the node whose value is the layer's output, when not ``node`` (x @ W.T followed by a bias add)
    output: str | None = None
    #: for a fused projection: the output features (rows of W) computing each role
    slices: dict[str, tuple[int, ...]] | None = None
    #: stacked expert weights (kind "experts", W experts × out × in): how many experts; 0 for a linear
    experts: int = 0
    #: for the projections of an attention: ``self``, or ``cross`` (keys and values from another input:
    #: an encoder-decoder's decoder attending over the encoder); None elsewhere
    attention: str | None = None

    @property
    def fused(self) -> bool:
        return bool(self.slices)


@dataclass
class ModelSites:
    linears: list[LinearSite]
    n_layers: int
    embed: str | None = None          # get_attr target of the token embedding weight
    embed_path: str | None = None     # module path of the token embedding
    attention_count: int = 0
    by_node: dict[str, LinearSite] = field(default_factory=dict)
    #: the stacked expert weights of mixture-of-experts blocks (role ``experts``), in graph order; a site's
    #: path is the parameter's (``model.layers.0.mlp.experts.gate_up_proj``), as HF PEFT's target_parameters
    #: names it
    experts: list[LinearSite] = field(default_factory=list)

    def roles(self) -> Counter:
        return Counter(s.role for s in self.linears + self.experts if s.role)

    def summary(self) -> str:
        """What the model has, for error messages."""
        roles = ", ".join(f"{r} ({n})" for r, n in sorted(self.roles().items(),
                                                         key=lambda kv: ROLE_ORDER.index(kv[0])))
        examples = ", ".join(s.path for s in self.linears[:4])
        stacked = f" and {len(self.experts)} stacked expert weights" if self.experts else ""
        return (f"{len(self.linears)} linears{stacked} in {self.n_layers} layers; roles: {roles or 'none'}; "
                f"module paths like {examples}")


_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_of(path: str) -> int | None:
    """The layer index of a module path (its first dotted integer), or None."""
    match = _LAYER.search(path)
    return int(match.group(1)) if match else None




def _attr(node) -> str | None:
    return node.target if isinstance(node, Node) and node.op == "get_attr" else None


TRANSPOSE_OPS = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


def weight_of(node: Node, kind: str) -> tuple[Node, Node]:
    """(the node that reads the weight, the weight's get_attr node) of a linear site's node."""
    if kind == "linear":
        return node, node.args[1]
    if kind == "conv1d":
        return node, node.args[2]
    return node.args[1], node.args[1].args[0]          # matmul(x, W.T): the transpose reads W


def input_of(node: Node, kind: str) -> Node:
    return node.args[1] if kind == "conv1d" else node.args[0]


def _linear_site(node: Node, gm: GraphModule) -> LinearSite | None:
    bias, output = None, None
    if node.target is aten.linear.default:
        kind = "linear"
        bias = node.args[2] if len(node.args) > 2 else None
    elif node.target is aten.addmm.default:   # addmm(bias, x, weight): a Conv1D whose weight is stored in×out
        kind = "conv1d"
        bias = node.args[0]
    elif node.target is aten.matmul.default:  # x @ W.T, as Falcon's FalconLinear computes it
        t = node.args[1]
        if not (isinstance(t, Node) and t.op == "call_function" and t.target in TRANSPOSE_OPS
                and _attr(t.args[0]) is not None and t.args[0].meta["val"].dim() == 2):
            return None
        kind = "matmul"
        adds = [u for u in node.users if u.target is aten.add.Tensor and _attr(u.args[1]) is not None]
        bias = adds[0].args[1] if len(node.users) == 1 and adds else None
        output = adds[0].name if bias is not None else None
    else:
        return None
    _, weight = weight_of(node, kind)
    target = _attr(weight)
    if target is None:
        return None
    w = gm.get_parameter(target) if target in dict(gm.named_parameters()) else None
    shape = tuple(w.shape) if w is not None else tuple(weight.meta["val"].shape)
    out_f, in_f = shape[::-1] if kind == "conv1d" else shape
    path = module_path(node) or strip_prefix(target.rsplit(".", 1)[0])
    return LinearSite(node=node.name, path=path, weight=target, bias=_attr(bias), kind=kind,
                      in_features=in_f, out_features=out_f, layer=layer_of(path),
                      module_type=module_type(node), output=output)


def analyze(gm: GraphModule) -> ModelSites:
    """The linears of a captured graph with their roles and fused slices, its layers and token embedding."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}      # graph order, for every choice made from a set
    sites = [s for s in (_linear_site(n, gm) for n in nodes if n.op == "call_function") if s is not None]
    by_node = {s.node: s for s in sites}
    linear_nodes = [n for n in nodes if n.name in by_node]
    attentions = _attentions(nodes, set(linear_nodes))
    stops = set(linear_nodes) | {n for n in nodes if n.op == "call_function"
                                 and (n.target in ATTENTION_OPS or n.target is aten.embedding.default)}
    stops |= {a.output for a in attentions} | {a.scores for a in attentions}
    forward, backward = _flow(nodes, stops)

    def reach(start: Node) -> set[Node]:
        out: set[Node] = set()
        for user in start.users:
            out.add(user)
            out |= nx.descendants(forward, user)
        return out

    def feeding(node) -> list[str]:
        """The linears feeding ``node``, in graph order."""
        if not isinstance(node, Node):
            return []
        found = {node} | nx.ancestors(backward, node)
        return [n.name for n in sorted((n for n in found if n.name in by_node), key=position.__getitem__)]

    node_of = {n.name: n for n in linear_nodes}
    labels, feeds = _label_attentions(attentions, feeding, reach, node_of, by_node)
    probes = []
    for name, roles in sorted(labels.items(), key=lambda item: position[node_of[item[0]]]):
        if len(roles) == 1:
            by_node[name].role = roles.pop()
        elif roles <= set("qkv"):
            by_node[name].role = "".join(r for r in "qkv" if r in roles)
            probes.append(Probe(name, feeds[name]))

    routing = {n for n in nodes if n.op == "call_function" and n.target in ROUTING_OPS}
    for s in sites:
        if s.role is None and routing & reach(node_of[s.node]):
            s.role = "router"
    probes += _label_ffn(sites, lambda s: reach(node_of[s.node]), reach, node_of, position)
    _apply_slices(support(probes, gm, _vocab(gm)), by_node)
    output = next(n for n in nodes if n.op == "output")
    for s in sites:
        if s.role is None and s.layer is None and output in reach(node_of[s.node]):
            s.role = "head"
    embed, embed_path = _token_embedding(nodes)
    return ModelSites(linears=sites, n_layers=max((s.layer for s in sites if s.layer is not None), default=-1) + 1,
                      embed=embed, embed_path=embed_path, attention_count=len(attentions), by_node=by_node,
                      experts=_experts(nodes, gm, backward, routing))


def _label_attentions(attentions, feeding, reach, node_of: dict[str, Node], by_node: dict[str, LinearSite]):
    """The roles (q, k, v, o) each linear plays in the attentions, the attention inputs it feeds per role,
    and each projection's :attr:`LinearSite.attention`: ``cross`` when the key projections read other
    inputs than the query projections (a decoder attending over the encoder's output), else ``self``."""
    labels: dict[str, set[str]] = {}
    feeds: dict[str, dict[str, list[Node]]] = {}
    for attn in attentions:
        q, k = ({input_of(node_of[n], by_node[n].kind) for n in feeding(a)} for a in (attn.q, attn.k))
        kind = "cross" if q and k and q.isdisjoint(k) else "self"
        for role, arg in zip("qkv", (attn.q, attn.k, attn.v)):
            for name in feeding(arg):
                labels.setdefault(name, set()).add(role)
                feeds.setdefault(name, {}).setdefault(role, []).append(arg)
                by_node[name].attention = by_node[name].attention or kind
        for name in (n.name for n in reach(attn.output) if n.name in by_node):
            labels.setdefault(name, set()).add("o")
            by_node[name].attention = by_node[name].attention or kind
    return labels, feeds


def _experts(nodes: list[Node], gm: GraphModule, backward: nx.DiGraph, routing: set[Node]) -> list[LinearSite]:
    """The stacked expert weights: each 3-D parameter W (experts × out × in) read through a transpose of its
    last two dimensions by a matmul (transformers' grouped_mm: x @ W[e]ᵀ per expert) that also reads, since
    the last linear, what a top-k chose (the tokens sorted by expert, each expert's token count).
    A layout stored experts × in × out and read untransposed (``is_transposed`` experts, GPT-OSS) is not
    labelled yet."""
    params = dict(gm.named_parameters())
    found = []
    for n in nodes:
        w = params.get(n.target) if n.op == "get_attr" else None
        if w is None or w.dim() != 3 or len(n.users) != 1:
            continue
        (t,) = n.users
        if t.target is not aten.transpose.int or {a % 3 for a in t.args[1:]} != {1, 2}:
            continue
        if not any(routing & nx.ancestors(backward, m) for m in t.users):
            continue
        count, out_f, in_f = w.shape
        path = strip_prefix(n.target)
        found.append(LinearSite(node=n.name, path=path, weight=n.target, bias=None, kind="experts",
                                in_features=in_f, out_features=out_f, layer=layer_of(path),
                                module_type=module_type(t), role="experts", experts=count))
    return found


def _flow(nodes: list[Node], stops: set[Node]) -> tuple[nx.DiGraph, nx.DiGraph]:
    """The dataflow between nodes, cut at ``stops`` (linears, attentions, embeddings): ``forward`` has no
    edge out of a stop (what a node reaches before the next stop), ``backward`` none into one (what feeds a
    node since the last stop)."""
    forward, backward = nx.DiGraph(), nx.DiGraph()
    for n in nodes:
        forward.add_node(n)
        backward.add_node(n)
        for user in n.users:
            if n not in stops:
                forward.add_edge(n, user)
            if user not in stops:
                backward.add_edge(n, user)
    return forward, backward


@dataclass
class Attention:
    """One attention: its query, key and value inputs, the node giving its output, and (for an explicit
    matmul–softmax–matmul) the node computing the scores."""
    q: Node
    k: Node
    v: Node
    output: Node
    scores: Node


MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default}


def _attentions(nodes: list[Node], linears: set[Node]) -> list[Attention]:
    """Every ``scaled_dot_product_attention`` call, and every explicit softmax(q·kᵀ)·v (eager attention)."""
    found = []
    for n in nodes:
        if n.op != "call_function":
            continue
        if n.target in ATTENTION_OPS:
            found.append(Attention(n.args[0], n.args[1], n.args[2], n, n))
        elif n.target in SOFTMAX_OPS:
            scores = _nearest(n, lambda m: list(m.all_input_nodes), linears)
            output = _nearest(n, lambda m: list(m.users), linears)
            if scores is None or output is None or not isinstance(output.args[1], Node):
                continue
            q, k = scores.args[1:3] if scores.target is aten.baddbmm.default else scores.args[:2]
            found.append(Attention(q, k, output.args[1], output, scores))
    return found


def _nearest(start: Node, step, linears: set[Node]) -> Node | None:
    """The closest matmul from ``start`` following ``step`` (inputs or users), not crossing a linear."""
    frontier, seen = step(start), {start}
    while frontier:
        following = []
        for m in frontier:
            if m in seen or m.op != "call_function" or m in linears:
                continue
            seen.add(m)
            if m.target in MATMUL_OPS:
                return m
            if m.target not in SOFTMAX_OPS:
                following += step(m)
        frontier = following
    return None


def _label_ffn(sites: list[LinearSite], site_reach, reach, node_of, position: dict[Node, int]) -> list[Probe]:
    """Label gate/up/down; return probes for projections that may be a fused gate+up."""
    site_of = {s.node: s for s in sites}
    order = {s.node: i for i, s in enumerate(sites)}     # graph order: never iterate a set of names
    reached: dict[str, set[str]] = {}
    through_act: dict[str, set[str]] = {}
    acts_of: dict[str, list[Node]] = {}
    for s in sites:
        node_reach = site_reach(s)
        reached[s.node] = {n.name for n in node_reach if n.name in site_of}
        acts = sorted((n for n in node_reach if n.op == "call_function" and n.target in ACTIVATION_OPS),
                      key=position.__getitem__)
        after = set()
        for act in acts:
            after |= {n.name for n in reach(act) if n.name in site_of}
        through_act[s.node] = after & reached[s.node]
        acts_of[s.node] = acts
    probes = []
    for s in sites:
        if s.role is not None:
            continue
        # a down projection is in its gate's block: what an activation reaches through the residual stream
        # (a shared expert's sigmoid gate, Qwen2-MoE's) is the next block's, never its down
        downs = [site_of[d] for d in sorted(through_act[s.node], key=order.__getitem__)
                 if site_of[d].role in (None, "down") and site_of[d].layer == s.layer]
        if not downs:
            continue
        down = downs[0]          # the first linear after the activation in graph order
        down.role = "down"
        partners = [site_of[p] for p, r in reached.items()
                    if down.node in r and p != s.node and site_of[p].role in (None, "up")
                    and down.node not in through_act[p]]
        s.role = "gate" if partners else "up"
        for p in partners:
            p.role = "up"
        if not partners:   # up -> act -> down, or a fused gate+up whose up half bypasses the activation
            down_input = input_of(node_of[down.node], down.kind)
            gate_inputs = [a.args[0] for a in acts_of[s.node] if isinstance(a.args[0], Node)]
            probes.append(Probe(s.node, {"gate": gate_inputs, "all": [down_input]}))
    return probes


def _vocab(gm: GraphModule) -> int:
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is aten.embedding.default:
            return int(n.args[0].meta["val"].shape[0])
    return 32


def _apply_slices(found: dict[str, dict[str, set[int]]], by_node: dict[str, LinearSite]) -> None:
    """Record each fused projection's per-role output features; a probe that shows a plain up projection
    (every feature through the activation) or overlapping roles records nothing."""
    for name, roles in found.items():
        site = by_node[name]
        if "all" in roles:
            gate, up = roles["gate"], roles["all"] - roles["gate"]
            if gate and up:
                site.role, site.slices = "gate_up", {"gate": tuple(sorted(gate)), "up": tuple(sorted(up))}
            continue
        sets = list(roles.values())
        disjoint = sum(len(x) for x in sets) == len(set().union(*sets))
        if disjoint and all(sets):
            site.slices = {role: tuple(sorted(features)) for role, features in roles.items()}


def _token_embedding(nodes: list[Node]) -> tuple[str | None, str | None]:
    """The token embedding's weight (get_attr target) and module path."""
    inputs = [n for n in nodes if n.op == "placeholder"]
    ids = inputs[0] if inputs else None
    for n in nodes:
        if n.op == "call_function" and n.target is aten.embedding.default:
            indices = n.args[1]
            seen, frontier = set(), [indices]
            while frontier:
                cur = frontier.pop()
                if cur is ids:
                    return _attr(n.args[0]), module_path(n)
                if isinstance(cur, Node) and cur not in seen and cur.op == "call_function":
                    seen.add(cur)
                    frontier.extend(a for a in cur.all_input_nodes)
    return None, None

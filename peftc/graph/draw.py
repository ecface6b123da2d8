"""Draw one transformer block of a graph before and after the rewrite, as an SVG with no dependencies:
nodes laid out in rows by dataflow depth, inserted nodes highlighted with the pass that inserted them."""
from __future__ import annotations

from html import escape

import networkx as nx
from torch.fx import GraphModule, Node

from peftc.graph.analysis import layer_of
from peftc.graph.capture import module_path
from peftc.compiler.passmanager import META_KEY

BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 150, 34, 14, 26, 30
SKIP_OPS = {"get_attr", "placeholder", "output"}


def block_nodes(gm: GraphModule, layer: int) -> list[Node]:
    """The call nodes of ``layer`` (by module path), plus inserted nodes connected to them."""
    nodes = [n for n in gm.graph.nodes if n.op not in SKIP_OPS]
    chosen = {n for n in nodes if META_KEY not in n.meta and layer_of(module_path(n) or "") == layer}
    grew = True
    while grew:
        grew = False
        for n in nodes:
            if n in chosen or META_KEY not in n.meta:
                continue
            if any(m in chosen for m in (*n.all_input_nodes, *n.users)):
                chosen.add(n)
                grew = True
    return [n for n in nodes if n in chosen]


def _label(n: Node) -> tuple[str, str]:
    op = str(n.target).split(".")
    name = op[1] if len(op) > 1 and op[0] == "aten" else str(n.target).rsplit(".", 1)[-1]
    tag = n.meta.get(META_KEY)
    where = f"+{tag['pass']}" if tag else (module_path(n) or "").rsplit(".", 1)[-1]
    return name, where


def _layout(nodes: list[Node]) -> dict[Node, tuple[int, int]]:
    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    inside = set(nodes)
    for n in nodes:
        for user in n.users:
            if user in inside:
                graph.add_edge(n, user)
    depth: dict[Node, int] = {}
    for n in nx.topological_sort(graph):
        depth[n] = max((depth[p] + 1 for p in graph.predecessors(n)), default=0)
    column: dict[int, int] = {}
    places = {}
    for n in nodes:
        row = depth[n]
        places[n] = (column.get(row, 0), row)
        column[row] = column.get(row, 0) + 1
    return places


def _panel(nodes: list[Node], title: str, x0: int) -> tuple[list[str], int, int]:
    places = _layout(nodes)
    width = (max((c for c, _ in places.values()), default=0) + 1) * (BOX_W + GAP_X)
    height = (max((r for _, r in places.values()), default=0) + 1) * (BOX_H + GAP_Y)
    out = [f'<text x="{x0}" y="{PAD - 10}" font-size="16" font-weight="bold">{escape(title)}</text>']

    def centre(n):
        c, r = places[n]
        return x0 + c * (BOX_W + GAP_X) + BOX_W / 2, PAD + r * (BOX_H + GAP_Y) + BOX_H / 2

    for n in nodes:
        for user in n.users:
            if user in places:
                (x1, y1), (x2, y2) = centre(n), centre(user)
                out.append(f'<line x1="{x1:.0f}" y1="{y1 + BOX_H / 2:.0f}" x2="{x2:.0f}" y2="{y2 - BOX_H / 2:.0f}" '
                           'stroke="#888" marker-end="url(#arrow)"/>')
    for n in nodes:
        x, y = centre(n)
        inserted = META_KEY in n.meta
        fill, stroke = ("#ffd8a8", "#e8590c") if inserted else ("#f1f3f5", "#868e96")
        name, where = _label(n)
        tip = escape(n.format_node() or n.name)
        out.append(f'<g><title>{tip}</title><rect x="{x - BOX_W / 2:.0f}" y="{y - BOX_H / 2:.0f}" width="{BOX_W}" '
                   f'height="{BOX_H}" rx="5" fill="{fill}" stroke="{stroke}"/>'
                   f'<text x="{x:.0f}" y="{y - 3:.0f}" font-size="11" text-anchor="middle">{escape(name)}</text>'
                   f'<text x="{x:.0f}" y="{y + 11:.0f}" font-size="9" fill="#495057" text-anchor="middle">'
                   f'{escape(where)}</text></g>')
    return out, width, height


def block_svg(before: GraphModule, after: GraphModule, layer: int) -> str:
    """An SVG with the block ``layer`` of ``before`` and of ``after`` side by side."""
    first = block_nodes(before, layer)
    second = block_nodes(after, layer)
    if not first:
        raise ValueError(f"the model has no layer {layer}")
    left, w1, h1 = _panel(first, f"layer {layer} before", PAD)
    right, w2, h2 = _panel(second, f"layer {layer} after (inserted nodes in orange)", PAD + w1 + 3 * PAD)
    width, height = PAD * 5 + w1 + w2, PAD * 2 + max(h1, h2)
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif"><defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" '
            'markerWidth="6" markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker>'
            '</defs><rect width="100%" height="100%" fill="white"/>')
    return "\n".join([head, *left, *right, "</svg>"]) + "\n"

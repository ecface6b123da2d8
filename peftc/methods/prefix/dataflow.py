"""Walks over a captured graph's dataflow, shared by the prefix pass and the KV-cache export: what some nodes
are computed from, and what is computed from them."""
from __future__ import annotations

from collections.abc import Iterable

from torch.fx import Graph, Node


def upstream(nodes: Iterable[Node]) -> set[Node]:
    """``nodes`` and every node they are computed from."""
    seen: set[Node] = set()
    frontier = [n for n in nodes if isinstance(n, Node)]
    while frontier:
        node = frontier.pop()
        if node not in seen:
            seen.add(node)
            frontier.extend(node.all_input_nodes)
    return seen


def downstream(graph: Graph, starts: Iterable[Node]) -> set[Node]:
    """``starts`` and every node of ``graph`` computed from them."""
    out = set(starts)
    for node in graph.nodes:              # graph order: inputs come before their users
        if node not in out and any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out

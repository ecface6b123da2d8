"""What every fold shares: write a merged weight into the graph module, and remove an inserted branch."""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.graph.analysis import weight_of


def set_weight(gm: GraphModule, linear, kind: str, value: torch.Tensor, own_name: str) -> None:
    """Make ``linear`` compute with ``value`` as its weight. A weight other nodes also read (a head tied to
    the embedding) is left alone: the linear gets its own parameter ``own_name``."""
    reader, weight_node = weight_of(linear, kind)
    merged = nn.Parameter(value, requires_grad=False)
    if len(weight_node.users) > 1:
        gm.register_parameter(own_name, merged)
        with gm.graph.inserting_before(weight_node.next):
            own = gm.graph.get_attr(own_name)
        reader.replace_input_with(weight_node, own)
    else:
        owner, _, name = weight_node.target.rpartition(".")
        setattr(gm.get_submodule(owner), name, merged)


def remove_branch(gm: GraphModule, record) -> None:
    """Erase a record's inserted nodes; users of its last node read that node's first input again."""
    nodes = {n.name: n for n in gm.graph.nodes}
    last = nodes[record.nodes[-1]]
    last.replace_all_uses_with(last.args[0])
    for name in reversed(record.nodes):
        gm.graph.erase_node(nodes[name])
    gm.delete_submodule(record.module)

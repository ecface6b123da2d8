"""What every fold shares: write a merged weight into the graph module, and remove an inserted branch."""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.graph.analysis import weight_of


def set_weight(gm: GraphModule, linear, kind: str, value: torch.Tensor, own_name: str) -> None:
    """Make ``linear`` compute with ``value``, cast to the current weight's dtype, as its weight. A weight
    other nodes also read (a head tied to the embedding) is left alone: the linear gets its own parameter
    ``own_name``."""
    reader, weight_node = weight_of(linear, kind)
    owner, _, name = weight_node.target.rpartition(".")
    current = getattr(gm.get_submodule(owner), name)
    # a fold computes in float32 (an adapter's weights are float32 on a half-precision base); the merged
    # weight keeps the base's dtype, as HF PEFT's merge does
    merged = nn.Parameter(value.to(current.dtype), requires_grad=False)
    if len(weight_node.users) > 1:
        gm.register_parameter(own_name, merged)
        with gm.graph.inserting_before(weight_node.next):
            own = gm.graph.get_attr(own_name)
        reader.replace_input_with(weight_node, own)
    else:
        setattr(gm.get_submodule(owner), name, merged)


def branch_input(nodes: dict, record):
    """The node a record's branch was built on: follow the first input of its last node back through the
    nodes it inserted (a cast back to the base dtype, the sum) to the first node it did not insert."""
    own, node = set(record.nodes), nodes[record.nodes[-1]]
    while node.name in own:
        node = node.args[0]
    return node


def remove_branch(gm: GraphModule, record) -> None:
    """Erase a record's inserted nodes; users of its last node read the node the branch was built on."""
    nodes = {n.name: n for n in gm.graph.nodes}
    nodes[record.nodes[-1]].replace_all_uses_with(branch_input(nodes, record))
    read = set()
    for name in reversed(record.nodes):
        read.update(nodes[name].all_input_nodes)
        gm.graph.erase_node(nodes[name])
    # a cast to the adapter's dtype that several branches shared (CompileContext.cast) goes with the last
    for node in read:
        if node.target is torch.ops.aten._to_copy.default and not node.users and node.name not in record.nodes:
            gm.graph.erase_node(node)
    gm.delete_submodule(record.module)

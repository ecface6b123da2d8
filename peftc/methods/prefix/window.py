"""Which attentions slide, for the prefix pass (:func:`attention_windows`): read off the masks the captured
graph computes, not off the model's config.

HF PEFT's prefix is a KV cache at positions 0..P-1 and the real tokens sit at P..P+T-1, so under a sliding
window W (transformers' ``sliding_window_overlay``: key j is visible to query q when ``j > q - W``) real
token i sees prefix position p only while ``P + i - p < W``.

Which attentions slide is a per-model rule in transformers (Mistral: all when ``sliding_window`` is set;
Qwen2: layers from ``max_window_layers`` on when ``use_sliding_window``; Gemma2/Gemma3: ``layer_types``),
and the captured graph already computes each attention's mask by that rule. So the pass runs each distinct
mask's subgraph on one unpadded sequence of W + 2 tokens and reads the window off the mask itself: no rule
per model to keep in step with transformers, and the exact inequality the model uses (an inclusive
``j >= q - W``, or a bidirectional ``|q - j| <= W``, shows as a window of W + 1). The config only says how
long a sequence must be for a window to show (``sliding_window``); a window no shorter than the model's
maximum length never drops a prefix position, so it is not looked for."""
from __future__ import annotations

import torch
from torch.fx import Graph, GraphModule, Node

from peftc.errors import PassError
from peftc.graph.capture import max_positions
from peftc.methods.prefix.dataflow import upstream
from peftc.methods.prefix.explicit import AttentionCall


def attention_windows(gm: GraphModule, config, calls: list[AttentionCall], value) -> dict[str, int]:
    """Attention node name -> its sliding window W, for those of ``calls`` whose mask slides (see the module
    doc). ``value(target)`` reads a graph tensor with its values (a streamed model's from its checkpoint)."""
    window = getattr(config, "sliding_window", None)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window >= max_positions(config):
        return {}
    by_mask: dict[Node, list[str]] = {}
    for call in calls:
        if isinstance(call.mask, Node):
            by_mask.setdefault(call.mask, []).append(call.node.name)
    if not by_mask:
        return {}
    length = window + 2
    values = _run_masks(gm, list(by_mask), length, value)
    out = {}
    for (mask, names), probed in zip(by_mask.items(), values):
        found = _window_of(probed, length, names[0])
        if found is not None:
            out.update(dict.fromkeys(names, found))
    return out


def _run_masks(gm: GraphModule, masks: list[Node], length: int, value) -> list[torch.Tensor]:
    """The ``masks`` as the graph computes them for one sequence of ``length`` tokens, none padded."""
    needed = upstream(masks)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = {placeholders[0]: torch.zeros(1, length, dtype=torch.long),
              placeholders[1]: torch.ones(1, length, dtype=torch.long)}
    graph, env, feed = Graph(), {}, []
    for node in gm.graph.nodes:
        if node not in needed:
            continue
        if node.op == "placeholder" and node not in inputs:
            raise PassError(f"cannot read the sliding window of the attention masks: they read input {node.name}")
        if node.op == "placeholder":
            feed.append(inputs[node])
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[m] for m in masks))
    probe = GraphModule(torch.nn.Module(), graph)
    for node in graph.nodes:
        if node.op == "get_attr":
            _set_attr(probe, node.target, value(node.target))
    with torch.no_grad():
        return list(probe(*feed))


def _set_attr(module: torch.nn.Module, target: str, tensor: torch.Tensor) -> None:
    *path, name = target.split(".")
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    module.register_buffer(name, tensor)


def _window_of(mask: torch.Tensor, length: int, name: str) -> int | None:
    """The window W of a probed mask whose keys j before query i are visible exactly when ``i - j < W``;
    None when all of them are."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape[-2:]) != (length, length):
        return None
    visible = mask if mask.dtype == torch.bool else mask == 0
    visible = visible.reshape(-1, length, length)[0]
    i, j = torch.arange(length).unsqueeze(1), torch.arange(length).unsqueeze(0)
    before = i > j
    reach = int((i - j)[before & visible].max()) + 1 if (before & visible).any() else 1
    if not torch.equal(visible[before], ((i - j) < reach)[before]):
        raise PassError(f"the mask of attention {name} is neither causal nor a sliding window over the keys "
                        "before each query, so prefix cannot tell which of its positions a query sees")
    return None if reach >= length else reach

"""The output head and the loss on the labelled positions only, a chunk of rows at a time.

A causal LM's head turns the hidden state of every position into vocabulary-sized logits (49,152 a
position on SmolLM2), but the loss needs them only where the next token has a label: on prompt/completion
data, a small part of the batch. :func:`head_split` cuts a compiled model just before its head, when no
pass rewrote the head, and :func:`head_loss_sum` applies the head and the cross-entropy to the labelled
rows only, ``chunk`` rows at a time. It computes each chunk's gradients in the forward and keeps only those
(the "fused linear cross-entropy"), so at most ``chunk`` × vocab logits exist at once, backward included.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
from torch import nn
from torch.fx import Graph, Node
from torch.fx.node import map_arg

from peftc.graph.capture import deepcopy_quietly
from peftc.training.data import IGNORE
from peftc.errors import PeftcError
from peftc.compiler.passmanager import META_KEY

aten = torch.ops.aten
#: rows of the head computed at once: 256 × 49,152 float32 logits are 48 MiB
CHUNK = 256
CASTS = {aten.to.dtype, aten._to_copy.default}
ASSERTS = {aten._assert_tensor_metadata.default}


def head_split(model) -> "HeadSplit | None":
    """The model up to its output head, or None when the head is not a plain ``aten.linear`` that no pass
    rewrote and whose output is the model's output (through dtype casts at most): callers then compute
    full logits. ``model`` is a :class:`peftc.compiler.compiled.CompiledModel`."""
    heads = [site.node for site in model.sites.linears if site.role == "head"]
    if len(heads) != 1:
        return None
    cut = _cut(model.graph_module.graph, heads[0])
    return None if cut is None else HeadSplit(model, heads[0], *cut)


def _cut(graph: Graph, head: str) -> tuple[Graph, str, str | None] | None:
    """A copy of ``graph`` that returns the head's input instead of its output, with the get_attr targets
    of the head's weight and bias; None when the head is not one :func:`head_split` accepts."""
    graph = deepcopy_quietly(graph)
    node = next((n for n in graph.nodes if n.name == head), None)
    if (node is None or node.op != "call_function" or node.target is not aten.linear.default or node.kwargs
            or META_KEY in node.meta or not isinstance(node.args[0], Node)):
        return None
    params = [node.args[1], node.args[2] if len(node.args) > 2 else None]
    if any(p is not None and not (isinstance(p, Node) and p.op == "get_attr" and META_KEY not in p.meta)
           for p in params):
        return None
    chain, checks, tip = [node], [], node
    while True:                                       # head -> cast -> ... -> output, nothing else reads it
        users = list(tip.users)
        checks += [u for u in users if u.target in ASSERTS and not u.users and META_KEY not in u.meta]
        rest = [u for u in users if u not in checks]
        if len(rest) != 1 or META_KEY in rest[0].meta:
            return None
        following = rest[0]
        if following.op == "output":
            break
        if not (following.op == "call_function" and following.target in CASTS and following.args[0] is tip
                and set(following.kwargs) <= {"dtype"}):
            return None
        chain.append(following)
        tip = following
    returned: list[Node] = []
    map_arg(following.args, returned.append)
    if returned != [tip]:
        return None
    following.args = map_arg(following.args, lambda n: node.args[0] if n is tip else n)
    for dead in checks + chain[::-1]:
        graph.erase_node(dead)
    for p in params:
        if p is not None and not p.users:
            graph.erase_node(p)
    graph.lint()
    return graph, params[0].target, params[1].target if params[1] is not None else None


class HeadSplit(nn.Module):
    """A compiled model up to its output head: ``forward(input_ids, attention_mask=None)`` returns the
    hidden states the head reads (batch × seq × hidden); :attr:`weight` and :attr:`bias` are the head's.

    The body's code is generated from the model's current graph and rebuilt whenever that graph's code
    changes (``train()`` and ``eval()`` rewrite the dropout nodes). It runs with the model's graph module
    as ``self``, so it reads the model's own parameters and buffers (no copies), wherever ``.to()`` moved
    them. The model is a submodule: DDP over a HeadSplit synchronises the model's trainable parameters."""

    def __init__(self, model, head: str, graph: Graph, weight: str, bias: str | None):
        super().__init__()
        self.model = model
        self.head = head
        self._install(graph, weight, bias)

    def _install(self, graph: Graph, weight: str, bias: str | None) -> None:
        code = graph.python_code(root_module="self")
        namespace = dict(code.globals)
        # dont_inherit: this module's `from __future__ import annotations` must not reach the generated code
        exec(compile(code.src, f"<peftc body of {self.model.model_ref}>", "exec", dont_inherit=True), namespace)
        self._body: Callable = namespace["forward"]
        self._weight, self._bias = weight, bias
        self._source = self.model.graph_module.code

    @torch.compiler.disable   # under torch.compile, the check and the rebuild run eagerly, the body compiled
    def _refresh(self) -> None:
        gm = self.model.graph_module
        if gm.code != self._source:
            cut = _cut(gm.graph, self.head)
            if cut is None:
                raise PeftcError(f"the graph of {self.model.model_ref} changed after its head was split "
                                 f"off: {self.head} is no longer a plain linear feeding the output")
            self._install(*cut)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._refresh()
        return self._body(self.model.graph_module, input_ids, attention_mask)

    @property
    def weight(self) -> torch.Tensor:
        return operator.attrgetter(self._weight)(self.model.graph_module)

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self._bias is None else operator.attrgetter(self._bias)(self.model.graph_module)

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
        """:func:`head_loss_sum` with this model's head."""
        return head_loss_sum(hidden, self.weight, self.bias, labels, chunk)


def head_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                  chunk: int = CHUNK) -> torch.Tensor:
    """Summed next-token cross-entropy over the labels that are not IGNORE (labels not shifted): what
    ``token_loss_sum(F.linear(hidden, weight, bias), labels)`` gives, with the head applied only to the
    positions whose next token has a label, ``chunk`` rows at a time, in float32."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    keep = labels[:, 1:] != IGNORE
    rows = hidden[:, :-1][keep]
    targets = labels[:, 1:][keep]
    return _LinearCrossEntropy.apply(rows, targets, weight, bias, chunk, torch.is_grad_enabled())


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(rows_i · Wᵀ + b, targets_i). The forward computes, chunk by chunk, the logits, the loss and
    the gradients (softmax − one-hot) · W, (softmax − one-hot)ᵀ · rows and Σ(softmax − one-hot) of the
    inputs that need one, and keeps only those; the backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, rows, targets, weight, bias, chunk, grad_enabled):
        # inside forward grad mode is off and ctx.needs_input_grad ignores it: decide from the caller's mode
        want_rows = grad_enabled and rows.requires_grad
        want_weight = grad_enabled and weight.requires_grad
        want_bias = grad_enabled and bias is not None and bias.requires_grad
        w = weight.float()
        b = None if bias is None else bias.float()
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty(rows.shape, dtype=torch.float32, device=rows.device) if want_rows else None
        grad_weight = torch.zeros_like(w) if want_weight else None
        grad_bias = torch.zeros_like(b) if want_bias else None
        for start in range(0, rows.shape[0], chunk):
            x = rows[start:start + chunk].float()
            t = targets[start:start + chunk]
            logits = x @ w.t() if b is None else torch.addmm(b, x, w.t())
            picked = logits.gather(1, t[:, None])
            top = logits.amax(1, keepdim=True)
            probs = logits.sub_(top).exp_()                           # in place: one chunk × vocab buffer
            sums = probs.sum(1, keepdim=True)
            total += (top + sums.log() - picked).sum()
            if want_rows or want_weight or want_bias:
                probs.div_(sums)
                probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d loss / d logits
                if want_rows:
                    torch.mm(probs, w, out=grad_rows[start:start + chunk])
                if want_weight:
                    grad_weight.addmm_(probs.t(), x)
                if want_bias:
                    grad_bias += probs.sum(0)
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        ctx.dtypes = (rows.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = [None if g is None else (g * grad_output).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return grads[0], None, grads[1], grads[2], None, None

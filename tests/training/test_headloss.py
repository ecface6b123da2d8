"""The head and the loss on labelled positions only, in chunks: the same loss and gradients as full logits,
for tied and untied heads, any chunk size, dropout in train and eval mode, a trainable head, and the
fallback to full logits when a spec rewrites the head; ``peftc train`` trains as it did on full logits."""
import json

import pytest
import torch
import torch.nn.functional as F

import peftc
import peftc.training.tasks
from conftest import randomize_adapters
from peftc.training.data import IGNORE
from peftc.errors import PeftcError
from peftc.training.headloss import head_loss_sum, head_split
from peftc.training.train import CausalLMWithLoss, TrainConfig, token_loss_sum, train
from numerics import REORDERED, REORDERED_GRADIENT, SAME_FUNCTION, assert_close

SPEC = "lora q, v r=4 alpha=8\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def batch(prompt=(4, 6, 3), seq: int = 12, pad: int = 3, vocab: int = 512):
    """Three rows: a prompt of ``prompt[i]`` positions carries no labels; the last row is right-padded."""
    ids = torch.randint(3, vocab, (len(prompt), seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, seq - pad:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    for row, length in enumerate(prompt):
        labels[row, :length] = IGNORE
    return ids, mask, labels


def compiled(tiny, ref: str, spec: str = SPEC):
    """``spec`` on a tiny model, with every inserted parameter non-zero."""
    model = peftc.compile(tiny(ref), spec, seed=0)
    randomize_adapters(model)
    return model


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = trainable(model)
    loss = compute()
    grads = torch.autograd.grad(loss / 3, list(params.values()))      # a mean: the backward gets 1/3
    return loss.detach(), dict(zip(params, grads))


def assert_same(expected, actual):
    (loss_a, grads_a), (loss_b, grads_b) = expected, actual
    why = "the head and the loss in chunks over the labelled rows: the same sums in another order"
    assert_close(loss_b, loss_a, rel=REORDERED, why=why)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:     # assert_close refuses an all-zero expected gradient: a real gradient, not a trivial pass
        assert_close(grads_b[name], grads_a[name], rel=REORDERED_GRADIENT, why=why, name=name)


@pytest.mark.parametrize("ref, tied", [("tiny-llama", False), ("tiny-gpt2", True)])
@pytest.mark.parametrize("chunk", [1, 5, 256])      # 20 labelled rows: smaller chunks, and one larger
def test_loss_and_gradients_equal_the_full_logits_path(tiny, ref, tied, chunk):
    model = compiled(tiny, ref)
    split = head_split(model)
    assert split is not None
    ids, mask, labels = batch()
    assert int((labels[:, 1:] != IGNORE).sum()) == 20
    gm = model.graph_module
    assert (split.weight is gm.get_parameter(model.sites.embed)) == tied
    assert {id(p) for p in split.parameters()} == {id(p) for p in model.parameters()}    # no copies
    full = loss_and_grads(model, lambda: token_loss_sum(model(ids, mask), labels))
    assert_same(full, loss_and_grads(model, lambda: split.loss_sum(split(ids, mask), labels, chunk=chunk)))


def test_the_backward_keeps_no_vocabulary_sized_tensor(tiny):
    model = compiled(tiny, "tiny-llama")
    split = head_split(model)
    ids, mask, labels = batch()
    vocab = split.weight.shape[0]

    def saved_shapes(compute):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            compute()
        return shapes
    hidden = split(ids, mask).detach().requires_grad_()
    assert any(vocab in s for s in saved_shapes(lambda: token_loss_sum(F.linear(hidden, split.weight), labels)))
    assert not any(vocab in s for s in saved_shapes(lambda: split.loss_sum(hidden, labels, chunk=4)))


def test_dropout_follows_train_and_eval(tiny):
    """The body is rebuilt when train()/eval() rewrite the dropout nodes: in train mode it draws the masks
    the full model draws from the same seed, in eval mode it has none, and back again."""
    model = compiled(tiny, "tiny-llama", "lora q, v r=4 alpha=8 dropout=0.3\n")
    split = head_split(model)
    ids, mask, labels = batch()

    def both(seed):
        torch.manual_seed(seed)
        full = loss_and_grads(model, lambda: token_loss_sum(model(ids, mask), labels))
        torch.manual_seed(seed)
        return full, loss_and_grads(model, lambda: split.loss_sum(split(ids, mask), labels))
    model.train()
    full, ours = both(0)
    assert_same(full, ours)
    model.eval()
    evaluated, ours_eval = both(1)
    assert_same(evaluated, ours_eval)
    assert not torch.allclose(evaluated[0], full[0])                    # dropout was on, then off
    model.train()
    again = both(0)
    assert_same(*again)
    assert torch.equal(again[1][0], ours[0])


@pytest.mark.parametrize("spec", ["quant nf4 base\nlora q, v r=4\n", "adapter after=ffn bottleneck=8\n",
                                  "prefix tokens=4\n"])
def test_specs_that_leave_the_head_alone_split_it(tiny, spec):
    model = compiled(tiny, "tiny-llama", spec)
    split = head_split(model)
    assert split is not None
    ids, mask, labels = batch()
    full = loss_and_grads(model, lambda: token_loss_sum(model(ids, mask), labels))
    assert_same(full, loss_and_grads(model, lambda: split.loss_sum(split(ids, mask), labels, chunk=7)))


@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.slow
def test_a_trainable_head_weight_gets_its_gradient(ref):
    """A head weight that requires grad (unfrozen by hand; on tiny-gpt2 the embedding shares it) gets the
    gradient full logits give it. The model is built here: the tiny fixture's models are never mutated."""
    model = peftc.compile(ref, SPEC, seed=0)
    randomize_adapters(model)
    split = head_split(model)
    split.weight.requires_grad_(True)
    ids, mask, labels = batch()
    full = loss_and_grads(model, lambda: token_loss_sum(model(ids, mask), labels))
    ours = loss_and_grads(model, lambda: split.loss_sum(split(ids, mask), labels, chunk=4))
    assert any(g.shape == split.weight.shape for g in ours[1].values())
    assert_same(full, ours)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_head_loss_sum_with_a_bias_and_lower_precision(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=gen)
    weight = torch.randn(50, 16, generator=gen) * 0.3
    bias = torch.randn(50, generator=gen)
    labels = torch.randint(0, 50, (2, 9), generator=gen)
    labels[0, :4] = IGNORE
    labels[1, 6:] = IGNORE
    for dtype in (torch.float32, torch.bfloat16):
        inputs = [t.to(dtype).requires_grad_() for t in (hidden, weight, bias)]
        reference = [t.detach().float().requires_grad_() for t in inputs]   # the head in float32
        expected = token_loss_sum(F.linear(*reference), labels)
        got = head_loss_sum(*inputs, labels, chunk=chunk)
        assert got.dtype == torch.float32
        assert_close(got, expected, rel=REORDERED, why="chunks of rows sum the loss in another order")
        for ours, theirs in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(expected, reference)):
            assert ours.dtype == dtype
            # in half precision the two round the gradient to the dtype at different points: each rounding is
            # within one unit in the last place (torch.finfo eps: 2**-7 for bfloat16, 2**-10 for float16)
            rel = REORDERED if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
            assert_close(ours.float(), theirs.to(dtype).float(), rel=rel, why=f"{dtype} rounding")
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        head_loss_sum(hidden, weight, bias, labels, chunk=0)


def test_a_batch_without_labels_gives_zero_loss_and_zero_gradients(tiny):
    model = compiled(tiny, "tiny-llama")
    split = head_split(model)
    ids, mask, _ = batch()
    labels = torch.full_like(ids, IGNORE)
    loss, grads = loss_and_grads(model, lambda: split.loss_sum(split(ids, mask), labels))
    assert loss.item() == 0.0
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_a_head_whose_logits_are_cast_is_split(tiny):
    """``logits.float()`` in a model's forward exports as a metadata check and ``aten.to.dtype`` between
    the head and the output: the head is still split off, and the loss is unchanged."""
    model = compiled(tiny, "tiny-llama")
    graph = model.graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    head = output.args[0][0]
    with graph.inserting_before(output):
        graph.call_function(torch.ops.aten._assert_tensor_metadata.default, (head,), {"dtype": torch.float32})
        cast = graph.call_function(torch.ops.aten.to.dtype, (head, torch.float32))
    output.args = ((cast,),)
    model.graph_module.recompile()
    split = head_split(model)
    assert split is not None
    ids, mask, labels = batch()
    full = loss_and_grads(model, lambda: token_loss_sum(model(ids, mask), labels))
    assert_same(full, loss_and_grads(model, lambda: split.loss_sum(split(ids, mask), labels)))


@pytest.mark.parametrize("spec", ["lora head r=4\n", "full head\n", "ia3 head\n", "prompt tokens=4\n"])
def test_a_spec_that_rewrites_the_head_falls_back_to_full_logits(tiny, spec):
    model = compiled(tiny, "tiny-llama", spec)
    assert head_split(model) is None
    ids, mask, labels = batch()
    wrapped = CausalLMWithLoss(model)
    out = wrapped(ids, mask, labels)
    count = (labels[:, 1:] != IGNORE).sum()
    assert_close(out["loss"], token_loss_sum(model(ids, mask), labels) / count, rel=REORDERED,
                 why="the head on the labelled rows sums in another order")
    assert out["logits"].shape == (*ids.shape, 512)


def test_the_trainer_wrapper_returns_the_loss_with_labels_and_logits_without(tiny):
    model = compiled(tiny, "tiny-llama")
    wrapped = CausalLMWithLoss(model)
    assert [name for name, _ in wrapped.named_children()] == ["model"]
    ids, mask, labels = batch()
    out = wrapped(ids, mask, labels, num_items_in_batch=torch.tensor(40))
    assert out.keys() == {"loss"}
    assert_close(out["loss"], token_loss_sum(model(ids, mask), labels) / 40, rel=REORDERED,
                 why="the head on the labelled rows sums in another order")
    assert torch.equal(wrapped(ids, mask)["logits"], model(ids, mask))


def test_a_graph_that_rewrites_the_head_after_the_split_is_an_error(tiny):
    model = compiled(tiny, "tiny-llama")
    split = head_split(model)
    graph = model.graph_module.graph
    head = next(n for n in graph.nodes if n.name == split.head)
    with graph.inserting_after(head):
        scaled = graph.call_function(torch.ops.aten.mul.Tensor, (head, 2.0))
    head.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    model.graph_module.recompile()
    with pytest.raises(PeftcError, match="changed after its head was split off"):
        split(batch()[0])


@pytest.mark.slow
def test_peftc_train_gives_what_full_logits_gave(tmp_path, monkeypatch):
    """Dropout, gradient accumulation and the eval loss: the same losses and adapters as the full-logits
    path (forced here by making head_split decline)."""
    (tmp_path / "lora.peft").write_text("lora q, v r=4 alpha=8 dropout=0.1\n")
    rows = [{"prompt": f"item {i}:", "completion": f" value {i * 7 % 13}"} for i in range(20)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(out):
        return train(TrainConfig(spec=str(tmp_path / "lora.peft"), data=str(tmp_path / "data.jsonl"),
                                 out=str(tmp_path / out), model="tiny-llama", steps=3, batch_size=2, grad_accum=2,
                                 lr=1e-2, max_length=32, eval_split=4, eval_every=1, progress=False))
    ours = run("split")
    monkeypatch.setattr(peftc.training.tasks, "head_split", lambda model: None)
    full = run("full")
    for key in ("loss", "eval_loss"):
        assert [h[key] for h in ours.history] == pytest.approx([h[key] for h in full.history], rel=1e-5)
    expected = full.model.adapter_parameters()
    for name, param in ours.model.adapter_parameters().items():
        assert_close(param, expected[name], rel=SAME_FUNCTION, name=name,
                     why="chunked and full-logit losses round differently; Adam carries that into the steps")

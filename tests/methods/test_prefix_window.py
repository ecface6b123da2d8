"""``prefix`` under sliding-window attention: HF PEFT's prefix is a KV cache at positions 0..P-1, so a window
W drops prefix position p for real token i once ``P + i - p >= W``; peftc's prefix columns follow it, in the
sliding layers only (Mistral: every layer; Qwen2: layers from ``max_window_layers`` on; Gemma3: its
``layer_types``). Checked against HF PEFT through peftc's own files, and at the window's edge."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from peft import PeftModel
from torch import nn

import peftc
from peftc.errors import PassError
from peftc.export.kvcache import cache_decoder
from peftc.methods.prefix.attention import Emit, extend_attention
from peftc.methods.prefix.window import _window_of
from conftest import randomize_adapters, token_ids
from numerics import REORDERED, SAME_FUNCTION, assert_close, assert_differs

aten = torch.ops.aten
TOKENS = 3
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
LAYER_TYPES = ["sliding_attention", "full_attention"]


def build(kind: str, window: int | None = 4):
    """A tiny seeded random CausalLM (the same weights for every ``window``)."""
    configs = {
        "mistral": lambda: T.MistralConfig(sliding_window=window, **SIZES),
        "qwen2": lambda: T.Qwen2Config(use_sliding_window=window is not None, sliding_window=window,
                                       max_window_layers=1, **SIZES),
        "gemma3": lambda: T.Gemma3TextConfig(sliding_window=window or 512, layer_types=LAYER_TYPES
                                             if window else ["full_attention"] * 2, **SIZES),
    }
    classes = {"mistral": T.MistralForCausalLM, "qwen2": T.Qwen2ForCausalLM, "gemma3": T.Gemma3ForCausalLM}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return classes[kind](configs[kind]()).eval()


def inputs(seq: int):
    ids = token_ids(2, seq)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                       # a left-padded row: the window counts padded positions too
    return ids, mask


def compiled(kind: str, directory, window: int | None = 4):
    """peftc's prefix on ``build(kind, window)``, with live values saved as HF PEFT's files in ``directory``
    (or, when they are there already, loaded from them)."""
    model = peftc.compile(build(kind, window), f"prefix tokens={TOKENS}")
    if (directory / "adapter_config.json").exists():
        model.load_adapter(directory)
    else:
        randomize_adapters(model, scale=1.0)
        model.save_hf_peft(directory)
    return model


def hf_peft(kind: str, directory, ids, mask, window: int | None = 4) -> torch.Tensor:
    hf = PeftModel.from_pretrained(build(kind, window), str(directory)).eval()
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits


# Every comparison with HF PEFT is bounded by SAME_FUNCTION (3e-5 of the largest logit): the same function
# through HF PEFT's cache and modules, whose sums run in another order; a prefix position wrongly kept in
# or out of a window moves the logits by 0.5-1.5 of their largest (seen on these models), far above it.
@pytest.mark.parametrize("kind, windows", [("mistral", [4, 4]), ("qwen2", [None, 4]),
                                           ("gemma3", [4, None])])
def test_equals_hf_peft_once_the_window_drops_prefix_positions(kind, windows, tmp_path):
    """P + T = 12 > W = 4: the last queries see no prefix position in the sliding layers, every one in the
    full-attention layers; the windows are read off each attention's mask, layer by layer."""
    model = compiled(kind, tmp_path)
    assert [r.window for r in model.records] == windows
    ids, mask = inputs(9)
    with torch.no_grad():
        ours = model(ids, mask)
        everywhere = compiled(kind, tmp_path, window=None)(ids, mask)     # the same prefixes, no window
    assert_differs(ours, everywhere, rel=1e-2, why="the window drops prefix positions at this length")
    assert_close(ours, hf_peft(kind, tmp_path, ids, mask), rel=SAME_FUNCTION,
                 why="HF PEFT's cache and modules sum in another order")


def test_at_the_window_edge(tmp_path):
    """W = 8, P = 3: with T = 5 (P + T = W) every query still sees every prefix position, and the output is
    exactly that of the model without a window; with T = 6 the last query loses prefix position 0, and the
    output moves with HF PEFT's."""
    model = compiled("mistral", tmp_path, window=8)
    assert [r.window for r in model.records] == [8] * 2
    unwindowed = compiled("mistral", tmp_path, window=None)
    assert [r.window for r in unwindowed.records] == [None] * 2
    for seq in (5, 6):
        ids, mask = inputs(seq)
        with torch.no_grad():
            ours, plain = model(ids, mask), unwindowed(ids, mask)
        if seq == 5:    # the same SDPA inputs (keys, values and every mask entry) in both graphs
            assert torch.equal(ours, plain)
        else:
            assert_differs(ours[0, -1], plain[0, -1], rel=1e-3, why="the last query lost prefix position 0")
            assert torch.equal(ours[:, :-1], plain[:, :-1])          # the queries before it did not
        assert_close(ours, hf_peft("mistral", tmp_path, ids, mask, window=8), rel=SAME_FUNCTION,
                     why="HF PEFT's cache and modules sum in another order")


def test_kv_cache_decoder_keeps_the_prefix_window(tmp_path):
    """The window is counted from the queries' place among the keys, so the KV-cache decoder (which puts
    cached keys before the new ones) drops prefix positions at the same steps as the whole sequence."""
    merged = compiled("mistral", tmp_path).merge()
    decoder = cache_decoder(merged)
    ids = token_ids(1, 9)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        whole = merged(ids, mask)
        out = decoder(ids[:, :5], mask[:, :5], *decoder.layout.empty(1))
        steps, past = [out[0]], out[1:]
        for t in range(5, 9):
            out = decoder(ids[:, t:t + 1], mask[:, :t + 1], *past)
            steps.append(out[0])
            past = out[1:]
    assert_close(torch.cat(steps, 1), whole, rel=REORDERED,
                 why="cached keys give the same sums over fewer new rows, in another order")


class Attention(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_window_columns_of_the_sdpa_rewrite_equal_eager_attention(dtype):
    """Queries that are the last 4 of 6 keys (a cached step), W = 5, P = 3: query r (position i = r + 2)
    sees prefix position p while 3 + i - p < 5; for a float mask the hidden columns get the dtype's lowest
    value, as transformers' additive masks do."""
    gen = torch.Generator().manual_seed(0)
    b, heads, tq, tk, d, p, w = 2, 2, 4, 6, 8, TOKENS, 5
    q = torch.randn(b, heads, tq, d, generator=gen)
    k, v = torch.randn(b, heads, tk, d, generator=gen), torch.randn(b, heads, tk, d, generator=gen)
    i, j = torch.arange(tk - tq, tk).unsqueeze(1), torch.arange(tk).unsqueeze(0)
    visible = ((j <= i) & (j > i - w)).expand(b, 1, tq, tk)
    mask = visible if dtype == torch.bool else torch.where(visible, 0.0, torch.finfo(dtype).min)
    gm = torch.export.export(Attention(), (q, k, v, mask), strict=False).module()
    prefix = nn.Module()
    prefix.key = nn.Parameter(torch.randn(heads, p, d, generator=gen))
    prefix.value = nn.Parameter(torch.randn(heads, p, d, generator=gen))
    gm.add_submodule("prefix", prefix)
    emit = Emit(SimpleNamespace(gm=gm, tag=lambda node, *rest: node), None, 0, "prefix")
    sdpa = next(n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default)
    with gm.graph.inserting_before(sdpa):
        key, value = emit.attr("prefix.key"), emit.attr("prefix.value")
    extend_attention(emit, sdpa, key, value, p, heads, heads, window=w)
    gm.recompile()
    seen = (p + i - torch.arange(p).unsqueeze(0)) < w                   # (tq, p)
    assert seen.sum(1).tolist() == [2, 1, 0, 0]                         # positions 1-2, 2, then none
    full = torch.cat([seen.expand(b, 1, tq, p), visible], -1)
    want = F.scaled_dot_product_attention(q, torch.cat([prefix.key.detach().expand(b, -1, -1, -1), k], 2),
                                          torch.cat([prefix.value.detach().expand(b, -1, -1, -1), v], 2),
                                          attn_mask=full)
    with torch.no_grad():
        got = gm(q, k, v, mask)
    assert_close(got, want, rel=REORDERED, why="the same SDPA over masks built in another way")


def test_windows_are_read_off_the_mask():
    """A causal mask has no window, a band of 3 keys before each query a window of 3; a chunked mask (the
    keys of a query's chunk only) is neither, and prefix says it cannot place its positions."""
    n = 8
    i, j = torch.arange(n).unsqueeze(1), torch.arange(n).unsqueeze(0)
    assert _window_of((j <= i)[None, None], n, "sdpa") is None
    assert _window_of(((j <= i) & (j > i - 3))[None, None], n, "sdpa") == 3
    assert _window_of(torch.where((j <= i) & (j > i - 3), 0.0, -1e9)[None, None], n, "sdpa") == 3
    with pytest.raises(PassError, match="neither causal nor a sliding window"):
        _window_of(((j <= i) & (j // 4 == i // 4))[None, None], n, "sdpa")

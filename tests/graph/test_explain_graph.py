"""peftc explain (per-layer change, soft-prompt nearest tokens) and peftc graph (one block as SVG)."""
import math
import xml.etree.ElementTree as ET

import pytest

import torch

import peftc
from peftc.cli import main
from peftc.compiler.explain import nearest_tokens

SPEC = "lora q, v r=4 layers=0..1\nia3 down\nadapter after=attn bottleneck=8\n"


@pytest.mark.slow
def test_explain_reports_each_statements_change_per_layer(tmp_path, capsys):
    (tmp_path / "s.peft").write_text(SPEC)
    out = tmp_path / "out"
    assert main(["compile", str(tmp_path / "s.peft"), "--model", "tiny-llama", "--out", str(out)]) == 0
    model = peftc.compile(peftc.load_model("tiny-llama"), SPEC)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_adapter(out)
    capsys.readouterr()
    assert main(["explain", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    table = printed[next(i for i, line in enumerate(printed) if line.split()[:1] == ["layer"]) + 1:]
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in table}
    gm = model.graph_module
    for layer in range(4):
        lora = [r for r in model.records if r.method == "lora" and r.site.layer == layer]
        expected = math.sqrt(sum(float(r.delta(gm).norm()) ** 2 for r in lora))
        assert math.isclose(rows[str(layer)][0], expected, rel_tol=1e-3, abs_tol=1e-9)
        ia3 = next(r for r in model.records if r.method == "ia3" and r.site.layer == layer)
        assert math.isclose(rows[str(layer)][1], float((ia3.full(gm) - 1).norm()), rel_tol=1e-3)
    assert rows["2"][0] == 0 and rows["0"][0] > 0                    # lora only in layers 0..1


def test_nearest_tokens_finds_the_embedding_rows_themselves():
    embedding = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    found = nearest_tokens(embedding[[7, 21]] * 3.0, embedding, tokenizer=None, top=2)
    assert [row[0][0] for row in found] == ["#7", "#21"]
    assert all(math.isclose(row[0][1], 1.0, rel_tol=1e-5) for row in found)


@pytest.mark.slow
def test_graph_draws_the_block_with_inserted_nodes_highlighted(tmp_path, capsys):
    (tmp_path / "s.peft").write_text(SPEC)
    svg = tmp_path / "block.svg"
    assert main(["graph", str(tmp_path / "s.peft"), "--model", "tiny-llama", "--layer", "1",
                 "--out", str(svg)]) == 0
    root = ET.parse(svg).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "layer 1 before" in texts and any(t.startswith("layer 1 after") for t in texts)
    # call nodes (weights are not drawn): lora's 2 sites share their input, so one cat of the A weights,
    # one linear and a slice per site, then 2 x (linear, mul, add); ia3 one mul; adapter linear, relu,
    # linear, mul, add
    assert texts.count("+lora") == 10 and texts.count("+ia3") == 1 and texts.count("+adapter") == 5
    highlighted = [r for r in root.iter(f"{ns}rect") if r.get("fill") == "#ffd8a8"]
    assert len(highlighted) == 10 + 1 + 5
    assert main(["graph", str(tmp_path / "s.peft"), "--model", "tiny-llama", "--layer", "9",
                 "--out", str(svg)]) == 1
    assert "--layer 9: tiny-llama has layers 0..3" in capsys.readouterr().err

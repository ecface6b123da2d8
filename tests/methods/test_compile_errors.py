import pytest

import peftc
from peftc.compiler import passmanager
def test_statement_selecting_nothing_names_it_and_the_model(tiny):
    with pytest.raises(peftc.SpecError) as err:
        peftc.compile(tiny("tiny-llama"), "lora q r=2\nlora \"*.no_such_proj\" r=2", filename="s.peft")
    assert (err.value.line, err.value.column) == (2, 1)
    message = str(err.value)
    assert "selects nothing in the model" in message
    assert "roles: q (4), k (4), v (4), o (4), gate (4), up (4), down (4), head (1)" in message
    assert "s.peft:2:1" in message


def test_layers_outside_the_model(tiny):
    with pytest.raises(peftc.SpecError, match="selects nothing") as err:
        peftc.compile(tiny("tiny-llama"), "lora q layers=10..12")
    assert err.value.line == 1


def test_overlapping_slices_of_a_fused_projection_name_both_lines(tiny):
    with pytest.raises(peftc.SpecError, match=r"adapts transformer.h.0.attn.c_attn \[v\] again; line 1") as err:
        peftc.compile(tiny("tiny-gpt2"), "lora q, v r=2\nlora v r=4")
    assert (err.value.line, err.value.column) == (2, 1)
    with pytest.raises(peftc.SpecError, match="adapts transformer.h.0.attn.c_attn again; line 1") as err:
        peftc.compile(tiny("tiny-gpt2"), 'lora q r=2\nlora "transformer.h.0.attn.c_attn"\nlora k r=4')
    assert err.value.line == 2
    assert len(peftc.compile(tiny("tiny-gpt2"), "lora q r=2\nlora k r=4").records) == 8   # disjoint slices


def test_encoder_has_no_gate(tiny):
    with pytest.raises(peftc.SpecError, match="the model has no 'gate' linears") as err:
        peftc.compile(tiny("tiny-bert"), "lora q, gate")
    assert (err.value.line, err.value.column) == (1, 9)


def test_overlapping_lora_statements_name_both_lines(tiny):
    with pytest.raises(peftc.SpecError, match="adapts model.layers.0.self_attn.q_proj again; line 1") as err:
        peftc.compile(tiny("tiny-llama"), "lora q r=2\nlora attn r=4")
    assert err.value.line == 2


def test_statement_without_a_pass_is_not_supported_yet(tiny, monkeypatch):
    # every method has a pass now: take prefix's away to see the message a method without one gets
    registry = {k: v for k, v in passmanager.load_passes().items() if k != "prefix"}
    monkeypatch.setattr(passmanager, "REGISTRY", registry)
    with pytest.raises(peftc.SpecError, match="'prefix' is not supported yet") as err:
        peftc.compile(tiny("tiny-llama"), "lora q\nprefix tokens=4")
    assert (err.value.line, err.value.column) == (2, 1)


def test_failing_pass_is_reported_with_name_span_and_history(tiny, monkeypatch):
    class Broken(passmanager.Pass):
        keyword = "lora"
        phase = "low-rank"

        def run(self, ctx, statement, index):
            raise RuntimeError("boom")

    registry = dict(passmanager.load_passes())
    monkeypatch.setattr(passmanager, "REGISTRY", {**registry, "lora": Broken})
    with pytest.raises(peftc.PassError, match=r"error in pass 'lora' \(x.peft:1:1\) after \[\]: RuntimeError: boom"):
        peftc.compile(tiny("tiny-llama"), "lora q", filename="x.peft")


def test_unknown_model_reference():
    with pytest.raises(peftc.ModelError, match="unknown model 'no-such-model'.*tiny-llama"):
        peftc.load_model("no-such-model")


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(peftc.ModelError, match="has no config.json"):
        peftc.load_model(str(tmp_path))


def test_unreadable_model_directory(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(peftc.ModelError, match="cannot load model"):
        peftc.load_model(str(tmp_path))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(peftc.ModelError, match="does not exist"):
        peftc.load_model(str(tmp_path / "model.gguf"))

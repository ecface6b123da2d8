import json

import pytest

from peft import PeftModel

import peftc
from peftc.cli import main


def test_check_prints_normalized_spec(tmp_path, capsys):
    spec = tmp_path / "ok.peft"
    spec.write_text("lora q,v r=8 alpha=16 ; # two statements on one line\nquant nf4 base\n")
    assert main(["check", str(spec)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("lora q, v r=8 alpha=16")
    assert out[1].startswith("quant nf4 base")


def test_check_reports_errors_with_exit_status_1(tmp_path, capsys):
    spec = tmp_path / "bad.peft"
    spec.write_text("lora q aplha=16\nlroa v\n")
    assert main(["check", str(spec)]) == 1
    err = capsys.readouterr().err
    assert f"{spec}:1:8:" in err and "did you mean 'alpha'" in err
    assert f"{spec}:2:1:" in err and "did you mean 'lora'" in err


def test_check_missing_file(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.peft")]) == 1
    assert "nope.peft" in capsys.readouterr().err


@pytest.mark.slow
def test_inspect_lists_linears_with_roles(capsys):
    assert main(["inspect", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama: causal-lm, 4 layers, 4 attentions, 29 linears" in out
    assert any(line.split()[:4] == ["0", "k", "model.layers.0.self_attn.k_proj", "32"]
               for line in out.splitlines())
    assert main(["inspect", "tiny-llama", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["role"] for r in data["linears"]} == {"q", "k", "v", "o", "gate", "up", "down", "head"}


def test_inspect_unknown_model_is_a_clear_error(capsys):
    assert main(["inspect", "no-such-model"]) == 1
    assert "peftc: error: unknown model 'no-such-model'" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_then_export_round_trip(tmp_path, capsys):
    spec = tmp_path / "s.peft"
    spec.write_text("lora q, v r=4 alpha=8\n")
    out = tmp_path / "run"
    assert main(["compile", str(spec), "--model", "tiny-llama", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trainable params: 3,584" in printed
    assert {p.name for p in out.iterdir()} == {"peftc_adapter.safetensors", "adapter_config.json",
                                              "adapter_model.safetensors", "spec.peft", "report.txt",
                                              "graph.txt", "peftc.json"}
    assert "+ [lora @" in (out / "graph.txt").read_text()
    PeftModel.from_pretrained(peftc.load_model("tiny-llama"), str(out))     # HF PEFT accepts the files
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(out), "--onnx", str(onnx_path), "--compare-base"]) == 0
    printed = capsys.readouterr().out
    assert "ONNX operator counts, merged vs base: equal" in printed
    assert "merged graph ops equal the base graph's: yes" in printed
    assert onnx_path.is_file()


def test_compile_error_leaves_no_output(tmp_path, capsys):
    spec = tmp_path / "s.peft"
    spec.write_text("lora gate r=4\n")
    out = tmp_path / "run"
    assert main(["compile", str(spec), "--model", "tiny-bert", "--out", str(out)]) == 1
    assert "the model has no 'gate' linears" in capsys.readouterr().err
    assert not out.exists()


def test_methods_lists_every_declared_option(capsys):
    from peftc.methods import METHODS
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    from peftc.compiler.passmanager import load_passes
    headers = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert headers[0] == "lora TARGETS [OPTIONS]   (compiles)"
    assert headers[1].startswith("quant {nf4|int8} [TARGETS] [OPTIONS]   (")
    built = load_passes()
    for keyword, header in zip(METHODS, headers):
        assert header.split()[0] == keyword
        assert header.endswith("(compiles)") == (keyword in built)
        assert header.endswith("compiling it is not supported yet)") == (keyword not in built)
    for method in METHODS.values():
        assert main(["methods", method.keyword]) == 0
        section = capsys.readouterr().out
        for option in method.options:
            assert f"    {option.name}=" in section
    assert main(["methods", "lorra"]) == 1
    assert "unknown method 'lorra'; did you mean 'lora'?" in capsys.readouterr().err

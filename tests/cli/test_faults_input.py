"""Bad input gets a clear error, never a traceback and never a quiet wrong answer.

Each test does what a user did — runs ``peftc`` (as a subprocess, or ``peftc.cli.main`` in-process where
only the message matters) or calls the API — and checks the one ``peftc: error:`` line (or the located
spec diagnostic), exit status 1, no traceback, and that nothing was written where a file could have been."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftc
from peftc.cli import main
from peftc.lang.diagnostics import MAX_LINE, MAX_SHOWN

PEFTC = Path(sys.executable).with_name("peftc")
LORA = "lora q, v r=8 alpha=16 init=random\n"     # B non-zero: a rescaled B would show


def peftc_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(PEFTC), *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd)


def error_line(stderr: str) -> str:
    """The one ``peftc: error:`` line of a failed command (there must be exactly one, and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("peftc: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def fails(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    line = error_line(proc.stderr)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def main_fails(argv, capsys, *needles: str) -> str:
    assert main([str(a) for a in argv]) == 1
    line = error_line(capsys.readouterr().err)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory) -> Path:
    """A 'peftc compile' directory of tiny-llama with a rank-8 LoRA on q and v (B non-zero)."""
    root = tmp_path_factory.mktemp("run")
    spec = root / "s.peft"
    spec.write_text(LORA)
    assert main(["compile", str(spec), "--model", "tiny-llama", "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture
def run_dir(compiled_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(compiled_run, out)
    return out


@pytest.fixture
def hf_dir(run_dir) -> Path:
    """The run directory holding only HF PEFT's files (what export reads when peftc's file is absent)."""
    (run_dir / "peftc_adapter.safetensors").unlink()
    return run_dir


def edit_config(directory: Path, **fields) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


# ── adapter directories: one validation for export/load_adapter and load_hf_peft ───────────────────────

@pytest.mark.slow
@pytest.mark.parametrize("r, needle", [(16, "has rank 16 by 'r'/'rank_pattern', but"),
                                       (-8, "'r' = -8 is not a positive integer")])
def test_export_refuses_a_config_rank_that_does_not_describe_the_tensors(hf_dir, tmp_path, r, needle):
    edit_config(hf_dir, r=r)
    onnx = tmp_path / "m.onnx"
    line = fails(peftc_cli("export", hf_dir, "--onnx", onnx), needle)
    assert str(hf_dir / "adapter_config.json") in line
    assert not onnx.exists() and not list(tmp_path.glob("*.onnx*"))


BAD_CONFIGS = [
    ({"r": 0}, "'r' = 0 is not a positive integer"),
    ({"r": "8"}, "'r' = '8' is not a positive integer"),
    ({"r": True}, "'r' = True is not a positive integer"),
    ({"lora_alpha": "16"}, "'lora_alpha' = '16' is not a finite number > 0"),
    ({"lora_alpha": 1e39}, "'lora_alpha' = 1e+39 is not a finite number > 0"),
    ({"lora_dropout": 1.5}, "'lora_dropout' = 1.5 is not a probability in [0, 1)"),
    ({"use_rslora": "yes"}, "'use_rslora' = 'yes' is not true or false"),
    ({"target_modules": 5}, "'target_modules' = 5 is not a list of module names or a regular expression"),
    ({"target_modules": "q_proj("}, "'target_modules' has an invalid regular expression 'q_proj('"),
    ({"rank_pattern": {"q_proj[": 4}}, "'rank_pattern' has an invalid regular expression 'q_proj['"),
    ({"rank_pattern": {"(" * 5000 + ")" * 5000: 4}}, "'rank_pattern' has a regular expression nested too deeply"),
    ({"rank_pattern": {"q_proj": 0}}, "'rank_pattern' gives 'q_proj' the value 0, which is not a positive integer"),
    ({"alpha_pattern": {"q_proj": "x"}}, "'alpha_pattern' gives 'q_proj' the value 'x'"),
    ({"layers_to_transform": ["0"]}, "'layers_to_transform' = ['0'] is not a layer index"),
]


@pytest.mark.parametrize("fields, message", BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))])
def test_odd_config_values_are_refused_alike_by_load_hf_peft_and_load_adapter(hf_dir, tiny, fields, message):
    edit_config(hf_dir, **fields)
    compiled = peftc.compile(tiny("tiny-llama"), LORA)
    with pytest.raises(peftc.AdapterError) as by_load:
        compiled.load_adapter(hf_dir)
    with pytest.raises(peftc.AdapterError) as by_hf:
        peftc.load_hf_peft(tiny("tiny-llama"), hf_dir)
    assert str(by_load.value) == str(by_hf.value)           # one validation, not two
    assert str(by_load.value).startswith(f"{hf_dir / 'adapter_config.json'}: ")
    assert message in str(by_load.value)


def test_config_rank_mismatch_is_the_same_check_on_both_paths(hf_dir, tiny):
    """load_hf_peft compiles the rank the config says and finds tensors of another; load_adapter compiled
    the tensors' rank and finds a config that says another: both refuse, neither rescales B."""
    edit_config(hf_dir, r=16)
    compiled = peftc.compile(tiny("tiny-llama"), LORA)
    before = {k: v.clone() for k, v in compiled.adapter_parameters().items()}
    with pytest.raises(peftc.AdapterError, match="rank 16"):
        compiled.load_adapter(hf_dir)
    with pytest.raises(peftc.AdapterError, match=r"A \(8, 64\)"):
        peftc.load_hf_peft(tiny("tiny-llama"), hf_dir)
    edit_config(hf_dir, r=8, rank_pattern={"model.layers.3.self_attn.v_proj": 16})   # the last module only
    with pytest.raises(peftc.AdapterError, match="model.layers.3.self_attn.v_proj has rank 16"):
        compiled.load_adapter(hf_dir)
    after = compiled.adapter_parameters()       # every module is checked before any is loaded
    assert all(torch.equal(after[name], value) for name, value in before.items())


def test_config_that_is_not_json_utf8_or_an_object(hf_dir, tiny):
    config = hf_dir / "adapter_config.json"
    cases = [(b"\xff\xfe{}", "not UTF-8 text"), (b'{"r": 8,', "not valid JSON"),
             (b"[" * 100000, "nested too deeply"), (b"[1, 2]", "expected a JSON object, got list")]
    for data, message in cases:
        config.write_bytes(data)
        with pytest.raises(peftc.AdapterError, match=message) as caught:
            peftc.compile(tiny("tiny-llama"), LORA).load_adapter(hf_dir)
        assert str(config) in str(caught.value)


@pytest.mark.slow
def test_export_of_a_truncated_peftc_adapter_file(run_dir, tmp_path):
    weights = run_dir / "peftc_adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    onnx = tmp_path / "m.onnx"
    fails(peftc_cli("export", run_dir, "--onnx", onnx), f"{weights}: not a readable safetensors file")
    assert not onnx.exists()


def test_truncated_hf_weights(hf_dir, tiny):
    weights = hf_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(peftc.AdapterError, match="not a readable safetensors file") as caught:
        peftc.load_hf_peft(tiny("tiny-llama"), hf_dir)
    assert str(weights) in str(caught.value)


# ── spec files ───────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("text, column, written", [
    ("lora q alpha=1e400\n", 14, "1e400"), ("lora q alpha=1e300\n", 14, "1e300"),
    ("adapter scale=-1e39\n", 15, "-1e39"), ("lora q dropout=0.1 alpha=3.5e38\n", 26, "3.5e38")])
@pytest.mark.slow
def test_check_refuses_floats_outside_float32(tmp_path, text, column, written):
    spec = tmp_path / "s.peft"
    spec.write_text(text)
    proc = peftc_cli("check", spec)
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"{spec}:1:{column}: error: ")
    assert f"must be a finite number within float32 range (|x| <= 3.4e38), got '{written}'" in lines[0]
    assert lines[2] == "    " + " " * (column - 1) + "^" * len(written)


def test_largest_float32_is_accepted():
    assert peftc.parse("lora q alpha=3.4e38").statements[0].options["alpha"] == 3.4e38


def test_non_utf8_spec_is_a_located_error(tmp_path):
    spec = tmp_path / "s.peft"
    spec.write_bytes(b"lora q\nlora \xe9v r=4\n")
    proc = peftc_cli("check", spec)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"{spec}:2:6: error: not UTF-8 text: invalid continuation byte (byte 0xe9")


def test_bom_at_the_start_of_a_spec_is_accepted(tmp_path):
    spec = tmp_path / "s.peft"
    spec.write_bytes("\ufefflora q r=4\n".encode())
    proc = peftc_cli("check", spec)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("lora q r=4 ")
    assert peftc.parse("\ufefflora q r=4") == peftc.parse("lora q r=4")


@pytest.mark.slow
def test_deeply_nested_regex_in_a_spec(tmp_path):
    spec = tmp_path / "s.peft"
    spec.write_text("lora /" + "(" * 5000 + "q" + ")" * 5000 + "/\n")
    proc = peftc_cli("check", spec)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"{spec}:1:6: error: invalid regex: nested too deeply")


def test_control_characters_never_reach_the_terminal_raw(tmp_path):
    spec = tmp_path / "s.peft"
    spec.write_text('lora q\x1b[31m r=2\nprompt tokens=2 init="\x1b]0;pwned\x07"\n# \x1b[2J\nlroa v\n')
    proc = peftc_cli("check", spec)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == f"{spec}:1:7: error: unexpected character '\\x1b'"
    assert lines[1:3] == ["    lora q\\x1b[31m r=2", "          ^^^^"]
    assert lines[3].startswith(f"{spec}:2:23: error: control character \\x1b (U+001B) in a string")
    assert lines[6].startswith(f"{spec}:4:1: error: unknown method 'lroa'")


@pytest.mark.slow
def test_error_output_is_bounded(tmp_path):
    spec = tmp_path / "s.peft"
    spec.write_text("lora q aplha=1\n" * 1000)
    proc = peftc_cli("check", spec)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert sum(": error: " in line for line in lines) == MAX_SHOWN
    assert lines[-1] == f"... and {1000 - MAX_SHOWN} more errors"


def test_a_5mb_source_line_is_cut_around_the_caret(tmp_path):
    spec = tmp_path / "s.peft"
    pad = " " * 5_000_000
    spec.write_text(f"lora q r=2 {pad}aplha=1 # {'x' * 1000}\nlora qq # {'y' * 5_000_000}\n")
    proc = peftc_cli("check", spec)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr) < 4 * (MAX_LINE + 200)
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"{spec}:1:{12 + len(pad)}: error: unknown option 'aplha' for lora")
    source, caret = lines[1], lines[2]
    assert source.startswith("    ...") and source.endswith("...") and len(source) <= MAX_LINE + 10
    assert caret.strip() == "^^^^^" and source[caret.index("^"):].startswith("aplha=1")
    assert lines[3].startswith(f"{spec}:2:6: error: unknown role 'qq'")
    assert lines[4] == "    lora qq # " + "y" * (MAX_LINE - len("lora qq # ")) + "..."
    assert lines[5] == "         ^^"


def test_spec_error_is_a_peftc_error(tmp_path, capsys):
    with pytest.raises(peftc.PeftcError) as caught:
        peftc.parse("lora q aplha=1", "s.peft")
    assert isinstance(caught.value, peftc.SpecError) and isinstance(caught.value, ValueError)
    spec = tmp_path / "s.peft"
    spec.write_text("lora q aplha=1\n")
    assert main(["check", str(spec)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{spec}:1:8: error: unknown option 'aplha' for lora; did you mean 'alpha'?",
        "    lora q aplha=1", "           ^^^^^"]


# ── sizes that cannot fit ───────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("text, parameters", [
    ("lora q r=1000000000", 4 * 10**9 * (64 + 64)),             # 4 q projections of 64 × 64
    ("prefix tokens=1000000000", 4 * 2 * 2 * 10**9 * 16),        # 4 attentions, 2 kv heads of 16
    ("adapter after=ffn bottleneck=1000000000", 4 * (2 * 64 * 10**9 + 10**9 + 64)),
    ("prompt tokens=1000000000", 10**9 * 64)])
def test_sizes_that_cannot_fit_are_refused_before_allocating(tiny, text, parameters):
    with pytest.raises(peftc.SpecError) as caught:
        peftc.compile(tiny("tiny-llama"), text + "\n", filename="s.peft")
    message = str(caught.value)
    assert message.startswith("s.peft:1:1: error: '")
    assert f"would allocate {parameters:,} parameters" in message and f"{4 * parameters:,} bytes" in message
    assert message.splitlines()[1] == "    " + text


@pytest.mark.slow
def test_compile_of_a_huge_rank_exits_1_and_writes_nothing(tmp_path):
    spec = tmp_path / "s.peft"
    spec.write_text("lora q r=1000000000\n")
    out = tmp_path / "run"
    proc = peftc_cli("compile", spec, "--model", "tiny-llama", "--out", out)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "alloc_cpu" not in proc.stderr
    assert f"{spec}:1:1: error: 'lora q r=1000000000" in proc.stderr
    assert "2,048,000,000,000 bytes" in proc.stderr
    assert not out.exists()


def test_out_of_memory_from_torch_is_one_line(monkeypatch, capsys, tmp_path):
    def allocate(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 10000000000000 bytes.\nException raised from "
                           "alloc_cpu at alloc_cpu.cpp:117 (most recent call first):\nframe #0: c10::...")
    monkeypatch.setattr("peftc.cli.language.cmd_check", allocate)
    line = main_fails(["check", tmp_path / "s.peft"], capsys, "out of memory", "can't allocate memory")
    assert "frame #0" not in line and "Exception raised from" not in line


def test_the_safety_net_does_not_hide_bugs(monkeypatch, tmp_path):
    def buggy(args):
        raise KeyError("a bug in peftc")
    monkeypatch.setattr("peftc.cli.language.cmd_check", buggy)
    with pytest.raises(KeyError):
        main(["check", str(tmp_path / "s.peft")])


# ── files peftc writes: read-only and full disks ─────────────────────────────────────────────────────

def _writable(directory: Path) -> bool:
    try:
        (directory / "probe").touch()
    except OSError:
        return False
    (directory / "probe").unlink()
    return True


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write in, root included: chmod 555, and as root the immutable attribute
    (chattr +i); where the file system has no such attribute, /sys (which no one can add entries to)."""
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    immutable = False
    if _writable(directory):                      # root ignores the mode
        immutable = subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0
    if _writable(directory):
        directory = Path("/sys")
    assert not _writable(directory)
    yield directory
    if immutable:
        subprocess.run(["chattr", "-i", str(tmp_path / "ro")], check=True)
    (tmp_path / "ro").chmod(0o755)


@pytest.mark.slow
def test_compile_into_a_read_only_directory(tmp_path, read_only_dir):
    spec = tmp_path / "s.peft"
    spec.write_text(LORA)
    out = read_only_dir / "peftc-run"
    before = sorted(p.name for p in read_only_dir.iterdir())
    line = fails(peftc_cli("compile", spec, "--model", "tiny-llama", "--out", out), str(out))
    assert "ermission denied" in line or "not permitted" in line or "ead-only file system" in line
    assert sorted(p.name for p in read_only_dir.iterdir()) == before


def test_full_disk_while_compiling_keeps_the_earlier_run(compiled_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(compiled_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    spec = tmp_path / "s.peft"
    spec.write_text("lora q r=2\n")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("peftc.fsutil.save_file", full)
    main_fails(["compile", spec, "--model", "tiny-llama", "--out", out], capsys, str(out),
               "No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_full_disk_without_a_file_name_names_the_output(monkeypatch, capsys, tmp_path):
    def full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("peftc.cli.export.cmd_export", full)
    onnx = tmp_path / "m.onnx"
    main_fails(["export", tmp_path, "--onnx", onnx], capsys, f"cannot write {onnx}: No space left on device")


# ── peftc.json ───────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.slow
def test_manifest_spec_outside_the_run_directory_is_refused(run_dir, tmp_path):
    manifest = run_dir / "peftc.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(data, spec="/etc/passwd")))
    onnx = tmp_path / "m.onnx"
    proc = peftc_cli("export", run_dir, "--onnx", onnx)
    fails(proc, f"{manifest}: 'spec' must name a file inside {run_dir}, got '/etc/passwd'")
    assert "root:" not in proc.stderr + proc.stdout and not onnx.exists()


@pytest.mark.parametrize("spec", ["../s.peft", "sub/../../s.peft", "link.peft"])
def test_manifest_spec_escaping_by_dots_or_a_link(run_dir, tmp_path, capsys, spec):
    (run_dir / "link.peft").symlink_to(tmp_path / "s.peft")
    (tmp_path / "s.peft").write_text(LORA)
    manifest = run_dir / "peftc.json"
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), spec=spec)))
    main_fails(["export", run_dir, "--onnx", tmp_path / "m.onnx"], capsys, f"{manifest}: 'spec' must name a "
               f"file inside {run_dir}")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("content, message", [
    (b'{"model": "tiny-llama", "spec": ', "peftc.json:1:33: not valid JSON: Expecting value"),
    (b'{"model": "tiny-llama"}', "peftc.json: 'spec' is missing"),
    (b'{"spec": "spec.peft"}', "peftc.json: 'model' is missing"),
    (b'{"model": 5, "spec": "spec.peft"}', "peftc.json: 'model' must be a non-empty string, got 5"),
    (b'{"model": "tiny-llama", "spec": ["spec.peft"]}', "peftc.json: 'spec' must be a non-empty string"),
    (b'["tiny-llama"]', "peftc.json: expected a JSON object, got list"),
    (b"[" * 100000, "peftc.json: not JSON peftc can read: nested too deeply"),
    (b'{"model": "tiny-\xff"}', "peftc.json: not UTF-8 text"),
    (b'{"model": "tiny-llama", "spec": "nope.peft"}', "'spec' names 'nope.peft', which is not a file in")])
def test_bad_manifest(run_dir, tmp_path, capsys, content, message):
    (run_dir / "peftc.json").write_bytes(content)
    line = main_fails(["export", run_dir, "--onnx", tmp_path / "m.onnx"], capsys, message)
    assert str(run_dir / "peftc.json") in line
    assert not (tmp_path / "m.onnx").exists()


def test_bad_manifest_from_the_command_line(run_dir, tmp_path):
    (run_dir / "peftc.json").write_text('{"model": "tiny-llama", "spec": ')
    fails(peftc_cli("explain", run_dir), f"{run_dir / 'peftc.json'}:1:33: not valid JSON")


# ── data files and model directories ──────────────────────────────────────────────────────────────────

@pytest.mark.slow
def test_lone_surrogate_in_training_data(tmp_path):
    spec = tmp_path / "s.peft"
    spec.write_text(LORA)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "a\\ud800b"}\n{"prompt": "p", "completion": "\\udfff"}\n'
                    + "[" * 100000 + "\n")
    out = tmp_path / "out"
    proc = peftc_cli("train", spec, "--data", data, "--out", out, "--model", "tiny-llama", "--steps", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{data}:2: field 'text' is not valid Unicode: lone surrogate \\ud800 at character 1" in proc.stderr
    assert f"{data}:3: field 'completion' is not valid Unicode: lone surrogate \\udfff" in proc.stderr
    assert f"{data}:4: not JSON peftc can read: nested too deeply" in proc.stderr
    assert not (out / "peftc_adapter.safetensors").exists()


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for ref in ("tiny-llama", "tiny-gpt2"):
        peftc.load_model(ref).save_pretrained(root / ref)
    return root


@pytest.mark.slow
def test_model_directory_missing_a_weight(saved_models, tmp_path):
    model = tmp_path / "llama"
    shutil.copytree(saved_models / "tiny-llama", model)
    weights = load_file(model / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"], weights["model.norm.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    spec = tmp_path / "s.peft"
    spec.write_text(LORA)
    out = tmp_path / "run"
    fails(peftc_cli("compile", spec, "--model", model, "--out", out),
          f"cannot load model '{model}': 2 weights missing in {model}'s safetensors: "
          "model.layers.0.mlp.up_proj.weight, model.norm.weight")
    assert not out.exists()


def test_tied_weights_are_not_missing(saved_models):
    """GPT-2 ties lm_head to the token embedding and stores it once: that loads."""
    assert "lm_head.weight" not in load_file(saved_models / "tiny-gpt2" / "model.safetensors")
    model = peftc.load_model(str(saved_models / "tiny-gpt2"))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


# ── export of a plain transformers model ──────────────────────────────────────────────────────────────

@pytest.mark.slow
def test_export_onnx_of_a_plain_transformers_model(tiny, tmp_path):
    model = tiny("tiny-llama")
    assert model.config.use_cache
    result = peftc.export_onnx(model, tmp_path / "plain.onnx")
    assert result.path.is_file() and result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert model.config.use_cache and not model.training      # the caller's model is left as it was

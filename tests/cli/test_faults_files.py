"""What peftc leaves on disk when things go wrong, or when it runs again: a non-empty run directory, a
changed option on --resume, a damaged or half-written checkpoint, a non-finite step, an export that fails
its check, a compile over an earlier one or one that fails half-way; file permissions and byte-identical
output."""
import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftc
import peftc.fsutil
import peftc.export.onnx
from peftc.cli import main
from peftc.cli.export import RELATIVE_TOLERANCE
from peftc.errors import ExportError
from peftc.training.train import TrainConfig, checkpoints, staging_dir, train
from conftest import pairs, randomize_adapters, train_config, write_jsonl

SPEC = "lora q, v r=4 alpha=8\n"
HEAD = "lora head r=8 alpha=16\n"          # a huge lr overflows the logits through the head's LoRA
NO_HF_FORMAT = "adapter after=ffn bottleneck=8\n"   # HF PEFT has no file format for this adapter

pytestmark = pytest.mark.usefixtures("one_thread")


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory``, by relative path (the hidden ones too)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def hidden(directory: Path) -> list[str]:
    """Temporary names (leading '.') anywhere under ``directory``."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob(".*"))


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "lora.peft").write_text(SPEC)
    (tmp_path / "head.peft").write_text(HEAD)
    write_jsonl(tmp_path / "data.jsonl", pairs())
    return tmp_path


def config(workdir: Path, out: str = "out", **kw) -> TrainConfig:
    return train_config(workdir, out, **{"steps": 2, **kw})


def train_args(workdir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(workdir / "lora.peft"), "--model", "tiny-llama", "--data", str(workdir / "data.jsonl"),
            "--out", str(out), "--steps", "2", "--batch-size", "4", "--lr", "0.01", "--max-length", "32",
            "--save-every", "1", "--no-progress", "--threads", "1", *extra]


def stop_at(stop: int):
    def hook(step):
        if step == stop:
            raise KeyboardInterrupt
    return hook


# --- peftc train: one run per directory ---------------------------------------------------------------------
@pytest.mark.slow
def test_train_refuses_a_non_empty_out_and_leaves_it_as_it_was(workdir, capsys):
    out = workdir / "out"
    assert main(train_args(workdir, out)) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(train_args(workdir, out, "--lr", "0.02")) == 1
    assert capsys.readouterr().err == (f"peftc: error: --out {out} is not empty: it holds a run (checkpoints up "
                                       "to step-0000002); give --resume to continue it, --overwrite to replace "
                                       "it, or another --out\n")
    assert snapshot(out) == before
    # a directory of someone else's files: refused, and --overwrite does not delete it either
    other = workdir / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(train_args(workdir, other)) == 1
    assert f"peftc: error: --out {other} is not empty: it holds notes.txt; give --resume" in capsys.readouterr().err
    assert main(train_args(workdir, other, "--overwrite")) == 1
    assert capsys.readouterr().err == (f"peftc: error: --out {other} holds files that are not a peftc run "
                                       "(notes.txt); --overwrite replaces only a peftc directory: choose "
                                       "another --out\n")
    assert main(train_args(workdir, other, "--resume")) == 1
    assert f"peftc: error: --resume: {other} has no checkpoint to continue from but holds other files " \
           "(notes.txt)" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me" and [p.name for p in other.iterdir()] == ["notes.txt"]
    # what a run writes honours the umask (tempfile alone would make every file 0600, every directory 0700)
    mask = _umask()
    for path in out.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~mask, path


@pytest.mark.slow
def test_overwrite_keeps_the_old_run_whole_until_the_new_one_is_done(workdir, capsys):
    out = workdir / "out"
    train(config(workdir, steps=2, save_every=1))                    # the old run: step-1, step-2
    before = snapshot(out)
    new = dict(steps=4, save_every=1, lr=5e-3, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        train(config(workdir, **new), on_step=stop_at(3))
    err = capsys.readouterr().err
    staged = staging_dir(out)
    assert (f"the last complete checkpoint is {staged}/checkpoints/step-0000003: continue with --resume "
            f"--overwrite ({out} is as it was)") in err
    assert snapshot(out) == before                                   # not a byte of the old run changed
    assert [p.name for p in checkpoints(staged)] == ["step-0000002", "step-0000003"]
    train(config(workdir, resume=True, **new))
    assert not staged.exists() and hidden(workdir) == []
    # only the new run is there: its checkpoints, its options, its adapter (the bytes of a run never stopped)
    assert [p.name for p in checkpoints(out)] == ["step-0000003", "step-0000004"]
    assert json.loads((out / "train.json").read_text())["config"]["lr"] == 5e-3
    straight = train(config(workdir, out="straight", steps=4, save_every=1, lr=5e-3))
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (straight.out / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_resume_refuses_any_changed_option_by_name_and_a_finished_run_is_kept(workdir, capsys):
    out = workdir / "out"
    assert main(train_args(workdir, out)) == 0
    kept = {k: v for k, v in snapshot(out).items() if k.endswith(".safetensors") or k.endswith(".json")
            and k.startswith("checkpoints")}
    capsys.readouterr()
    last = out / "checkpoints" / "step-0000002"
    for option, value, change in [("--lr", "0.02", "--lr was 0.01, now 0.02"),
                                  ("--schedule", "linear", "--schedule was 'cosine', now 'linear'"),
                                  ("--warmup", "1", "--warmup was 0, now 1"),
                                  ("--weight-decay", "0.1", "--weight-decay was 0.0, now 0.1"),
                                  ("--max-grad-norm", "0.5", "--max-grad-norm was 1.0, now 0.5"),
                                  ("--seed", "3", "--seed was 0, now 3"),
                                  ("--steps", "3", "--steps was 2, now 3")]:
        assert main(train_args(workdir, out, "--resume", option, value)) == 1, option
        assert capsys.readouterr().err.splitlines()[-1] == f"peftc: error: cannot resume from {last}: {change}"
        assert {k: v for k, v in snapshot(out).items() if k in kept} == kept
    assert main(train_args(workdir, out, "--resume")) == 0
    assert "nothing to do: 2 steps already done" in capsys.readouterr().out
    assert {k: v for k, v in snapshot(out).items() if k in kept} == kept


@pytest.mark.slow
def test_only_this_runs_checkpoints_are_pruned(workdir, capsys):
    other = train(config(workdir, out="other", steps=1, seed=1))               # another run's step-1
    out = workdir / "out"
    run = dict(steps=4, save_every=2, keep=1)
    with pytest.raises(KeyboardInterrupt):
        train(config(workdir, **run), on_step=stop_at(3))
    assert "the last complete checkpoint is " + str(out / "checkpoints" / "step-0000002") in capsys.readouterr().err
    foreign = out / "checkpoints" / "step-0000001"
    import shutil
    shutil.copytree(other.out / "checkpoints" / "step-0000001", foreign)
    before = snapshot(foreign)
    train(config(workdir, resume=True, **run))
    assert [p.name for p in checkpoints(out)] == ["step-0000001", "step-0000004"]     # keep=1 of this run's
    assert snapshot(foreign) == before


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "missing", "bad json"])
def test_a_damaged_newest_checkpoint_falls_back_and_a_killed_runs_temporaries_go(workdir, capsys, damage):
    out = workdir / "out"
    run = dict(steps=4, save_every=2, lr=5e-3)
    with pytest.raises(KeyboardInterrupt):
        train(config(workdir, **run), on_step=stop_at(4))
    newest = out / "checkpoints" / "step-0000004"
    if damage == "truncated":
        data = (newest / "optimizer.safetensors").read_bytes()
        (newest / "optimizer.safetensors").write_bytes(data[:len(data) // 2])
    elif damage == "missing":
        (newest / "adapter.safetensors").unlink()
    else:
        (newest / "trainer_state.json").write_text('{"step": 4, "identity": ')
    # what a kill -9 in the middle of writing leaves: a temporary checkpoint directory and a temporary file
    (out / "checkpoints" / ".step-0000006.k1ll3d").mkdir()
    (out / "checkpoints" / ".step-0000006.k1ll3d" / "adapter.safetensors").write_bytes(b"half")
    (out / ".train.log.x9y8z7.tmp").write_text("half")
    capsys.readouterr()
    resumed = train(config(workdir, resume=True, **run))
    err = capsys.readouterr().err
    reason = {"truncated": "its optimizer.safetensors cannot be read", "missing": "it has no adapter.safetensors",
              "bad json": "its trainer_state.json cannot be read"}[damage]
    assert f"checkpoint {newest} is damaged ({reason}" in err
    assert "); falling back to the one before it\n" in err
    assert f"resumed from {out / 'checkpoints' / 'step-0000002'} (step 2 of 4)" in err
    assert resumed.steps == 4 and hidden(out) == []
    assert [p.name for p in checkpoints(out)] == ["step-0000002", "step-0000004"]
    straight = train(config(workdir, out="straight", **run))
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (straight.out / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("lr, what", [
    ("1e20", "the update made weights that are not finite (nan or inf)"),
    ("3e37", "the loss is nan, not a finite number"),
])
def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(workdir, capsys, lr, what):
    out = workdir / "out"
    args = train_args(workdir, out, "--steps", "4", "--lr", lr, "--schedule", "constant", "--max-grad-norm", "0")
    args[1] = str(workdir / "head.peft")
    assert main(args) == 1
    first = out / "checkpoints" / "step-0000001"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"peftc: error: step 2: {what}; training stopped and nothing of this step was saved (the last good "
        f"checkpoint is {first}); a smaller --lr may help")
    assert [p.name for p in checkpoints(out)] == ["step-0000001"]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "peftc_adapter.safetensors").exists()
    saved = peftc.fsutil.load_tensors(first / "adapter.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    assert f"# stopped: step 2: {what}" in (out / "train.log").read_text()


# --- peftc compile: the output directory as a unit -------------------------------------------------------------
def compile_args(spec: Path, out: Path) -> list[str]:
    return ["compile", str(spec), "--model", "tiny-llama", "--out", str(out)]


@pytest.mark.slow
def test_compile_over_an_earlier_compile_leaves_none_of_its_files(tmp_path, tiny):
    (tmp_path / "lora.peft").write_text(SPEC)
    (tmp_path / "adapter.peft").write_text(NO_HF_FORMAT)
    out = tmp_path / "run"
    assert main(compile_args(tmp_path / "lora.peft", out)) == 0
    assert (out / "adapter_config.json").is_file()                    # HF PEFT's files, for the LoRA
    assert main(compile_args(tmp_path / "adapter.peft", out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["graph.txt", "peftc.json", "peftc_adapter.safetensors",
                                                     "report.txt", "spec.peft"]
    assert (out / "spec.peft").read_text().startswith("adapter after=ffn bottleneck=8")
    assert hidden(tmp_path) == []
    peftc.compile(tiny("tiny-llama"), NO_HF_FORMAT).load_adapter(out)


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["graph.txt", "peftc_adapter.safetensors"])
def test_a_compile_that_fails_half_way_leaves_the_earlier_directory_whole(tmp_path, monkeypatch, capsys, failing):
    (tmp_path / "lora.peft").write_text(SPEC)
    (tmp_path / "adapter.peft").write_text(NO_HF_FORMAT)
    out = tmp_path / "run"
    assert main(compile_args(tmp_path / "lora.peft", out)) == 0
    before = snapshot(out)
    real = peftc.fsutil.atomic_path

    def disk_full(path):
        if Path(path).name == failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path)
    monkeypatch.setattr(peftc.fsutil, "atomic_path", disk_full)
    capsys.readouterr()
    assert main(compile_args(tmp_path / "adapter.peft", out)) == 1
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"peftc: error: cannot write {out}: No space left on device; {out} was left as it was"
    assert snapshot(out) == before and hidden(tmp_path) == []
    monkeypatch.undo()
    assert main(compile_args(tmp_path / "adapter.peft", tmp_path / "new")) == 0


def test_compile_refuses_to_replace_other_files_or_a_training_run(tmp_path, capsys):
    (tmp_path / "lora.peft").write_text(SPEC)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(compile_args(tmp_path / "lora.peft", mine)) == 1
    assert capsys.readouterr().err == (f"peftc: error: --out {mine} is not empty and is not a 'peftc compile' "
                                       "directory (no peftc.json; it holds notes.txt): choose another --out\n")
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000002").mkdir(parents=True)
    (run / "peftc.json").write_text("{}")
    assert main(compile_args(tmp_path / "lora.peft", run)) == 1
    assert capsys.readouterr().err == (f"peftc: error: --out {run} holds a training run; compile would "
                                       "replace it: choose another --out\n")
    assert (mine / "notes.txt").read_text() == "keep me" and (run / "checkpoints" / "step-0000002").is_dir()


# --- peftc export: only a verified file takes the final name ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("target", [[], ["--dtype", "fp16"]], ids=["fp32", "fp16"])
def test_an_export_that_fails_its_check_leaves_the_previous_file(tmp_path, monkeypatch, capsys, target):
    (tmp_path / "lora.peft").write_text(SPEC)
    out, onnx_path = tmp_path / "run", tmp_path / "out" / "m.onnx"
    assert main(compile_args(tmp_path / "lora.peft", out)) == 0
    assert main(["export", str(out), "--onnx", str(onnx_path), *target]) == 0
    assert stat.S_IMODE(onnx_path.stat().st_mode) == 0o666 & ~_umask()
    good = onnx_path.read_bytes()
    real_verify = peftc.export.onnx.verify_onnx

    seen = {}

    def off_by_half(module, path):
        diff, provider, absmax = real_verify(module, path)           # the temporary file loads in ORT
        seen["absmax"] = absmax
        assert Path(path) != onnx_path and onnx_path.read_bytes() == good
        return 0.5, provider, absmax
    monkeypatch.setattr(peftc.export.onnx, "verify_onnx", off_by_half)
    capsys.readouterr()
    assert main(["export", str(out), "--onnx", str(onnx_path), *target]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"peftc: error: {onnx_path}: the ONNX Runtime check failed: ONNX Runtime vs torch max abs diff 0.5, "
        f"over the tolerance {RELATIVE_TOLERANCE * seen['absmax']:.3g}; the previous {onnx_path} was left as it was")
    assert onnx_path.read_bytes() == good and os.listdir(onnx_path.parent) == ["m.onnx"]

    def cannot_load(module, path):
        raise ExportError(f"{path}: ONNX Runtime cannot load it")
    monkeypatch.setattr(peftc.export.onnx, "verify_onnx", cannot_load)
    fresh = tmp_path / "out" / "fresh.onnx"
    assert main(["export", str(out), "--onnx", str(fresh), *target]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"peftc: error: {fresh}: the ONNX Runtime check failed ({fresh}: ONNX Runtime cannot load it); "
        f"nothing was written to {fresh}")
    assert os.listdir(onnx_path.parent) == ["m.onnx"]


@pytest.mark.slow
def test_external_data_takes_its_final_name_only_when_verified(tmp_path, monkeypatch, tiny):
    import onnxruntime as ort
    model = peftc.compile(tiny("tiny-llama"), SPEC)
    randomize_adapters(model, seed=1)
    target = tmp_path / "ext.onnx"
    first = peftc.export_onnx(model.merge(), target, external_data=True)
    assert first.max_abs_diff <= 1e-4
    good = snapshot(tmp_path)
    assert sorted(good) == ["ext.onnx", "ext.onnx.data"]
    randomize_adapters(model, seed=2)
    merged = model.merge()
    with pytest.raises(ExportError, match=f"the previous {target} was left as it was"):
        peftc.export_onnx(merged, target, external_data=True, check=lambda result: "refused by the test")
    assert snapshot(tmp_path) == good
    second = peftc.export_onnx(merged, target, external_data=True)      # a passing export replaces both
    now = snapshot(tmp_path)
    assert sorted(now) == ["ext.onnx", "ext.onnx.data"] and now["ext.onnx.data"] != good["ext.onnx.data"]
    ids, mask = peftc.export.onnx._verify_inputs(merged)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        expected = merged(ids, mask).numpy()
    real = mask.numpy().astype(bool)
    assert abs(got - expected)[real].max() <= 1e-4 and second.max_abs_diff <= 1e-4


# --- the same inputs, the same bytes ----------------------------------------------------------------------------
@pytest.mark.slow
def test_compile_in_two_processes_gives_the_same_bytes_and_umask_permissions(tmp_path):
    """Two `peftc compile` runs with different hash seeds write identical files (safetensors metadata used
    to come out in a per-process hash order), each with the permissions the umask gives."""
    (tmp_path / "s.peft").write_text(SPEC)
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"run{seed}"
        env = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-m", "peftc.cli", *compile_args(tmp_path / "s.peft", out)],
                              capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
                              preexec_fn=lambda: os.umask(0o027))
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append(out)
    first, second = (snapshot(o) for o in outs)
    assert sorted(first) == ["adapter_config.json", "adapter_model.safetensors", "graph.txt", "peftc.json",
                             "peftc_adapter.safetensors", "report.txt", "spec.peft"]
    assert first == second, [name for name in first if first[name] != second.get(name)]
    assert stat.S_IMODE(outs[0].stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in outs[0].iterdir()} == {0o640}


def test_save_tensors_writes_the_same_bytes_whatever_order_the_writer_picks(tmp_path):
    """safetensors' writer orders the header's metadata by a hash map seeded afresh for each call."""
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    metadata = {"format": "pt", "spec": "lora q, v r=4 alpha=8\n# é", "z": "1", "c": "2"}
    written = set()
    for i in range(12):
        path = peftc.fsutil.save_tensors(tmp_path / f"{i}.safetensors", dict(reversed(tensors.items())) if i % 2
                                         else tensors, metadata=dict(reversed(metadata.items())) if i % 3 else metadata)
        written.add(path.read_bytes())
    assert len(written) == 1
    from safetensors import safe_open
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == metadata
    loaded = peftc.fsutil.load_tensors(tmp_path / "0.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items()) and loaded.keys() == tensors.keys()
    assert stat.S_IMODE((tmp_path / "0.safetensors").stat().st_mode) == 0o666 & ~_umask()

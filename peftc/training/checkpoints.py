"""Checkpoints of ``peftc train``: ``OUT/checkpoints/step-NNNNNNN/`` with the trainable weights, the AdamW
state, every rank's RNG state and the trainer state (step, history, log, and the run's *identity*: the
options a resumed run must share, :data:`~peftc.training.config.RESUME_KEYS`).

A checkpoint is built under a temporary name and renamed into place, so an interrupted write never leaves
a half one; on resume a damaged newest one is skipped, saying so, for the one before it; pruning keeps the
newest ``--keep`` of *this* run only. Only rank 0 writes."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from peftc.fsutil import atomic_dir, load_tensors, save_tensors, write_json
from peftc.training.config import CHECKPOINTS, KEY_NAMES, RESUME_KEYS, TrainConfig, TrainError
from peftc.training.distributed import Dist, rng_states, say

CHECKPOINT_FILES = ("trainer_state.json", "adapter.safetensors", "optimizer.safetensors", "rng.safetensors")


def checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints in ``out``, oldest first (temporary directories start with '.')."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def step_dirs(out: Path) -> list[Path]:
    """Every ``step-N`` directory in ``out/checkpoints``, complete or not, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes; of a folder (of images), of each file's relative path and bytes, in
    sorted order, hidden names left out."""
    digest = hashlib.sha256()
    path = Path(path)
    files = [path] if not path.is_dir() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path).as_posix()).encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def run_identity(config: TrainConfig, spec_text: str, world: int, total: int) -> dict:
    """What a checkpoint records of the run, and a resumed run must match (:data:`RESUME_KEYS`)."""
    return {"model": config.model, "dtype": config.dtype, "autocast_adapter_dtype": config.autocast_adapter_dtype,
            "spec_text": spec_text, "data_sha256": file_sha256(config.data),
            "seed": config.seed, "batch_size": config.batch_size, "grad_accum": config.grad_accum,
            "world_size": world, "max_length": config.max_length, "eval_split": config.eval_split,
            "chat": config.chat, "steps": total, "lr": config.lr, "schedule": config.schedule,
            "warmup": config.warmup, "weight_decay": config.weight_decay,
            "max_grad_norm": config.max_grad_norm}


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, list]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{names[index]}.{key}"] = torch.as_tensor(value)
    return tensors, state["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict, groups: list) -> None:
    state = {}
    for index, name in enumerate(names):
        prefix = name + "."
        values = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)
                  and "." not in k[len(prefix):]}
        if values:
            state[index] = values
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out: Path, step: int, identity: dict, params: dict, names: list[str], optimizer,
                    history: list, log_lines: list, keep: int, dist_info: Dist) -> Path:
    """Write the checkpoint of ``step`` (rank 0; every rank takes part) and prune old ones; its path."""
    target = out / CHECKPOINTS / f"step-{step:07d}"
    rng = rng_states(dist_info)           # every rank takes part in the gather
    if not dist_info.main:
        return target
    opt_tensors, groups = optimizer_tensors(optimizer, names)
    with atomic_dir(target) as tmp:
        save_tensors(tmp / "adapter.safetensors", {n: p.detach() for n, p in params.items()})
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        save_tensors(tmp / "rng.safetensors", {f"rank{r}": s for r, s in enumerate(rng)})
        write_json(tmp / "trainer_state.json", {"step": step, "identity": identity, "param_groups": groups,
                                                "history": history, "log": log_lines})
    prune(out, identity, keep)
    return target


def identity_of(path: Path) -> dict | None:
    try:
        return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune(out: Path, identity: dict, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of this run (those written with ``identity``);
    a checkpoint of any other run, or one that cannot be read, is never deleted here."""
    mine = [p for p in step_dirs(out) if identity_of(p) == identity]
    for old in mine[:-keep]:
        shutil.rmtree(old)


class Damaged(Exception):
    """A checkpoint whose files are missing or cannot be read (the message says which)."""


def read_checkpoint(path: Path) -> tuple[dict, dict, dict, dict]:
    """(trainer state, adapter, optimizer and RNG tensors) of a checkpoint, or :class:`Damaged`."""
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            raise Damaged(f"it has no {name}")
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        step, _, _, _ = int(state["step"]), state["identity"], state["param_groups"], list(state["history"])
    except (ValueError, KeyError, TypeError) as exc:
        raise Damaged(f"its trainer_state.json cannot be read ({type(exc).__name__}: {exc})") from None
    if f"step-{step:07d}" != path.name:
        raise Damaged(f"its trainer_state.json is for step {step}")
    tensors = []
    for name in CHECKPOINT_FILES[1:]:
        try:
            tensors.append(load_tensors(path / name))
        except Exception as exc:      # safetensors raises its own error type for a truncated file
            raise Damaged(f"its {name} cannot be read ({exc})") from None
    return (state, *tensors)


def check_identity(path: Path, saved: dict, identity: dict) -> None:
    for key in RESUME_KEYS:
        if key not in saved:          # a checkpoint of an older peftc that did not record it
            continue
        if saved[key] != identity[key]:
            what = KEY_NAMES.get(key, "--" + key.replace("_", "-"))
            raise TrainError(f"cannot resume from {path}: {what} was {saved[key]!r}, now {identity[key]!r}")


def find_checkpoint(out: Path, identity: dict, dist_info: Dist) -> tuple | None:
    """The newest readable checkpoint in ``out``, read: (path, state, weights, optimizer tensors, RNG
    tensors), or None when there is none. A damaged one is skipped, saying so; one written with other
    options (:data:`RESUME_KEYS`) is a :class:`TrainError` naming the first that differs."""
    for path in reversed(step_dirs(out)):
        try:
            state, weights, opt_tensors, rng = read_checkpoint(path)
        except Damaged as exc:
            say(dist_info, f"checkpoint {path} is damaged ({exc}); falling back to the one before it")
            continue
        check_identity(path, state["identity"], identity)
        return path, state, weights, opt_tensors, rng
    return None


def resume(found: tuple, params: dict, names: list[str], optimizer, dist_info: Dist):
    """Load a checkpoint :func:`find_checkpoint` read into the parameters, optimizer and RNG: (step,
    history, log lines)."""
    path, state, weights, opt_tensors, rng = found
    missing = [n for n in names if n not in weights]
    if missing:
        raise TrainError(f"cannot resume from {path}: it has no tensor {missing[0]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name].to(param.device))
    load_optimizer(optimizer, names, opt_tensors, state["param_groups"])
    key = f"rank{dist_info.rank}"
    if key in rng:
        torch.set_rng_state(rng[key])
    return int(state["step"]), list(state["history"]), list(state.get("log", []))

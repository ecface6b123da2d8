"""``peftc train``: compile a model with a spec and train the inserted parameters on a JSONL file.

One function, :func:`train`, serves the command line, the tests and ``torchrun``. What it guarantees:

* **Exact loss.** The loss of a step is the mean over every completion token of the step's global batch
  (all micro-batches of gradient accumulation, all DDP ranks), so ``--batch-size 8``, ``--batch-size 4
  --grad-accum 2`` and two DDP ranks of ``--batch-size 4`` compute the same gradient.
* **Determinism.** Same spec, data, seed and options ⇒ the same adapter bytes: weights are initialised
  from ``--seed``, the order of examples is a function of (seed, step) (:func:`peftc.training.data.step_indices`),
  dropout draws from a generator seeded per rank, and a checkpoint holds the optimizer and RNG state, so a
  run resumed from one ends with the bytes of a run never stopped.
* **Safe checkpoints.** ``OUT/checkpoints/step-NNNNNNN/`` is built under a temporary name and renamed into
  place (:func:`peftc.fsutil.atomic_dir`): Ctrl-C at any moment leaves the last complete one intact, and
  ``--resume`` continues from it; a damaged newest checkpoint (a truncated or missing file, bad JSON) is
  skipped, saying so, for the one before it, and the temporary directories a kill leaves are removed by
  the next run. Only this run's checkpoints are pruned (``--keep``). Only rank 0 writes.
* **One run per directory.** A non-empty ``--out`` is refused unless ``--resume`` (continue the run there,
  with every option that shapes the result unchanged: :data:`RESUME_KEYS`) or ``--overwrite`` is given.
  ``--overwrite`` never touches the old run until the new one is complete: the new run is trained in a
  staging directory beside ``OUT`` (``.OUT.overwrite``, where ``--overwrite --resume`` continues an
  interrupted one), and only when it has finished is that directory swapped in for ``OUT`` as a unit
  (:func:`peftc.fsutil.replace_dir`: the old run renamed aside, the new one renamed in, then the old one
  deleted). An interrupted or failed ``--overwrite`` run leaves ``OUT`` exactly as it was. It replaces
  only an empty directory or a peftc one (with ``peftc.json``, ``checkpoints/`` or ``train.log``).
* **Finite or nothing.** A step whose loss, or whose updated weights, are not finite stops the run with a
  :class:`TrainError` naming the step; those weights are written neither as a checkpoint nor as the adapter.
* **Distributed.** Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DDP (gloo on CPU,
  NCCL on GPUs) with every frozen tensor on DDP's ignore list: only the trainable parameters are
  broadcast at start and all-reduced after each backward.
* **Head on labelled positions only.** When no pass rewrote the output head, the model runs up to the
  head's input (:func:`peftc.training.headloss.head_split`) and the head and the loss are computed on the labelled
  positions only, in chunks (:func:`peftc.training.headloss.head_loss_sum`); otherwise on full logits.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from peftc.training.data import IGNORE, Example, collate, load_codec, read_jsonl, split_eval, step_indices, \
    steps_for_epochs, tokenize
from peftc.errors import PeftcError
from peftc.fsutil import atomic_dir, atomic_path, load_tensors, replace_dir, save_tensors, write_json, write_text
from peftc.training.headloss import head_split
from peftc.models import DEFAULT_MODEL

CHECKPOINTS = "checkpoints"
MANIFEST = "peftc.json"          # what `peftc export` and `peftc eval` read (the same as `peftc compile` writes)
SPEC_FILE = "spec.peft"
SCHEDULES = ("constant", "linear", "cosine")
#: options a resumed run must share with the run that wrote the checkpoint
RESUME_KEYS = ("model", "spec_text", "data_sha256", "seed", "batch_size", "grad_accum", "world_size",
               "max_length", "eval_split", "chat", "steps", "lr", "schedule", "warmup", "weight_decay",
               "max_grad_norm")
#: how a resume error names an identity key that is not a command-line option
KEY_NAMES = {"spec_text": "the spec", "data_sha256": "the data file's sha256",
             "world_size": "the number of processes"}
#: what marks a directory as peftc's own (a run or a compile output), which --overwrite may replace
RUN_MARKERS = (MANIFEST, CHECKPOINTS, "train.log")


class TrainError(PeftcError, ValueError):
    """Options that do not fit together, or a checkpoint that does not fit the run."""


@dataclass
class TrainConfig:
    spec: str
    data: str
    out: str
    model: str = DEFAULT_MODEL
    steps: int | None = None          #: optimizer steps; default: one epoch (or ``epochs``)
    epochs: float | None = None
    batch_size: int = 8               #: examples per micro-batch on each process
    grad_accum: int = 1               #: micro-batches per optimizer step
    lr: float = 1e-3
    schedule: str = "cosine"          #: constant | linear | cosine (both decay to 0 at the last step)
    warmup: int = 0                   #: steps of linear warm-up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0        #: 0 turns clipping off
    max_length: int = 512
    seed: int = 0
    eval_split: float = 0.0           #: fraction (< 1) or count (>= 1) of records held out for eval loss
    eval_every: int = 0               #: steps between eval-loss measurements (0: only at the end)
    save_every: int = 0               #: steps between checkpoints (0: only at the end)
    keep: int = 2                     #: checkpoints kept
    log_every: int = 10               #: steps between lines of train.log
    resume: bool = False
    #: replace a run (or compile output) already in ``out``; the old one stays whole until the new one has
    #: finished (it is trained beside ``out`` and swapped in as a unit; see the module docstring)
    overwrite: bool = False
    chat: bool = False                #: wrap prompts in the tokenizer's chat template
    torch_compile: bool = False
    device: str | None = None         #: default: cuda:LOCAL_RANK when CUDA is there, else cpu
    threads: int | None = None        #: torch CPU threads (default: torch's choice)
    progress: bool = True             #: the progress bar (rank 0, on stderr)

    def check(self) -> None:
        for name in ("batch_size", "grad_accum", "max_length", "keep", "log_every"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise TrainError(f"--threads must be >= 1, got {self.threads}")
        for name in ("eval_every", "save_every", "warmup"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.steps is not None and self.epochs is not None:
            raise TrainError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise TrainError(f"--steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise TrainError(f"--epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise TrainError(f"--lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"--schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'")
        if self.eval_split < 0:
            raise TrainError(f"--eval-split must be >= 0, got {self.eval_split}")


@dataclass
class TrainResult:
    model: nn.Module                  #: the trained CompiledModel (on every rank)
    out: Path
    steps: int
    seconds: float                    #: wall time of the optimizer steps run by this call
    tokens: int                       #: non-pad tokens processed by this call, all ranks
    loss: float | None                #: training loss of the last step
    eval_loss: float | None
    history: list[dict] = field(default_factory=list)
    main: bool = True                 #: rank 0 (the process that wrote the files)
    synchronised: list[str] = field(default_factory=list)   #: parameters DDP kept in sync (none without DDP)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# --- pieces ------------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, base: float, schedule: str = "cosine", warmup: int = 0) -> float:
    """The learning rate of (0-based) ``step`` of ``total``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * (1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labels that are not IGNORE."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


class CausalLMWithLoss(nn.Module):
    """A thin wrapper that gives a CompiledModel the calling convention of the ``transformers`` Trainer:
    ``forward(input_ids, attention_mask=None, labels=None)`` returns ``{"loss"}`` with labels and
    ``{"logits"}`` without, the loss being the mean next-token cross-entropy over labels that are not -100
    (labels are *not* pre-shifted, as in transformers). With labels, the head runs on the labelled positions
    only (:mod:`peftc.training.headloss`), so there are no logits to return; a spec that rewrites the head gets the
    loss from full logits and returns both, as before. The wrapped model is ``.model``; save the adapter with
    ``.model.save_hf_peft(dir)``. ``accepts_loss_kwargs`` makes the Trainer pass ``num_items_in_batch``, so
    with gradient accumulation the loss is the mean over the whole accumulated batch, as in ``peftc train``."""
    accepts_loss_kwargs = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # outside the module tree: the split holds self.model, whose parameters are registered already
        object.__setattr__(self, "split", head_split(model))

    def forward(self, input_ids, attention_mask=None, labels=None, num_items_in_batch=None):
        if labels is None:
            return {"logits": self.model(input_ids, attention_mask)}
        if self.split is not None:
            total, out = self.split.loss_sum(self.split(input_ids, attention_mask), labels), {}
        else:
            logits = self.model(input_ids, attention_mask)
            total, out = token_loss_sum(logits, labels), {"logits": logits}
        count = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE).sum()
        out["loss"] = total / torch.as_tensor(count, device=total.device).clamp(min=1)
        return out


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    owned: bool = False               #: this call created the process group and destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the process group a launcher (torchrun) describes in the environment; a no-op without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), False)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    return Dist(rank, world, local, backend, True)


def trainable_parameters(model) -> dict[str, nn.Parameter]:
    """Every parameter that requires grad, named as ``adapter_parameters()`` names them where it can."""
    named = {name: p for name, p in model.adapter_parameters().items() if p.requires_grad}
    seen = {id(p) for p in named.values()}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            named[name] = p
            seen.add(id(p))
    return named


def wrap_ddp(model: nn.Module, dist_info: Dist, device: torch.device) -> nn.Module:
    """DDP over ``model`` that ignores every frozen parameter and every buffer: only trainable parameters
    are broadcast at construction and all-reduced in the backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, broadcast_buffers=False)


def synchronised_parameters(ddp: nn.Module, model: nn.Module) -> list[str]:
    """Names in ``model`` of the parameters a DDP wrapper (of ``model`` or of its head split) keeps in
    sync (for tests and the log)."""
    keep = {id(p) for p in ddp._module_parameters}
    return [n for n, p in model.named_parameters() if id(p) in keep]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- checkpoints ---------------------------------------------------------------------------------------------
def checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints in ``out``, oldest first (temporary directories start with '.')."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def _step_dirs(out: Path) -> list[Path]:
    """Every ``step-N`` directory in ``out/checkpoints``, complete or not, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def staging_dir(out: str | Path) -> Path:
    """Where an ``--overwrite`` run of ``out`` trains until it is complete: ``.NAME.overwrite`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.overwrite"


def _is_temporary(path: Path) -> bool:
    """What fsutil's atomic writers leave when killed: ``.NAME.XXXX.tmp`` files, ``.step-N.XXXX`` dirs."""
    return path.name.startswith(".") and (path.name.endswith(".tmp") or path.name.startswith(".step-"))


def _contents(out: Path) -> list[str]:
    """The entries of ``out`` that are not temporaries (none when it does not exist)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if not _is_temporary(p))


def _prepare_out(config: TrainConfig, dist_info: Dist) -> tuple[Path, Path]:
    """(the directory the run is written in, the directory it ends up in): ``out`` itself, or under
    ``--overwrite`` its staging directory. Refuses a non-empty ``out`` without ``--resume``/``--overwrite``."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a directory")
    contents = _contents(out)
    if config.overwrite:
        if out.is_symlink():
            raise TrainError(f"--out {out} is a symbolic link; --overwrite replaces only a directory")
        if contents and not any(marker in contents for marker in RUN_MARKERS):
            raise TrainError(f"--out {out} holds files that are not a peftc run ({', '.join(contents[:3])}"
                             f"{', ...' if len(contents) > 3 else ''}); --overwrite replaces only a peftc "
                             "directory: choose another --out")
        work = staging_dir(out)
        if dist_info.main and work.exists() and not config.resume:
            shutil.rmtree(work)             # an unfinished earlier --overwrite run; this one starts afresh
        return work, out
    if contents and not config.resume:
        done = _step_dirs(out)
        what = f"a run (checkpoints up to {done[-1].name})" if done else ", ".join(contents[:3]) + \
            (", ..." if len(contents) > 3 else "")
        raise TrainError(f"--out {out} is not empty: it holds {what}; give --resume to continue it, "
                         "--overwrite to replace it, or another --out")
    if config.resume and not _step_dirs(out):
        foreign = [name for name in contents if name not in ("train.log", CHECKPOINTS)]
        if foreign:
            raise TrainError(f"--resume: {out} has no checkpoint to continue from but holds other files "
                             f"({', '.join(foreign[:3])}); give --overwrite to replace it, or another --out")
    return out, out


def _clean_temporaries(work: Path, dist_info: Dist) -> None:
    """Remove what a killed run left under temporary names (rank 0)."""
    if not dist_info.main:
        return
    for folder in (work, work / CHECKPOINTS):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _is_temporary(path):
                _say(dist_info, f"removing {path}, left by an interrupted run")
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


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


# --- the loop -----------------------------------------------------------------------------------------------
class _Log:
    """train.log: a header, then one line per logged step; rewritten whole (atomically) on each flush."""

    def __init__(self, path: Path, enabled: bool, lines: list[str] | None = None):
        self.path, self.enabled, self.lines = path, enabled, list(lines or [])

    def add(self, line: str) -> None:
        self.lines.append(line)

    def flush(self) -> None:
        if self.enabled:
            write_text(self.path, "\n".join(self.lines) + "\n")


def _say(dist_info: Dist, message: str) -> None:
    if dist_info.main:
        print(message, file=sys.stderr, flush=True)


def train(config: TrainConfig, *, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train as ``config`` says; see the module docstring. ``on_step(step)`` is called after each
    optimizer step (after any checkpoint of that step) — a hook for tests and callers."""
    config.check()
    if config.threads:
        torch.set_num_threads(config.threads)
    dist_info = setup_distributed()
    try:
        with _sigterm_as_interrupt():
            return _train(config, dist_info, on_step)
    finally:
        if dist_info.owned:
            import torch.distributed as dist
            dist.destroy_process_group()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (what schedulers and ``kill`` send) stops training the way Ctrl-C does."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(config: TrainConfig, dist_info: Dist, on_step) -> TrainResult:
    from peftc.compiler.compiled import compile as compile_model
    from peftc.lang.spec import parse_file
    work, out = _prepare_out(config, dist_info)
    spec = parse_file(config.spec)
    records = read_jsonl(config.data)
    train_records, eval_records = split_eval(records, config.eval_split, config.seed)
    codec = load_codec(config.model)
    train_set = tokenize(train_records, codec, config.max_length, config.chat)
    eval_set = tokenize(eval_records, codec, config.max_length, config.chat)
    world = dist_info.world
    global_batch = config.batch_size * config.grad_accum * world
    total = config.steps or steps_for_epochs(config.epochs or 1.0, len(train_set), global_batch)
    identity = {"model": config.model, "spec_text": spec.format(), "data_sha256": file_sha256(config.data),
                "seed": config.seed, "batch_size": config.batch_size, "grad_accum": config.grad_accum,
                "world_size": world, "max_length": config.max_length, "eval_split": config.eval_split,
                "chat": config.chat, "steps": total, "lr": config.lr, "schedule": config.schedule,
                "warmup": config.warmup, "weight_decay": config.weight_decay,
                "max_grad_norm": config.max_grad_norm}
    _clean_temporaries(work, dist_info)
    # before the (slow) compile: a checkpoint that does not fit these options is refused at once
    found = _find_checkpoint(work, identity, dist_info) if config.resume else None

    if config.device:
        device = torch.device(config.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", dist_info.local_rank)
    else:
        device = torch.device("cpu")
    start = time.perf_counter()
    _say(dist_info, f"loading, capturing and compiling {config.model} with {config.spec} ...")
    model = compile_model(config.model, spec, seed=config.seed)
    _say(dist_info, f"compiled in {time.perf_counter() - start:.1f} s")
    if model.kind != "causal-lm":
        raise TrainError(f"peftc train trains causal language models; '{config.model}' is an encoder")
    model.to(device)
    params = trainable_parameters(model)
    if not params:
        raise TrainError(f"{config.spec} inserts no trainable parameters")
    names = list(params)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)

    step, history, log_lines = 0, [], []
    torch.manual_seed(config.seed * 7_919 + dist_info.rank)          # dropout
    last_checkpoint: Path | None = None          # the newest complete checkpoint of this run
    if found is not None:
        last_checkpoint = found[0]
        step, history, log_lines = _resume(found, params, names, optimizer, dist_info)
        _say(dist_info, f"resumed from {last_checkpoint} (step {step} of {total})")
    elif config.resume:
        _say(dist_info, f"--resume: no complete checkpoint in {work / CHECKPOINTS}; starting from step 0")

    log = _Log(work / "train.log", dist_info.main, log_lines)
    if not log.lines:
        report = model.report()
        log.add(f"# peftc train {config.spec} on {config.model}: {len(train_set)} training examples, "
                f"{len(eval_set)} held out; {total} steps of {global_batch} examples "
                f"({config.batch_size} x {config.grad_accum} accumulation x {world} processes)")
        log.add(f"# trainable params: {report.trainable:,d} of {report.total:,d}; lr {config.lr:g} "
                f"{config.schedule}, warm-up {config.warmup}; seed {config.seed}; device {device}")

    split = head_split(model)
    # the module a step runs (and DDP wraps): the model up to its head's input, or the whole model
    runner: nn.Module = model if split is None else split
    loss_of = token_loss_sum if split is None else split.loss_sum
    synchronised: list[str] = []
    if world > 1:
        runner = wrap_ddp(runner, dist_info, device)
        synchronised = synchronised_parameters(runner, model)
        _say(dist_info, f"DDP over {world} processes ({dist_info.backend}): "
                        f"{len(synchronised)} trainable tensors synchronised, frozen weights ignored")
    forward = torch.compile(runner, dynamic=True) if config.torch_compile else runner

    bar = None
    if dist_info.main and config.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    model.train()
    t0, tokens_run, first_step = time.perf_counter(), 0, step
    loss_value = eval_loss = None
    try:
        while step < total:
            indices = step_indices(len(train_set), global_batch, step, config.seed)
            target_tokens = sum(train_set[i].targets for i in indices)
            share = config.batch_size * config.grad_accum
            mine = indices[dist_info.rank * share:(dist_info.rank + 1) * share]
            scale = world / max(1, target_tokens)
            sums = torch.zeros(2, dtype=torch.float64)
            for k in range(config.grad_accum):
                batch = collate([train_set[i] for i in mine[k * config.batch_size:(k + 1) * config.batch_size]],
                                codec.pad_id)
                batch = {key: value.to(device) for key, value in batch.items()}
                sync = runner.no_sync() if world > 1 and k < config.grad_accum - 1 else contextlib.nullcontext()
                with sync:
                    loss_sum = loss_of(forward(batch["input_ids"], batch["attention_mask"]), batch["labels"])
                    (loss_sum * scale).backward()
                sums[0] += loss_sum.item()
                sums[1] += int(batch["attention_mask"].sum())
            if world > 1:
                import torch.distributed as dist
                reduced = sums.to(device)
                dist.all_reduce(reduced)
                sums = reduced.cpu()
            loss_value = float(sums[0]) / max(1, target_tokens)
            if not math.isfinite(loss_value):
                raise _not_finite(step + 1, f"the loss is {loss_value}, not a finite number", last_checkpoint)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
            lr = lr_at(step, total, config.lr, config.schedule, config.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                optimizer.step()
            except RuntimeError as exc:       # an lr so large the step size itself overflows float32
                if "overflow" not in str(exc):
                    raise
                raise _not_finite(step + 1, f"the update overflowed ({exc})", last_checkpoint) from None
            optimizer.zero_grad(set_to_none=True)
            if not _all_finite(params.values()):
                raise _not_finite(step + 1, "the update made weights that are not finite (nan or inf)",
                                  last_checkpoint)
            step += 1
            tokens_run += int(sums[1])
            elapsed = time.perf_counter() - t0
            entry = {"step": step, "loss": round(loss_value, 6), "lr": lr, "tokens": int(sums[1]),
                     "tokens_per_s": round(tokens_run / elapsed, 2), "elapsed_s": round(elapsed, 2)}
            if eval_set and (step == total or (config.eval_every and step % config.eval_every == 0)):
                if dist_info.main:
                    eval_loss = evaluate_loss(model, eval_set, config.batch_size, codec.pad_id, device)
                    entry["eval_loss"] = round(eval_loss, 6)
            history.append(entry)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_run / elapsed:.0f}",
                                **({"eval": f"{eval_loss:.4f}"} if "eval_loss" in entry else {}))
            if step % config.log_every == 0 or step == total or "eval_loss" in entry:
                log.add(f"step {step:>6}/{total}  loss {loss_value:.4f}  lr {lr:.3e}  "
                        f"tok/s {tokens_run / elapsed:8.1f}  elapsed {elapsed:8.1f}s"
                        + (f"  eval_loss {eval_loss:.4f}" if "eval_loss" in entry else ""))
                log.flush()
            if step == total or (config.save_every and step % config.save_every == 0):
                last_checkpoint = _save_checkpoint(work, step, identity, params, names, optimizer, history,
                                                   log.lines, config.keep, dist_info)
            if on_step is not None:
                on_step(step)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        log.add(f"# interrupted after step {step}")
        log.flush()
        again = "--resume --overwrite" if config.overwrite else "--resume"
        _say(dist_info, f"interrupted after step {step}; "
                        + (f"the last complete checkpoint is {last_checkpoint}: continue with {again}"
                           if last_checkpoint else "no checkpoint was written yet")
                        + (f" ({out} is as it was)" if work != out else ""))
        raise
    except TrainError as exc:
        if bar is not None:
            bar.close()
        log.add(f"# stopped: {exc}")
        log.flush()
        raise
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    if dist_info.main:
        files = _write_outputs(model, config, spec, work, history, log, identity, seconds, tokens_run,
                               step - first_step)
        if work != out:
            replace_dir(work, out)           # the old run is deleted only once the new one is in place
        print(f"wrote {out}/: {', '.join(files)}", file=sys.stderr)
    return TrainResult(model, out, step, seconds, tokens_run, loss_value, eval_loss, history, dist_info.main,
                       synchronised)


def evaluate_loss(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int,
                  device: torch.device) -> float:
    """Mean next-token loss over the targets of ``examples`` (dropout off); ``model`` is a CompiledModel
    (the head runs on the labelled positions only when it can, as in training)."""
    was = model.training
    model.eval()
    split = head_split(model)
    run, loss_of = (model, token_loss_sum) if split is None else (split, split.loss_sum)
    total = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
            total += loss_of(run(batch["input_ids"], batch["attention_mask"]), batch["labels"]).item()
            tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train(was)
    return total / max(1.0, tokens)


def _rng_states(dist_info: Dist) -> list[torch.Tensor]:
    state = torch.get_rng_state()
    if dist_info.world == 1:
        return [state]
    import torch.distributed as dist
    gathered: list = [None] * dist_info.world
    dist.all_gather_object(gathered, state)
    return gathered


def _all_finite(tensors) -> bool:
    tensors = [t.detach() for t in tensors]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def _not_finite(step: int, what: str, last: Path | None) -> TrainError:
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
    return TrainError(f"step {step}: {what}; training stopped and nothing of this step was saved ({kept}); "
                      "a smaller --lr may help")


def _save_checkpoint(out: Path, step: int, identity: dict, params: dict, names: list[str], optimizer,
                     history: list, log_lines: list, keep: int, dist_info: Dist) -> Path:
    target = out / CHECKPOINTS / f"step-{step:07d}"
    rng = _rng_states(dist_info)           # every rank takes part in the gather
    if not dist_info.main:
        return target
    opt_tensors, groups = optimizer_tensors(optimizer, names)
    with atomic_dir(target) as tmp:
        save_tensors(tmp / "adapter.safetensors", {n: p.detach() for n, p in params.items()})
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        save_tensors(tmp / "rng.safetensors", {f"rank{r}": s for r, s in enumerate(rng)})
        write_json(tmp / "trainer_state.json", {"step": step, "identity": identity, "param_groups": groups,
                                                "history": history, "log": log_lines})
    _prune(out, identity, keep)
    return target


def _identity_of(path: Path) -> dict | None:
    try:
        return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prune(out: Path, identity: dict, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of this run (those written with ``identity``);
    a checkpoint of any other run, or one that cannot be read, is never deleted here."""
    mine = [p for p in _step_dirs(out) if _identity_of(p) == identity]
    for old in mine[:-keep]:
        shutil.rmtree(old)


class _Damaged(Exception):
    """A checkpoint whose files are missing or cannot be read (the message says which)."""


CHECKPOINT_FILES = ("trainer_state.json", "adapter.safetensors", "optimizer.safetensors", "rng.safetensors")


def _read_checkpoint(path: Path) -> tuple[dict, dict, dict, dict]:
    """(trainer state, adapter, optimizer and RNG tensors) of a checkpoint, or :class:`_Damaged`."""
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            raise _Damaged(f"it has no {name}")
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        step, _, _, _ = int(state["step"]), state["identity"], state["param_groups"], list(state["history"])
    except (ValueError, KeyError, TypeError) as exc:
        raise _Damaged(f"its trainer_state.json cannot be read ({type(exc).__name__}: {exc})") from None
    if f"step-{step:07d}" != path.name:
        raise _Damaged(f"its trainer_state.json is for step {step}")
    tensors = []
    for name in CHECKPOINT_FILES[1:]:
        try:
            tensors.append(load_tensors(path / name))
        except Exception as exc:      # safetensors raises its own error type for a truncated file
            raise _Damaged(f"its {name} cannot be read ({exc})") from None
    return (state, *tensors)


def _check_identity(path: Path, saved: dict, identity: dict) -> None:
    for key in RESUME_KEYS:
        if key not in saved:          # a checkpoint of an older peftc that did not record it
            continue
        if saved[key] != identity[key]:
            what = KEY_NAMES.get(key, "--" + key.replace("_", "-"))
            raise TrainError(f"cannot resume from {path}: {what} was {saved[key]!r}, now {identity[key]!r}")


def _find_checkpoint(out: Path, identity: dict, dist_info: Dist) -> tuple | None:
    """The newest readable checkpoint in ``out``, read: (path, state, weights, optimizer tensors, RNG
    tensors), or None when there is none. A damaged one is skipped, saying so; one written with other
    options (:data:`RESUME_KEYS`) is a :class:`TrainError` naming the first that differs."""
    for path in reversed(_step_dirs(out)):
        try:
            state, weights, opt_tensors, rng = _read_checkpoint(path)
        except _Damaged as exc:
            _say(dist_info, f"checkpoint {path} is damaged ({exc}); falling back to the one before it")
            continue
        _check_identity(path, state["identity"], identity)
        return path, state, weights, opt_tensors, rng
    return None


def _resume(found: tuple, params: dict, names: list[str], optimizer, dist_info: Dist):
    """Load a checkpoint :func:`_find_checkpoint` read into the parameters, optimizer and RNG: (step,
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


def _write_outputs(model, config: TrainConfig, spec, out: Path, history: list, log: _Log, identity: dict,
                   seconds: float, tokens: int, steps_run: int) -> list[str]:
    """Write the adapter and the run's files into ``out``; the names written."""
    report = model.report()
    files = model.save_adapter(out)   # peftc's file always; HF PEFT's files when they can hold the adapter
    write_text(out / SPEC_FILE, spec.format())
    write_text(out / "report.txt", str(report) + "\n")
    last = history[-1] if history else {}
    summary = {"steps": last.get("step", 0), "final_loss": last.get("loss"),
               "eval_loss": next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None),
               "seconds": round(seconds, 2), "tokens": tokens,
               "tokens_per_s": round(tokens / seconds, 2) if seconds else None, "steps_this_run": steps_run}
    write_json(out / MANIFEST, {"model": config.model, "spec": SPEC_FILE, "kind": model.kind,
                                "report": report.to_dict(), "train": summary})
    write_json(out / "train.json", {"config": asdict(config), "identity": identity, "summary": summary,
                                    "history": history})
    log.add(f"# done: {summary['steps']} steps, final loss {summary['final_loss']}, "
            f"{tokens:,d} tokens in {seconds:.1f} s ({summary['tokens_per_s']} tok/s this run)")
    log.flush()
    files += [SPEC_FILE, "report.txt", MANIFEST, "train.json", "train.log"]
    if plot_losses(history, out / "loss.png", title=f"{config.spec} on {config.model}"):
        files.append("loss.png")
    return files


def plot_losses(history: list[dict], path: Path, title: str = "") -> bool:
    """The loss curve (and eval loss where measured) as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1.2)
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per completion token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return True

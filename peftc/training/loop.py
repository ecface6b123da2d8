"""The training loop of ``peftc train``: :func:`train` sets a run up (data, compile, optimizer, resume,
DDP), runs its optimizer steps and writes the outputs; see :mod:`peftc.training.train` for what it
guarantees."""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from peftc.compiler.compiled import compile as compile_model
from peftc.fsutil import replace_dir
from peftc.lang.spec import parse_file
from peftc.training.checkpoints import find_checkpoint, resume, run_identity, save_checkpoint
from peftc.training.config import CHECKPOINTS, TrainConfig, TrainError
from peftc.training.data import step_indices, steps_for_epochs
from peftc.training.distributed import Dist, all_reduce_sum, say, setup_distributed, synchronised_parameters, \
    teardown_distributed, wrap_ddp
from peftc.training.loss import token_loss_sum
from peftc.training.outputs import TrainLog, write_outputs
from peftc.training.rundir import clean_temporaries, prepare_out
from peftc.training.schedule import lr_at
from peftc.training.tasks import Task, task_for


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


@dataclass
class _Run:
    """Everything the steps of one run share, and where it stands."""
    config: TrainConfig
    dist_info: Dist
    work: Path                        #: where the run is written (``out``, or its staging directory)
    out: Path
    spec: object
    task: Task                        #: what is trained: the data's examples, batches, inputs and loss
    train_set: list
    eval_set: list
    global_batch: int
    total: int
    identity: dict
    device: torch.device
    model: nn.Module
    params: dict
    optimizer: torch.optim.Optimizer
    step: int = 0
    history: list = field(default_factory=list)
    log: TrainLog | None = None
    last_checkpoint: Path | None = None          #: the newest complete checkpoint of this run
    runner: nn.Module | None = None   #: the module a step runs (and DDP wraps)
    forward: Callable | None = None   #: ``runner``, or it through torch.compile
    loss_of: Callable = token_loss_sum
    synchronised: list[str] = field(default_factory=list)
    t0: float = 0.0
    tokens_run: int = 0
    loss: float | None = None
    eval_loss: float | None = None

    @property
    def names(self) -> list[str]:
        return list(self.params)


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
        teardown_distributed(dist_info)


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
    run = _setup(config, dist_info)
    bar = None
    if dist_info.main and config.progress:
        from tqdm import tqdm
        bar = tqdm(total=run.total, initial=run.step, desc="train", unit="step", file=sys.stderr,
                   dynamic_ncols=True)
    run.model.train()
    run.t0, first_step = time.perf_counter(), run.step
    try:
        while run.step < run.total:
            lr, tokens = _step(run)
            _after_step(run, bar, lr, tokens)
            if on_step is not None:
                on_step(run.step)
    except KeyboardInterrupt:
        _stopped(run, bar, None)
        raise
    except TrainError as exc:
        _stopped(run, bar, exc)
        raise
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - run.t0
    run.model.eval()
    if dist_info.main:
        files = write_outputs(run.model, config, run.spec, run.work, run.history, run.log, run.identity,
                              seconds, run.tokens_run, run.step - first_step)
        if run.work != run.out:
            replace_dir(run.work, run.out)   # the old run is deleted only once the new one is in place
        print(f"wrote {run.out}/: {', '.join(files)}", file=sys.stderr)
    return TrainResult(run.model, run.out, run.step, seconds, run.tokens_run, run.loss, run.eval_loss,
                       run.history, dist_info.main, run.synchronised)


# --- setting a run up ----------------------------------------------------------------------------------------
def _setup(config: TrainConfig, dist_info: Dist) -> _Run:
    """Read the spec and data, check any checkpoint to resume from against the options (before the slow
    compile), compile the model and build the optimizer, resume, and wrap the model for the steps."""
    work, out = prepare_out(config, dist_info)
    spec = parse_file(config.spec)
    task = task_for(config)
    train_set, eval_set = task.examples(config)
    global_batch = config.batch_size * config.grad_accum * dist_info.world
    total = config.steps or steps_for_epochs(config.epochs or 1.0, len(train_set), global_batch)
    identity = run_identity(config, spec.format(), dist_info.world, total)
    clean_temporaries(work, dist_info)
    # before the (slow) compile: a checkpoint that does not fit these options is refused at once
    found = find_checkpoint(work, identity, dist_info) if config.resume else None
    device = _device(config, dist_info)
    model, params, optimizer = _build_model(config, spec, dist_info, device, task)
    run = _Run(config, dist_info, work, out, spec, task, train_set, eval_set, global_batch, total,
               identity, device, model, params, optimizer)
    _restore(run, found)
    _wrap(run)
    return run


def _device(config: TrainConfig, dist_info: Dist) -> torch.device:
    if config.device:
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", dist_info.local_rank)
    return torch.device("cpu")


def trainable_parameters(model) -> dict[str, nn.Parameter]:
    """Every parameter that requires grad, named as ``adapter_parameters()`` names them where it can."""
    named = {name: p for name, p in model.adapter_parameters().items() if p.requires_grad}
    seen = {id(p) for p in named.values()}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            named[name] = p
            seen.add(id(p))
    return named


def _build_model(config: TrainConfig, spec, dist_info: Dist, device: torch.device, task: Task):
    """(the compiled model on ``device``, its trainable parameters by name, their AdamW)."""
    start = time.perf_counter()
    say(dist_info, f"loading, capturing and compiling {config.model} with {config.spec} ...")
    model = compile_model(config.model, spec, seed=config.seed, dtype=config.dtype,
                          autocast_adapter_dtype=config.autocast_adapter_dtype)
    say(dist_info, f"compiled in {time.perf_counter() - start:.1f} s")
    task.bind(model, config)
    model.to(device)
    params = trainable_parameters(model)
    if not params:
        raise TrainError(f"{config.spec} inserts no trainable parameters")
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    return model, params, optimizer


def _restore(run: _Run, found: tuple | None) -> None:
    """Seed dropout, load the checkpoint ``found`` (if any), and open train.log (its header if new)."""
    config, dist_info = run.config, run.dist_info
    log_lines: list[str] = []
    torch.manual_seed(config.seed * 7_919 + dist_info.rank)          # dropout
    if found is not None:
        run.last_checkpoint = found[0]
        run.step, run.history, log_lines = resume(found, run.params, run.names, run.optimizer, dist_info)
        say(dist_info, f"resumed from {run.last_checkpoint} (step {run.step} of {run.total})")
    elif config.resume:
        say(dist_info, f"--resume: no complete checkpoint in {run.work / CHECKPOINTS}; starting from step 0")
    run.log = log = TrainLog(run.work / "train.log", dist_info.main, log_lines)
    if not log.lines:
        report = run.model.report()
        log.add(f"# peftc train {config.spec} on {config.model}: {len(run.train_set)} training examples, "
                f"{len(run.eval_set)} held out; {run.total} steps of {run.global_batch} examples "
                f"({config.batch_size} x {config.grad_accum} accumulation x {dist_info.world} processes)")
        log.add(f"# trainable params: {report.trainable:,d} of {report.total:,d}; lr {config.lr:g} "
                f"{config.schedule}, warm-up {config.warmup}; seed {config.seed}; device {run.device}")


def _wrap(run: _Run) -> None:
    """The module a step runs: the model up to its head's input (the head and the loss then run on the
    labelled positions only) or the whole model; under DDP, wrapped; with --torch-compile, compiled."""
    split = run.task.head_split(run.model)
    run.runner = run.model if split is None else split
    run.loss_of = run.task.loss_sum if split is None else split.loss_sum
    world = run.dist_info.world
    if world > 1:
        run.runner = wrap_ddp(run.runner, run.dist_info, run.device)
        run.synchronised = synchronised_parameters(run.runner, run.model)
        say(run.dist_info, f"DDP over {world} processes ({run.dist_info.backend}): "
                           f"{len(run.synchronised)} trainable tensors synchronised, frozen weights ignored")
    run.forward = torch.compile(run.runner, dynamic=True) if run.config.torch_compile else run.runner


# --- a step ---------------------------------------------------------------------------------------------------
def _accumulate(run: _Run) -> tuple[float, int]:
    """Forward and backward of this rank's micro-batches of the step, gradients scaled so that their sum
    over ranks and micro-batches is that of the mean loss per target token of the global batch: (that
    loss, the step's non-pad tokens), both over all ranks."""
    config, world = run.config, run.dist_info.world
    indices = step_indices(len(run.train_set), run.global_batch, run.step, config.seed)
    target_tokens = sum(run.train_set[i].targets for i in indices)
    share = config.batch_size * config.grad_accum
    mine = indices[run.dist_info.rank * share:(run.dist_info.rank + 1) * share]
    scale = world / max(1, target_tokens)
    sums = torch.zeros(2, dtype=torch.float64)
    for k in range(config.grad_accum):
        batch = run.task.collate([run.train_set[i] for i in mine[k * config.batch_size:(k + 1) * config.batch_size]])
        batch = {key: value.to(run.device) for key, value in batch.items()}
        sync = run.runner.no_sync() if world > 1 and k < config.grad_accum - 1 else contextlib.nullcontext()
        with sync:
            loss_sum = run.loss_of(run.forward(*run.task.inputs(batch)), batch["labels"])
            (loss_sum * scale).backward()
        sums[0] += loss_sum.item()
        sums[1] += run.task.tokens(batch)
    sums = all_reduce_sum(sums, run.dist_info, run.device)
    return float(sums[0]) / max(1, target_tokens), int(sums[1])


def _step(run: _Run) -> tuple[float, int]:
    """One optimizer step: (its learning rate, its tokens). A loss or weights that are not finite stop the
    run (:class:`TrainError`) before anything of the step is saved."""
    config, step = run.config, run.step
    run.loss, tokens = _accumulate(run)
    if not math.isfinite(run.loss):
        raise _not_finite(step + 1, f"the loss is {run.loss}, not a finite number", run.last_checkpoint)
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(run.params.values()), config.max_grad_norm)
    lr = lr_at(step, run.total, config.lr, config.schedule, config.warmup)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    try:
        run.optimizer.step()
    except RuntimeError as exc:       # an lr so large the step size itself overflows float32
        if "overflow" not in str(exc):
            raise
        raise _not_finite(step + 1, f"the update overflowed ({exc})", run.last_checkpoint) from None
    run.optimizer.zero_grad(set_to_none=True)
    if not _all_finite(run.params.values()):
        raise _not_finite(step + 1, "the update made weights that are not finite (nan or inf)",
                          run.last_checkpoint)
    run.step += 1
    return lr, tokens


def _after_step(run: _Run, bar, lr: float, tokens: int) -> None:
    """Record the step just taken: the eval loss when due, the history, the bar, train.log, a checkpoint."""
    config, step, total = run.config, run.step, run.total
    run.tokens_run += tokens
    elapsed = time.perf_counter() - run.t0
    entry = {"step": step, "loss": round(run.loss, 6), "lr": lr, "tokens": tokens,
             "tokens_per_s": round(run.tokens_run / elapsed, 2), "elapsed_s": round(elapsed, 2)}
    if run.eval_set and (step == total or (config.eval_every and step % config.eval_every == 0)):
        if run.dist_info.main:
            run.eval_loss = evaluate_loss(run.model, run.eval_set, config.batch_size, run.task, run.device)
            entry["eval_loss"] = round(run.eval_loss, 6)
    run.history.append(entry)
    evaluated = "eval_loss" in entry
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{run.loss:.4f}", tok_s=f"{run.tokens_run / elapsed:.0f}",
                        **({"eval": f"{run.eval_loss:.4f}"} if evaluated else {}))
    if step % config.log_every == 0 or step == total or evaluated:
        run.log.add(f"step {step:>6}/{total}  loss {run.loss:.4f}  lr {lr:.3e}  "
                    f"tok/s {run.tokens_run / elapsed:8.1f}  elapsed {elapsed:8.1f}s"
                    + (f"  eval_loss {run.eval_loss:.4f}" if evaluated else ""))
        run.log.flush()
    if step == total or (config.save_every and step % config.save_every == 0):
        run.last_checkpoint = save_checkpoint(run.work, step, run.identity, run.params, run.names,
                                              run.optimizer, run.history, run.log.lines, config.keep,
                                              run.dist_info)


def _stopped(run: _Run, bar, exc: TrainError | None) -> None:
    """Close the bar and say in train.log (and, for Ctrl-C, on stderr) why the run stopped."""
    if bar is not None:
        bar.close()
    if exc is not None:
        run.log.add(f"# stopped: {exc}")
        run.log.flush()
        return
    run.log.add(f"# interrupted after step {run.step}")
    run.log.flush()
    again = "--resume --overwrite" if run.config.overwrite else "--resume"
    say(run.dist_info, f"interrupted after step {run.step}; "
                       + (f"the last complete checkpoint is {run.last_checkpoint}: continue with {again}"
                          if run.last_checkpoint else "no checkpoint was written yet")
                       + (f" ({run.out} is as it was)" if run.work != run.out else ""))


def evaluate_loss(model: nn.Module, examples: list, batch_size: int, task: Task, device: torch.device) -> float:
    """Mean loss over the targets of ``examples`` (dropout off); ``model`` is a CompiledModel (a causal
    LM's head runs on the labelled positions only when it can, as in training)."""
    was = model.training
    model.eval()
    split = task.head_split(model)
    run, loss_of = (model, task.loss_sum) if split is None else (split, split.loss_sum)
    total = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in task.collate(examples[start:start + batch_size]).items()}
            total += loss_of(run(*task.inputs(batch)), batch["labels"]).item()
            tokens += task.targets(batch)
    model.train(was)
    return total / max(1.0, tokens)


def _all_finite(tensors) -> bool:
    tensors = [t.detach() for t in tensors]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def _not_finite(step: int, what: str, last: Path | None) -> TrainError:
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
    return TrainError(f"step {step}: {what}; training stopped and nothing of this step was saved ({kept}); "
                      "a smaller --lr may help")

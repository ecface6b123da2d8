"""``peftc train``: compile a model with a spec and train the inserted parameters on a JSONL file.

One function, :func:`train`, serves the command line, the tests and ``torchrun``. This module is its
public face; the work is done by the modules of :mod:`peftc.training` it re-exports from (config,
schedule, loss, distributed, checkpoints, rundir, outputs, loop, hf_trainer). What it guarantees:

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

# Not re-exported: save_tensors and head_split. Patch them where they are used
# (peftc.training.checkpoints, peftc.training.loop); patching a re-export here would change nothing.
from peftc.training.checkpoints import CHECKPOINT_FILES, checkpoints, file_sha256, load_optimizer, \
    optimizer_tensors
from peftc.training.config import CHECKPOINTS, KEY_NAMES, MANIFEST, RESUME_KEYS, RUN_MARKERS, SCHEDULES, \
    SPEC_FILE, TrainConfig, TrainError
from peftc.training.distributed import Dist, setup_distributed, synchronised_parameters, wrap_ddp
from peftc.training.hf_trainer import CausalLMWithLoss
from peftc.training.loop import TrainResult, evaluate_loss, train, trainable_parameters
from peftc.training.loss import token_loss_sum
from peftc.training.outputs import plot_losses
from peftc.training.rundir import staging_dir
from peftc.training.schedule import lr_at

__all__ = ["CHECKPOINTS", "CHECKPOINT_FILES", "KEY_NAMES", "MANIFEST", "RESUME_KEYS", "RUN_MARKERS", "SCHEDULES",
           "SPEC_FILE", "CausalLMWithLoss", "Dist", "TrainConfig", "TrainError", "TrainResult", "checkpoints",
           "evaluate_loss", "file_sha256", "load_optimizer", "lr_at", "optimizer_tensors",
           "plot_losses", "setup_distributed", "staging_dir", "synchronised_parameters",
           "token_loss_sum", "train", "trainable_parameters", "wrap_ddp"]

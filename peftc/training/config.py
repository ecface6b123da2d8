"""The options of ``peftc train``, declared once: :class:`TrainConfig`'s fields are the Python API, and
their ``metadata`` is what ``peftc train --help`` shows (the command line is generated from
``dataclasses.fields(TrainConfig)`` by :mod:`peftc.cli.train`).

Metadata keys a field may carry:

* ``help``: the help text (``%(default)s`` is argparse's, filled from the field's default);
* ``flag``: the option's name when it is not ``--`` plus the field name with ``-`` for ``_``
  (``None``: a positional argument);
* ``choices``: the values allowed;
* ``group``: the name of a mutually exclusive group the option belongs to;
* ``negate``: a bool field whose flag turns it *off* (``--no-progress`` sets ``progress`` to False).

A field without a default is a required option (or the positional argument when ``flag`` is ``None``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from peftc.errors import PeftcError
from peftc.models import DEFAULT_MODEL, DTYPES
from peftc.rundir import MANIFEST, SPEC_FILE  # noqa: F401  (what `peftc export` and `eval` read)

CHECKPOINTS = "checkpoints"
SCHEDULES = ("constant", "linear", "cosine")
#: options a resumed run must share with the run that wrote the checkpoint
RESUME_KEYS = ("model", "dtype", "autocast_adapter_dtype", "spec_text", "data_sha256", "seed", "batch_size",
               "grad_accum", "world_size", "max_length", "eval_split", "chat", "steps", "lr", "schedule", "warmup",
               "weight_decay", "max_grad_norm")
#: how a resume error names an identity key that is not a command-line option
KEY_NAMES = {"spec_text": "the spec", "data_sha256": "the data file's sha256",
             "world_size": "the number of processes"}
#: what marks a directory as peftc's own (a run or a compile output), which --overwrite may replace
RUN_MARKERS = (MANIFEST, CHECKPOINTS, "train.log")


class TrainError(PeftcError, ValueError):
    """Options that do not fit together, or a checkpoint that does not fit the run."""


def option(default=None, help: str = "", **cli):
    """A :class:`TrainConfig` field with its command-line description (see the module docstring)."""
    return field(default=default, metadata={"help": help, **cli})


def required(help: str = "", **cli):
    """A :class:`TrainConfig` field without a default: a required option (or the positional argument)."""
    return field(metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    spec: str = required("the spec file (.peft) whose inserted parameters are trained", flag=None)
    data: str = required("JSONL training data, or for an image classifier a folder of images in one "
                         "subfolder per class")
    out: str = required("directory for the adapter, checkpoints, train.log and loss.png; a non-empty one "
                        "needs --resume or --overwrite")
    model: str = option(DEFAULT_MODEL, "model reference (default %(default)s)")
    dtype: str = option("auto", "precision to load the model in: auto (the checkpoint's own dtype; float32 "
                                "for the built-ins and GGUF files), bf16, fp16 or fp32 (default %(default)s)",
                        choices=tuple(DTYPES))
    autocast_adapter_dtype: bool = option(True, "on a bf16/fp16 model keep the inserted weights in the model's "
                                                "dtype instead of float32 (HF PEFT's autocast_adapter_dtype=False)",
                                          flag="--no-autocast-adapter-dtype", negate=True)
    steps: int | None = option(None, "optimizer steps (default: one epoch, or --epochs)", group="length")
    epochs: float | None = option(None, "passes over the training data", group="length")
    batch_size: int = option(8, "examples per micro-batch and process (default %(default)s)")
    grad_accum: int = option(1, "micro-batches per optimizer step (default %(default)s)")
    lr: float = option(1e-3, "peak learning rate of AdamW (default %(default)g)")
    schedule: str = option("cosine", "learning-rate schedule after warm-up (default %(default)s; linear and "
                                     "cosine decay to 0 at the last step)", choices=SCHEDULES)
    warmup: int = option(0, "steps of linear warm-up (default %(default)s)")
    weight_decay: float = option(0.0, "AdamW weight decay (default %(default)s)")
    max_grad_norm: float = option(1.0, "gradient clipping (0: off; default %(default)s)")
    max_length: int = option(512, "tokens per example, truncated on the right (default %(default)s)")
    seed: int = option(0, "seed of the initial weights, data order and dropout (default %(default)s)")
    eval_split: float = option(0.0, "records held out for eval loss: a fraction below 1 or a count "
                                    "(default none)")
    eval_every: int = option(0, "steps between eval-loss measurements (0: only at the end; default %(default)s)")
    save_every: int = option(50, "steps between checkpoints (0: only at the end; default %(default)s)")
    keep: int = option(2, "checkpoints kept (default %(default)s)")
    log_every: int = option(10, "steps between lines of train.log (default %(default)s)")
    resume: bool = option(False, "continue from the last checkpoint in --out (every option that shapes the "
                                 "result must be as before)")
    overwrite: bool = option(False, "replace the run already in --out; the old run stays whole until the new "
                                    "one has finished (it trains in .OUT.overwrite beside --out and is then "
                                    "swapped in)")
    chat: bool = option(False, "wrap prompts in the tokenizer's chat template")
    torch_compile: bool = option(False, "run the model through torch.compile")
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK when CUDA is there, "
                                      "else cpu)")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    progress: bool = option(True, "no progress bar (rank 0 draws one on stderr by default)",
                            flag="--no-progress", negate=True)

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

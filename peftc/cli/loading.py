"""The options of every command that loads a model: the precision it loads in (``--dtype``) and, where
it compiles a spec, the dtype of the weights the spec inserts (``--no-autocast-adapter-dtype``)."""
from __future__ import annotations

import argparse

from peftc.models import DTYPES

DTYPE_HELP = ("precision to load the model in: auto (the checkpoint's own dtype; float32 for the built-ins "
              "and GGUF files), bf16, fp16 or fp32")


def add_dtype_option(p: argparse.ArgumentParser, default: str | None = "auto", more: str = "") -> None:
    """``--dtype``: how the command loads its model (``default`` None: the run directory's)."""
    p.add_argument("--dtype", choices=tuple(DTYPES), default=default,
                   help=DTYPE_HELP + (f"; default {default}" if default else "") + more)


def add_adapter_dtype_option(p: argparse.ArgumentParser) -> None:
    """``--autocast-adapter-dtype`` / ``--no-autocast-adapter-dtype`` (HF PEFT's argument of that name)."""
    p.add_argument("--autocast-adapter-dtype", action=argparse.BooleanOptionalAction, default=True,
                   help="on a bf16/fp16 model keep the inserted weights in float32, cast their input to "
                        "float32 and their result back (HF PEFT's autocast_adapter_dtype; default on); "
                        "--no-autocast-adapter-dtype keeps them in the model's dtype")

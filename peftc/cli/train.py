"""The ``train``, ``eval`` and ``generate`` commands (registered on the parser by :func:`add_commands`).

``peftc train``'s options are not written here: they are the fields of
:class:`~peftc.training.config.TrainConfig`, whose metadata (help, flag, choices, group) this module turns
into arguments (:func:`add_config_options`) and back (:func:`config_from_args`)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import types
import typing
from pathlib import Path

from peftc.cli.loading import add_dtype_option
from peftc.rundir import load_run, read_manifest
from peftc.compiler.compiled import compile as compile_model
from peftc.errors import PeftcError
from peftc.fsutil import write_json
from peftc.models import DEFAULT_MODEL, load_model, resolve
from peftc.training.data import load_codec, read_jsonl
from peftc.training.images import Pixels, accuracy, read_image_folder
from peftc.training.tasks import WHAT
from peftc.export.genai import exported_model
from peftc.training.generate import cached_decoder, decoder_for, exact_match, greedy, onnx_decoder
from peftc.training.train import TrainConfig, train


def _value_type(hint) -> type:
    """``int`` for ``int`` or ``int | None`` (a field's type as argparse converts it)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [k for k in typing.get_args(hint) if k is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"an option must have one type, not {hint}")
        return kinds[0]
    return hint


def add_config_options(p: argparse.ArgumentParser, config_class=TrainConfig) -> None:
    """One argument per field of ``config_class``, as its metadata says (see :mod:`peftc.training.config`):
    the flag is ``--field-name`` unless ``flag`` names another (``None``: positional); a bool is a switch
    (``negate``: one that turns the field off); a field without a default is required."""
    hints = typing.get_type_hints(config_class)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in dataclasses.fields(config_class):
        meta = f.metadata
        target = p
        if "group" in meta:
            if meta["group"] not in groups:
                groups[meta["group"]] = p.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        kwargs = {"help": meta.get("help")}
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        if flag is None:
            target.add_argument(f.name, **kwargs)
            continue
        kwargs["dest"] = f.name
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        kind = _value_type(hints[f.name])
        if kind is bool:
            kwargs["action"] = "store_false" if meta.get("negate") else "store_true"
        else:
            kwargs["type"] = kind
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
        target.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace, config_class=TrainConfig):
    """The ``config_class`` the parsed ``args`` describe (every field by its name)."""
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def cmd_train(args) -> int:
    result = train(config_from_args(args))
    if not result.main:
        return 0
    summary = (f"trained {result.steps} steps: loss {result.loss:.4f}" if result.loss is not None
               else f"nothing to do: {result.steps} steps already done")
    if result.eval_loss is not None:
        summary += f", eval loss {result.eval_loss:.4f}"
    if result.seconds and result.tokens:
        unit = ("images", "images/s") if result.model.kind == "classifier" else ("tokens", "tok/s")
        summary += (f"; {result.tokens:,d} {unit[0]} in {result.seconds:.1f} s "
                    f"({result.tokens_per_second:.1f} {unit[1]})")
    print(summary)
    return 0


def load_compiled(args, directory, manifest: dict, ref: str):
    """(the compiled model of a trained directory, or of the base model with no adapter; its description)."""
    if directory:
        print(f"loading {ref} with the adapter in {directory} ...", file=sys.stderr, flush=True)
        return load_run(directory, manifest, ref, args.dtype), f"{directory} on {ref}"
    print(f"loading {ref} (no adapter) ...", file=sys.stderr, flush=True)
    return compile_model(ref, "", dtype=args.dtype or "auto"), f"{ref} (base model, no adapter)"


def load_decoder(args):
    """(decoder, model reference, description) for ``eval``/``generate``: an ONNX file, a trained
    directory (adapter merged, KV-cache decoding when it folds), or the base model; a causal LM or an
    encoder-decoder."""
    directory, manifest, ref = read_manifest(args) if args.dir else (None, {}, args.model or DEFAULT_MODEL)
    if args.onnx:
        if directory:
            raise PeftcError("give a trained directory or --onnx, not both")
        decoder = onnx_decoder(args.onnx, args.runtime)
        return decoder, args.model or exported_model(args.onnx) or ref, f"{args.onnx} ({decoder.name})"
    if not directory and not args.recompute:
        base = load_model(ref, args.dtype or "auto")
        if getattr(base, "can_generate", lambda: False)() and base.main_input_name == "input_ids":
            return cached_decoder(base), ref, f"{ref} (base model, no adapter)"
    model, what = load_compiled(args, directory, manifest, ref)
    text_seq2seq = model.kind == "seq2seq-lm" and model.signature.names[0] == "input_ids"
    if model.kind != "causal-lm" and not text_seq2seq:
        hint = (f"; 'peftc eval {args.dir or '--model ' + ref} --data FOLDER' reports its accuracy on images"
                if model.kind == "classifier" else "")
        raise PeftcError(f"'{ref}' is {WHAT.get(model.kind, model.kind)} reading {model.signature.names[0]}: "
                         f"eval and generate decode text with a causal LM or a text encoder-decoder{hint}")
    return decoder_for(model, args.recompute), ref, what


def eval_images(args) -> int:
    """``peftc eval RUN --data FOLDER``: a classifier's top-1 accuracy on a folder of images."""
    if args.onnx:
        raise PeftcError("--onnx: an image classifier is evaluated in torch: give its trained directory")
    directory, manifest, ref = read_manifest(args) if args.dir else (None, {}, args.model or DEFAULT_MODEL)
    model, what = load_compiled(args, directory, manifest, ref)
    if model.kind != "classifier":
        raise PeftcError(f"--data {args.data} is a folder of images; '{ref}' is {WHAT.get(model.kind, model.kind)}, "
                         "not an image classifier")
    records, names = read_image_folder(args.data, model.config)
    records = records[:args.limit] if args.limit else records
    result = accuracy(model, records, names, Pixels(model.config, resolve(ref)[1]), args.batch_size)
    wrong = [row for row in result.rows if row[1] != row[2]]
    for record, predicted, expected in wrong[:args.show]:
        print(f"BAD {record.path}: {predicted} (expected {expected})")
    print(f"{what} on {args.data}: {result.summary()}")
    if args.json:
        write_json(args.json, {"model": ref, "what": what, "data": args.data, "correct": result.correct,
                               "total": result.total, "accuracy": result.accuracy, "seconds": result.seconds,
                               "rows": [{"image": r.path, "predicted": p, "expected": e, "ok": p == e}
                                        for r, p, e in result.rows]})
    return 0


def cmd_eval(args) -> int:
    if Path(args.data).is_dir():
        return eval_images(args)
    records = read_jsonl(args.data)
    if args.limit:
        records = records[:args.limit]
    decoder, ref, what = load_decoder(args)
    codec = load_codec(ref)
    result = exact_match(decoder, codec, records, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, chat=args.chat)
    wrong = [row for row in result.rows if not row[2]]
    right = [row for row in result.rows if row[2]]
    for record, text, ok in (wrong[:args.show] + right[:max(0, args.show - len(wrong))])[:args.show]:
        print(f"{'ok ' if ok else 'BAD'} {record.prompt!r} -> {text!r} (expected {record.completion.strip()!r})")
    print(f"{what} on {args.data}: {result.summary()}")
    if args.json:
        write_json(args.json, {"model": ref, "what": what, "data": args.data, "correct": result.correct,
                               "total": result.total, "accuracy": result.accuracy, "seconds": result.seconds,
                               "decoder": result.decoder,
                               "rows": [{"line": r.line, "prompt": r.prompt, "expected": r.completion,
                                         "output": t, "ok": ok} for r, t, ok in result.rows]})
    return 0


def cmd_generate(args) -> int:
    decoder, ref, _ = load_decoder(args)
    codec = load_codec(ref)
    prompts = [p.encode("utf-8").decode("unicode_escape") if args.escapes else p for p in args.prompt]
    start = time.perf_counter()
    outputs = greedy(decoder, [codec.encode_prompt(p, args.chat) for p in prompts], eos_id=codec.eos_id,
                     max_new_tokens=args.max_new_tokens, batch_size=len(prompts))
    for prompt, ids in zip(prompts, outputs):
        text = codec.decode(ids)
        print(text if len(prompts) == 1 else f"{prompt!r} -> {text!r}")
    print(f"({sum(map(len, outputs))} tokens, {getattr(decoder, 'name', '')}, "
          f"{time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


def _inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", default=None,
                   help="a directory written by 'peftc train' (or 'peftc compile'); omit for the base model")
    p.add_argument("--onnx", default=None, help="run this 'peftc export --genai' directory (KV cache) or --onnx file "
                                                "(re-run every step) in ONNX Runtime instead")
    p.add_argument("--runtime", choices=("auto", "genai", "ort"), default="auto",
                   help="for a --genai directory: onnxruntime-genai (auto: when installed) or plain ONNX Runtime")
    p.add_argument("--model", default=None, help=f"model reference (default: the directory's, else {DEFAULT_MODEL}); "
                                                 "with --onnx it gives the tokenizer")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--recompute", action="store_true",
                   help="decode by re-running the compiled graph on the whole sequence (no KV cache)")
    add_dtype_option(p, None, "; default: as the directory's manifest says, else auto")


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="compile a model with a spec and train the adapter on a JSONL file",
                       description="Train the parameters a spec inserts on JSONL data: one object a line, with "
                                   "'text' (loss on every token) or 'prompt' and 'completion' (loss on the completion; "
                                   "on an encoder-decoder the prompt is the encoder's input and the completion the "
                                   "decoder's labels). An image classifier trains on a folder of images, one "
                                   "subfolder per class. Under torchrun, trains with DDP; rank 0 writes.")
    add_config_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="greedy-decode each prompt of a JSONL file and report exact match, or a "
                                    "classifier's accuracy on a folder of images")
    _inference_options(p)
    p.add_argument("--data", required=True, help="JSONL with 'prompt' and 'completion' (exact match), or a "
                                                 "folder of images in class folders (a classifier's accuracy)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the longest reference completion + 2")
    p.add_argument("--show", type=int, default=5, help="print this many examples, failures first (default 5)")
    p.add_argument("--json", default=None, help="also write every prediction to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy generation from a trained directory, the base model or ONNX")
    _inference_options(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--escapes", action="store_true", help=r"read \n and other backslash escapes in prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_generate)

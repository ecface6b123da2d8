"""The ``train``, ``eval`` and ``generate`` commands (registered on the parser by :func:`add_commands`)."""
from __future__ import annotations

import argparse
import sys
import time

from peftc.errors import PeftcError
from peftc.models import DEFAULT_MODEL



def cmd_train(args) -> int:
    from peftc.training.train import TrainConfig, train
    config = TrainConfig(spec=args.spec, data=args.data, out=args.out, model=args.model, steps=args.steps,
                         epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         schedule=args.schedule, warmup=args.warmup, weight_decay=args.weight_decay,
                         max_grad_norm=args.max_grad_norm, max_length=args.max_length, seed=args.seed,
                         eval_split=args.eval_split, eval_every=args.eval_every, save_every=args.save_every,
                         keep=args.keep, log_every=args.log_every, resume=args.resume, overwrite=args.overwrite,
                         chat=args.chat,
                         torch_compile=args.torch_compile, device=args.device, threads=args.threads,
                         progress=not args.no_progress)
    result = train(config)
    if not result.main:
        return 0
    summary = (f"trained {result.steps} steps: loss {result.loss:.4f}" if result.loss is not None
               else f"nothing to do: {result.steps} steps already done")
    if result.eval_loss is not None:
        summary += f", eval loss {result.eval_loss:.4f}"
    if result.seconds and result.tokens:
        summary += f"; {result.tokens:,d} tokens in {result.seconds:.1f} s ({result.tokens_per_second:.1f} tok/s)"
    print(summary)
    return 0


def load_decoder(args):
    """(decoder, model reference, description) for ``eval``/``generate``: an ONNX file, a trained
    directory (adapter merged, KV-cache decoding when it folds), or the base model."""
    from peftc.training.generate import CachedDecoder, RecomputeDecoder, decoder_for, onnx_logits, torch_logits
    from peftc.cli.rundir import read_manifest
    directory, manifest, ref = read_manifest(args) if args.dir else (None, {}, args.model or DEFAULT_MODEL)
    if args.onnx:
        if directory:
            raise PeftcError("give a trained directory or --onnx, not both")
        return RecomputeDecoder(onnx_logits(args.onnx), "onnxruntime"), ref, f"{args.onnx} (ONNX Runtime)"
    from peftc.compiler.compiled import compile as compile_model
    if directory:
        from peftc.lang.spec import parse_file
        print(f"loading {ref} with the adapter in {directory} ...", file=sys.stderr, flush=True)
        model = compile_model(ref, parse_file(directory / manifest["spec"]))
        model.load_adapter(directory)
        what = f"{directory} on {ref}"
    else:
        print(f"loading {ref} (no adapter) ...", file=sys.stderr, flush=True)
        what = f"{ref} (base model, no adapter)"
        if not args.recompute:
            from peftc.models import load_model
            base = load_model(ref)
            if getattr(base, "can_generate", lambda: False)():
                return CachedDecoder(base), ref, what
        model = compile_model(ref, "")
    if model.kind != "causal-lm":
        raise PeftcError(f"'{ref}' is an encoder: eval and generate need a causal language model")
    if args.recompute:
        return RecomputeDecoder(torch_logits(model.eval())), ref, what
    return decoder_for(model), ref, what


def cmd_eval(args) -> int:
    from peftc.training.data import load_codec, read_jsonl
    from peftc.training.generate import exact_match
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
        from peftc.fsutil import write_json
        write_json(args.json, {"model": ref, "what": what, "data": args.data, "correct": result.correct,
                               "total": result.total, "accuracy": result.accuracy, "seconds": result.seconds,
                               "decoder": result.decoder,
                               "rows": [{"line": r.line, "prompt": r.prompt, "expected": r.completion,
                                         "output": t, "ok": ok} for r, t, ok in result.rows]})
    return 0


def cmd_generate(args) -> int:
    from peftc.training.data import load_codec
    from peftc.training.generate import greedy
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
    p.add_argument("--onnx", default=None, help="run this ONNX file (from 'peftc export') in ONNX Runtime instead")
    p.add_argument("--model", default=None, help=f"model reference (default: the directory's, else {DEFAULT_MODEL}); "
                                                 "with --onnx it gives the tokenizer")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--recompute", action="store_true",
                   help="decode by re-running the compiled graph on the whole sequence (no KV cache)")


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="compile a model with a spec and train the adapter on a JSONL file",
                       description="Train the parameters a spec inserts on JSONL data: one object a line, with "
                                   "'text' (loss on every token) or 'prompt' and 'completion' (loss on the completion). "
                                   "Under torchrun, trains with DDP; rank 0 writes.")
    p.add_argument("spec")
    p.add_argument("--data", required=True, help="JSONL training data")
    p.add_argument("--out", required=True, help="directory for the adapter, checkpoints, train.log and loss.png; "
                                                "a non-empty one needs --resume or --overwrite")
    p.add_argument("--model", default=DEFAULT_MODEL)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch and process (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW (default 1e-3)")
    p.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="cosine",
                   help="learning-rate schedule after warm-up (default cosine, to 0 at the last step)")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear warm-up (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off; default 1)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example, truncated on the right")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, data order and dropout")
    p.add_argument("--eval-split", type=float, default=0.0,
                   help="records held out for eval loss: a fraction below 1 or a count (default none)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between eval-loss measurements (0: at the end)")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (default 50; 0: at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept (default 2)")
    p.add_argument("--log-every", type=int, default=10, help="steps between lines of train.log (default 10)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out (every option that shapes the result "
                        "must be as before)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out; the old run stays whole until the new one has "
                        "finished (it trains in .OUT.overwrite beside --out and is then swapped in)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--torch-compile", action="store_true", help="run the model through torch.compile")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="greedy-decode each prompt of a JSONL file; report exact match")
    _inference_options(p)
    p.add_argument("--data", required=True, help="JSONL with 'prompt' and 'completion'")
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

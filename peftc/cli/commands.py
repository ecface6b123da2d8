"""The ``peftc`` command line: check, inspect, compile, export."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from peftc.compiler.passmanager import load_passes
from peftc.lang.diagnostics import SpecError
from peftc.lang.reference import markdown, method_reference
from peftc.errors import PeftcError
from peftc.models import DEFAULT_MODEL

MANIFEST = "peftc.json"
SPEC_FILE = "spec.peft"
#: ONNX Runtime must match torch within this fraction of the largest logit, on every target. Float32 itself
#: is not closer: on SmolLM2-135M torch's float32 logits (up to 35) are 1.2e-4 (3.4e-6 of 35) from a float64
#: run of the same model, and ONNX Runtime's 9e-5; 2e-5 leaves a margin of six for another CPU's kernels,
#: while a wrong export (a lost adapter, a wrong scale) is off by 1e-2 of the logits or more.
RELATIVE_TOLERANCE = 2e-5


@contextlib.contextmanager
def step(message: str):
    """Show a long step as it starts and how long it took."""
    print(f"{message} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"{message}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def cmd_check(args) -> int:
    from peftc.lang.spec import parse_file
    spec = parse_file(args.spec)
    print(spec.format(), end="")
    return 0


def cmd_methods(args) -> int:
    print(markdown() if args.markdown else method_reference(load_passes(), args.method), end="")
    return 0


def cmd_inspect(args) -> int:
    from peftc.compiler.compiled import prepare
    from peftc.graph.capture import strip_prefix
    from peftc.graph.slices import describe, ranges
    with step(f"loading and capturing {args.model}"):
        prepared = prepare(args.model)
    sites = prepared.sites
    rows = [{"path": s.path, "role": s.role, "layer": s.layer, "kind": s.kind,
             "in_features": s.in_features, "out_features": s.out_features, "bias": s.bias is not None,
             "slices": {role: ranges(features) for role, features in (s.slices or {}).items()}}
            for s in sites.linears]
    embed = None
    if sites.embed is not None:
        vocab, hidden = prepared.captured.gm.get_parameter(sites.embed).shape
        path = sites.embed_path or strip_prefix(sites.embed.rsplit(".", 1)[0])
        embed = {"path": path, "vocab": vocab, "hidden": hidden}
    if args.json:
        print(json.dumps({"model": args.model, "kind": prepared.captured.kind, "layers": sites.n_layers,
                          "attentions": sites.attention_count, "embed": embed, "linears": rows}, indent=2))
        return 0
    print(f"{args.model}: {prepared.captured.kind}, {sites.n_layers} layers, {sites.attention_count} attentions, "
          f"{len(rows)} linears")
    width = max([len(r["path"]) for r in rows] + [len(embed["path"]) if embed else 0])
    print(f"{'layer':>5}  {'role':<7}  {'module path':<{width}}  {'shape (out x in)':>16}  {'kind':<6}  "
          "fused slices (output rows)")
    if embed:
        shape = f"{embed['vocab']} x {embed['hidden']}"
        print(f"{'-':>5}  {'embed':<7}  {embed['path']:<{width}}  {shape:>16}  embedding")
    for r, site in zip(rows, sites.linears):
        layer = "-" if r["layer"] is None else r["layer"]
        shape = f"{r['out_features']} x {r['in_features']}"
        fused = " | ".join(f"{role} {describe(f)}" for role, f in (site.slices or {}).items())
        print(f"{layer:>5}  {r['role'] or '?':<7}  {r['path']:<{width}}  {shape:>16}  {r['kind']:<6}  {fused}".rstrip())
    return 0


def _replaceable_output(out: Path) -> None:
    """Refuse an ``--out`` that ``peftc compile`` must not replace: a file, a training run, or a directory
    of other files (an empty one, or an earlier compile's, is replaced)."""
    if out.exists() and not out.is_dir():
        raise PeftcError(f"--out {out} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if (out / "checkpoints").exists() or (out / "train.json").exists():
        raise PeftcError(f"--out {out} holds a training run; compile would replace it: choose another --out")
    if not (out / MANIFEST).is_file():
        names = sorted(p.name for p in out.iterdir())
        raise PeftcError(f"--out {out} is not empty and is not a 'peftc compile' directory (no {MANIFEST}; "
                         f"it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): "
                         "choose another --out")


def cmd_compile(args) -> int:
    import errno
    from peftc.compiler.compiled import compile_prepared, prepare
    from peftc.fsutil import atomic_dir, write_json, write_text
    from peftc.lang.spec import parse_file
    spec = parse_file(args.spec)
    out = Path(args.out)
    _replaceable_output(out)
    with step(f"loading and capturing {args.model}"):
        prepared = prepare(args.model)
    with step(f"compiling {args.spec}"):
        model = compile_prepared(prepared, spec, seed=args.seed)
    report = model.report()
    # the directory is built beside --out and swapped in whole: none of an earlier compile's files (HF
    # PEFT's, say, when this adapter has no HF PEFT format) survive, and a failure leaves it as it was
    try:
        with atomic_dir(out) as tmp:
            written = model.save_adapter(tmp)
            write_text(tmp / SPEC_FILE, spec.format())
            write_text(tmp / "report.txt", str(report) + "\n")
            write_text(tmp / "graph.txt", model.dump_graph())
            # without the report's timings: the same inputs give the same bytes (the timings are on stderr)
            summary = {k: v for k, v in report.to_dict().items() if k != "timings_s"}
            write_json(tmp / MANIFEST, {"model": args.model, "spec": SPEC_FILE, "kind": model.kind,
                                        "report": summary})
    except OSError as exc:
        what = exc.strerror or errno.errorcode.get(exc.errno or 0) or str(exc)
        kept = f"{out} was left as it was" if out.exists() else "nothing was written"
        raise PeftcError(f"cannot write {out}: {what}; {kept}") from exc
    print(report)
    print(f"\nwrote {out}/: {', '.join(written)}, {SPEC_FILE}, report.txt, graph.txt, {MANIFEST}")
    return 0


def read_manifest(args) -> tuple[Path, dict, str]:
    """The directory ``args.dir`` written by ``peftc compile``/``train``, its manifest, and the model
    reference (``--model`` overrides the manifest's). The manifest's ``spec`` must name a file inside the
    directory (no absolute path, no '..', no link out of it); a manifest that is not JSON, lacks a key or
    has one of the wrong type is a PeftcError naming it."""
    from peftc.errors import read_json
    directory = Path(args.dir)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise PeftcError(f"{directory} has no {MANIFEST}: make it with 'peftc compile SPEC --out {directory}' "
                         "or 'peftc train'")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise PeftcError(f"{manifest_path}: expected a JSON object, got {type(manifest).__name__}")
    for key in ("spec", *(() if args.model else ("model",))):
        if key not in manifest:
            raise PeftcError(f"{manifest_path}: '{key}' is missing")
        if not isinstance(manifest[key], str) or not manifest[key]:
            raise PeftcError(f"{manifest_path}: '{key}' must be a non-empty string, got {manifest[key]!r}")
    spec = Path(manifest["spec"])
    inside = directory.resolve()
    if spec.is_absolute() or ".." in spec.parts or not (directory / spec).resolve().is_relative_to(inside):
        raise PeftcError(f"{manifest_path}: 'spec' must name a file inside {directory}, got {str(spec)!r}")
    if not (directory / spec).is_file():
        raise PeftcError(f"{manifest_path}: 'spec' names {str(spec)!r}, which is not a file in {directory}")
    return directory, manifest, args.model or manifest["model"]


def cmd_export(args) -> int:
    import torch
    from peftc.compiler.compiled import compile as compile_model, op_histogram
    from peftc.models import load_model
    from peftc.export.onnx import export_onnx
    from peftc.lang.spec import parse_file
    directory, manifest, ref = read_manifest(args)
    with step(f"loading {ref}"):
        base_model = load_model(ref)
    with step("compiling and loading the adapter"):
        model = compile_model(base_model, parse_file(directory / manifest["spec"]))
        model.load_adapter(directory)
    with step("merging"):
        merged = model.merge()
    ids = torch.randint(0, min(base_model.config.vocab_size, 1000), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merge_diff = (merged(ids) - model(ids)).abs().max().item()
    print(f"merged vs unmerged logits: max abs diff {merge_diff:.3g}")
    dequantized = [r for r in merged.folded if r.method == "quant"]
    if dequantized:
        schemes = ", ".join(sorted({r.scheme for r in dequantized}))
        print(f"LoRA folded onto dequant(W) of the {len(dequantized)} {schemes} linears it trained against; "
              f"merged weights are float32")
    target = "nf4" if args.nf4 else "int4" if args.int4 else args.dtype

    def tolerance_of(result) -> float:
        return RELATIVE_TOLERANCE * (result.reference_absmax or 0)

    def check(result) -> str | None:
        """Refuse (before the file takes its final name) an export ONNX Runtime does not run within tolerance."""
        if result.max_abs_diff is None or result.max_abs_diff > tolerance_of(result):
            diff = "no output" if result.max_abs_diff is None else f"max abs diff {result.max_abs_diff:.3g}"
            return f"ONNX Runtime vs torch {diff}, over the tolerance {tolerance_of(result):.3g}"
        return None
    with step(f"exporting {args.onnx} ({target})"):
        if target == "fp32":
            result = export_onnx(merged, args.onnx, check=check)
            print(result)
        else:
            from peftc.export.targets import export_target
            outcome = export_target(merged, args.onnx, target, block=args.block, check=check)
            result = outcome.export
            print(outcome)
    tolerance = tolerance_of(result)
    ok = True              # export_onnx wrote the file only because it passed check()
    if args.compare_base and target != "fp32":
        print(f"--compare-base compares operator counts of the fp32 export; a {target} export has other "
              "operators by design, so it is skipped")
    elif args.compare_base:
        base = compile_model(base_model, "")
        with torch.no_grad():
            effect = (base(ids) - merged(ids)).abs().max().item()
        changes = "the adapter and the quantized base change" if dequantized else "the adapter changes"
        print(f"merged vs base logits: max abs diff {effect:.3g} (what {changes})")
        same_graph = op_histogram(base.graph_module) == op_histogram(merged.graph_module)
        print(f"merged graph ops equal the base graph's: {'yes' if same_graph else 'NO'}")
        base_path = Path(args.onnx).with_name(Path(args.onnx).stem + ".base.onnx")
        with step(f"exporting the base model to {base_path} for comparison"):
            base_result = export_onnx(base, base_path, verify=False)
        equal = base_result.op_counts == result.op_counts
        print(f"ONNX operator counts, merged vs base: {'equal' if equal else 'DIFFERENT'} "
              f"({sum(result.op_counts.values())} vs {sum(base_result.op_counts.values())} nodes)")
        for op in sorted(set(result.op_counts) | set(base_result.op_counts)):
            a, b = result.op_counts.get(op, 0), base_result.op_counts.get(op, 0)
            print(f"  {op:<20} {a:>6} {b:>6}{'' if a == b else '  <-'}")
        ok = ok and equal and same_graph
    if not ok:
        print(f"export check failed: the merged model's operators differ from the base's (ONNX Runtime "
              f"check passed, tolerance {tolerance:.3g}; {args.onnx} is written)", file=sys.stderr)
    return 0 if ok else 1


def cmd_explain(args) -> int:
    from peftc.compiler.compiled import compile as compile_model
    from peftc.compiler.explain import layer_table, prompt_table
    from peftc.models import load_model, load_tokenizer
    from peftc.lang.spec import parse_file
    directory, manifest, ref = read_manifest(args)
    with step(f"loading {ref} and the adapter in {directory}"):
        model = compile_model(load_model(ref), parse_file(directory / manifest["spec"]))
        model.load_adapter(directory)
    print(layer_table(model))
    if any(r.method == "prompt" for r in model.records):
        try:
            tokenizer = load_tokenizer(ref)
        except PeftcError:
            tokenizer = None      # token ids are shown instead of text
        print()
        print(prompt_table(model, tokenizer, top=args.top))
    return 0


def cmd_graph(args) -> int:
    from peftc.compiler.compiled import compile_prepared, prepare
    from peftc.graph.draw import block_svg
    from peftc.fsutil import write_text
    from peftc.lang.spec import parse_file
    spec = parse_file(args.spec)
    with step(f"loading and capturing {args.model}"):
        prepared = prepare(args.model)
    if not 0 <= args.layer < prepared.sites.n_layers:
        raise PeftcError(f"--layer {args.layer}: {args.model} has layers 0..{prepared.sites.n_layers - 1}")
    import copy
    before = copy.deepcopy(prepared.captured.gm)
    model = compile_prepared(prepared, spec)
    write_text(args.out, block_svg(before, model.graph_module, args.layer))
    print(f"wrote {args.out}: layer {args.layer} before and after {args.spec}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="parse a spec file; print it normalized, or its errors")
    p.add_argument("spec")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("methods", help="list the spec language's methods with their options and defaults")
    p.add_argument("method", nargs="?", default=None)
    p.add_argument("--markdown", action="store_true",
                   help="the whole language reference as Markdown (docs/language.md is this output)")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("inspect", help="list a model's linears with their role, layer, shape and fused slices")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("compile", help="compile a model with a spec; write the adapter and a report")
    p.add_argument("spec")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", required=True, help="directory for the adapter, report and graph dump")
    p.add_argument("--seed", type=int, default=0, help="seed for the inserted weights' initialisation (default 0)")
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("explain", help="what an adapter learned: per-layer change of each statement, "
                       "nearest tokens of a soft prompt")
    p.add_argument("dir", help="a directory written by 'peftc compile' or 'peftc train'")
    p.add_argument("--model", default=None, help="override the model named in the directory")
    p.add_argument("--top", type=int, default=5, help="nearest tokens shown per soft-prompt vector")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("graph", help="draw one transformer block before and after a spec's rewrite (SVG)")
    p.add_argument("spec")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--out", required=True, help="the .svg file to write")
    p.set_defaults(func=cmd_graph)
    p = sub.add_parser("export", help="merge a compiled adapter and export verified ONNX")
    p.add_argument("dir", help="a directory written by 'peftc compile'")
    p.add_argument("--onnx", required=True, help="the .onnx file to write")
    p.add_argument("--model", default=None, help="override the model named in the directory")
    p.add_argument("--compare-base", action="store_true",
                   help="also export the base model and compare operator counts (fp32 target)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                        help="float weights of the merged model: fp32 (default) or fp16 (half the file)")
    target.add_argument("--nf4", action="store_true",
                        help="re-quantize the merged weights to NF4, run with com.microsoft.MatMulBnb4")
    target.add_argument("--int4", action="store_true",
                        help="re-quantize the merged weights to blockwise int4, run with com.microsoft.MatMulNBits")
    p.add_argument("--block", type=int, default=None,
                   help="block size for --nf4/--int4 (default: the spec's quant block, else 64)")
    p.set_defaults(func=cmd_export)
    from peftc.cli.train import add_commands as add_train_commands   # train, eval, generate
    add_train_commands(sub)
    return parser


def _fail(message: str) -> int:
    """Print ``peftc: error: message`` (control characters escaped, no C++ stack) and return 1."""
    from peftc.lang.diagnostics import escape
    message = message.split("\nException raised from ")[0]          # torch appends the C++ frames
    print("peftc: error: " + "\n".join(escape(line) for line in message.split("\n")), file=sys.stderr)
    return 1


def _os_error(exc: OSError, args) -> str:
    """An OSError as ``file: reason``; one without a file (a full disk on write) names the command's output."""
    import errno
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"{exc.filename}{f' -> {exc.filename2}' if exc.filename2 else ''}: {reason}"
    output = getattr(args, "out", None) or getattr(args, "onnx", None)
    if output and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {output}: {reason}"
    return reason


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "not enough memory" in text


def main(argv: list[str] | None = None) -> int:
    """Run one command. peftc's own errors are printed without a traceback; so are the failures any input
    can cause that a reader did not turn into one (a safety net: each names what it can), while any other
    exception is a bug in peftc and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except PeftcError as exc:
        return _fail(str(exc))
    except OSError as exc:                      # missing, unreadable or unwritable file, full disk
        return _fail(_os_error(exc, args))
    except UnicodeError as exc:
        return _fail(f"text that is not valid UTF-8 or Unicode: {exc}")
    except json.JSONDecodeError as exc:
        return _fail(f"not valid JSON: {exc}")
    except RecursionError:
        return _fail("input nested too deeply to read (Python's recursion limit)")
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        return _fail(f"out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    except KeyboardInterrupt:    # `peftc train` has said where its last complete checkpoint is
        print("peftc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

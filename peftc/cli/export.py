"""``peftc export``: merge a run directory's adapter and write ONNX that ONNX Runtime has verified."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from peftc.cli.progress import step
from peftc.rundir import load_run, manifest_dtype, read_manifest
from peftc.compiler.compiled import compile as compile_model, op_histogram
from peftc.errors import PeftcError
from peftc.export.adapters import export_onnx_adapter, export_switchable
from peftc.export.genai import export_genai
from peftc.export.gguf import GGUF_TYPES, export_gguf
from peftc.export.hf import export_hf
from peftc.export.onnx import export_onnx
from peftc.export.targets import export_target
from peftc.models import dtype_name

#: ONNX Runtime must match torch within this fraction of the largest logit, on every target. Float32 itself
#: is not closer: on SmolLM2-135M torch's float32 logits (up to 35) are 1.2e-4 (3.4e-6 of 35) from a float64
#: run of the same model, and ONNX Runtime's 9e-5; 2e-5 leaves a margin of six for another CPU's kernels,
#: while a wrong export (a lost adapter, a wrong scale) is off by 1e-2 of the logits or more.
RELATIVE_TOLERANCE = 2e-5


def tolerance_of(result) -> float:
    return RELATIVE_TOLERANCE * (result.reference_absmax or 0)


def check(result) -> str | None:
    """Refuse (before the file takes its final name) an export ONNX Runtime does not run within tolerance."""
    if result.max_abs_diff is None or result.max_abs_diff > tolerance_of(result):
        diff = "no output" if result.max_abs_diff is None else f"max abs diff {result.max_abs_diff:.3g}"
        return f"ONNX Runtime vs torch {diff}, over the tolerance {tolerance_of(result):.3g}"
    return None


def _merged(args):
    """(model reference, its dtype, compiled model with the directory's adapter, its merge, probe ids), with
    the merge's effect printed."""
    directory, manifest, ref = read_manifest(args)
    dtype = manifest_dtype(manifest)
    # in the dtype the run was compiled in, its weights streamed from the checkpoint: every target computes
    # in float32 from these weights (peftc.export.precision), so no float32 copy of a half-precision model
    with step(f"compiling {ref} ({dtype}) and loading the adapter"):
        model = load_run(directory, manifest, ref)
    with step("merging"):
        merged = model.merge()
    ids = torch.randint(0, min(model.config.vocab_size, 1000), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merge_diff = (merged(ids) - model(ids)).abs().max().item()
    print(f"merged vs unmerged logits: max abs diff {merge_diff:.3g}")
    dequantized = [r for r in merged.folded if r.method == "quant"]
    if dequantized:
        schemes = ", ".join(sorted({r.scheme for r in dequantized}))
        print(f"LoRA folded onto dequant(W) of the {len(dequantized)} {schemes} linears it trained against; "
              f"merged weights are {dtype_name(merged.base_dtype)}")
    return ref, dtype, merged, ids, bool(dequantized)


def _compare_base(args, ref: str, dtype: str, merged, ids, dequantized: bool, result) -> bool:
    """Export the base model too and compare operator counts: a merge that folded everything leaves the
    base model's graph. True when they are equal."""
    base = compile_model(ref, "", dtype=dtype)
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
    return equal and same_graph


def _adapters(args) -> int:
    """``--genai OUT --adapter-inputs`` and ``--onnx-adapter FILE --for OUT``: the run's LoRA unmerged, as
    inputs of the decoder and an ONNX Runtime adapter file (peftc.export.adapters)."""
    if args.adapter_inputs and not args.genai:
        raise PeftcError("--adapter-inputs is an option of --genai")
    if bool(args.onnx_adapter) != bool(args.for_dir):
        raise PeftcError("--onnx-adapter FILE takes --for DIR, the directory written by --genai DIR --adapter-inputs")
    if args.nf4 or args.int4 or args.dtype != "fp32" or args.block or args.compare_base:
        raise PeftcError("switchable adapters are exported on the float32 base: --dtype, --nf4, --int4, --block "
                         "and --compare-base do not apply")
    directory, manifest, ref = read_manifest(args)
    with step(f"compiling {ref} and loading the adapter"):
        model = load_run(directory, manifest, ref)
    if args.onnx_adapter:
        with step(f"writing {args.onnx_adapter} for {args.for_dir} and verifying it in ONNX Runtime"):
            print(export_onnx_adapter(model, args.onnx_adapter, args.for_dir, where=str(directory)))
        return 0
    with step(f"writing the KV-cache decoder {args.genai} with adapter inputs and verifying it in ONNX Runtime"):
        print(export_switchable(model, args.genai, directory.resolve().name))
    return 0


def cmd_export(args) -> int:
    if args.adapter_inputs or args.onnx_adapter or args.for_dir:
        return _adapters(args)
    onnx_options = args.nf4 or args.int4 or args.dtype != "fp32" or args.block or args.compare_base
    if (args.hf or args.gguf) and onnx_options:
        raise PeftcError(f"{'--hf' if args.hf else '--gguf'} writes the merged weights itself: --dtype, --nf4, "
                         "--int4 and --block are options of --onnx and --genai, --compare-base of --onnx")
    if args.gguf_type and not args.gguf:
        raise PeftcError("--gguf-type is an option of --gguf")
    if args.genai and args.compare_base:
        raise PeftcError("--compare-base is an option of --onnx")
    ref, dtype, merged, ids, dequantized = _merged(args)
    target = "nf4" if args.nf4 else "int4" if args.int4 else args.dtype
    if args.genai:
        with step(f"writing the KV-cache decoder {args.genai} ({target}) and verifying it in ONNX Runtime"):
            print(export_genai(merged, args.genai, target, block=args.block))
        return 0
    if args.hf:
        with step(f"writing the merged Hugging Face checkpoint {args.hf}"):
            print(export_hf(merged, args.hf))
        return 0
    if args.gguf:
        with step(f"writing {args.gguf}"):
            print(export_gguf(merged, args.gguf, args.gguf_type or "f16"))
        return 0
    with step(f"exporting {args.onnx} ({target})"):
        if target == "fp32":
            result = export_onnx(merged, args.onnx, check=check)
            print(result)
        else:
            outcome = export_target(merged, args.onnx, target, block=args.block, check=check)
            result = outcome.export
            print(outcome)
    # the file is written: export_onnx gave it its name only because it passed check()
    if args.compare_base and target != "fp32":
        print(f"--compare-base compares operator counts of the fp32 export; a {target} export has other "
              "operators by design, so it is skipped")
    elif args.compare_base and not _compare_base(args, ref, dtype, merged, ids, dequantized, result):
        print(f"export check failed: the merged model's operators differ from the base's (ONNX Runtime "
              f"check passed, tolerance {tolerance_of(result):.3g}; {args.onnx} is written)", file=sys.stderr)
        return 1
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="merge a compiled adapter and export verified ONNX (whole-sequence or KV-cache), "
                                      "a Hugging Face checkpoint or GGUF")
    p.add_argument("dir", help="a directory written by 'peftc compile'")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--onnx", help="the .onnx file to write (whole sequences in, logits out)")
    out.add_argument("--genai", metavar="DIR", help="write a KV-cache ONNX decoder with genai_config.json and the "
                                                    "tokenizer: ONNX Runtime GenAI generates from DIR")
    out.add_argument("--hf", metavar="DIR", help="write the merged model as a Hugging Face checkpoint directory "
                                                  "(config.json, safetensors in the run's dtype, tokenizer files)")
    out.add_argument("--gguf", metavar="FILE", help="write the merged model as one GGUF file (LLaMA family)")
    out.add_argument("--onnx-adapter", metavar="FILE", help="write the run's LoRA as an ONNX Runtime adapter file "
                                                          "(.onnx_adapter) for the decoder in --for DIR")
    p.add_argument("--adapter-inputs", action="store_true",
                   help="with --genai: keep LoRA unmerged as named graph inputs (base model when none is fed) and "
                        "write DIR/adapters/<run>.onnx_adapter; ONNX Runtime and onnxruntime-genai switch adapters")
    p.add_argument("--for", dest="for_dir", metavar="DIR", default=None,
                   help="with --onnx-adapter: the --genai DIR --adapter-inputs directory the adapter is for")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                   help="tensor type of --gguf's 2-D weights (default f16; norms stay f32)")
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

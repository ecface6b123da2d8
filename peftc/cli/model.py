"""What a model and an adapter look like: ``peftc inspect`` (linears and stacked expert weights with role,
layer, shape and fused slices), ``peftc graph`` (one block before and after a rewrite, as SVG) and
``peftc explain`` (what an adapter learned)."""
from __future__ import annotations

import copy
import json

from peftc.cli.loading import add_dtype_option
from peftc.cli.progress import step
from peftc.rundir import load_run, read_manifest
from peftc.compiler.compiled import compile_prepared, prepare
from peftc.compiler.explain import layer_table, prompt_table
from peftc.errors import PeftcError
from peftc.fsutil import write_text
from peftc.graph.capture import strip_prefix
from peftc.graph.draw import block_svg
from peftc.graph.slices import describe, ranges
from peftc.lang.spec import parse_file
from peftc.models import DEFAULT_MODEL, load_tokenizer


def _linears(prepared) -> tuple[list[dict], dict | None]:
    """Each linear site and stacked expert weight as a row, and the token embedding, of a prepared (captured
    and analysed) model."""
    sites = prepared.sites
    rows = [{"path": s.path, "role": s.role, "layer": s.layer, "kind": s.kind,
             "in_features": s.in_features, "out_features": s.out_features, "bias": s.bias is not None,
             "slices": {role: ranges(features) for role, features in (s.slices or {}).items()},
             **({"experts": s.experts} if s.experts else {})}
            for s in sites.linears + sites.experts]
    embed = None
    if sites.embed is not None:
        vocab, hidden = prepared.captured.gm.get_parameter(sites.embed).shape
        path = sites.embed_path or strip_prefix(sites.embed.rsplit(".", 1)[0])
        embed = {"path": path, "vocab": vocab, "hidden": hidden}
    return rows, embed


def cmd_inspect(args) -> int:
    args.model = args.model_option or args.model
    with step(f"building {args.model} from its config and capturing it"):
        prepared = prepare(args.model, args.dtype, weights=False)       # shapes and roles need no weights
    sites = prepared.sites
    rows, embed = _linears(prepared)
    if args.json:
        print(json.dumps({"model": args.model, "kind": prepared.captured.kind, "layers": sites.n_layers,
                          "attentions": sites.attention_count, "embed": embed, "linears": rows}, indent=2))
        return 0
    stacked = f" and {len(sites.experts)} stacked expert weights (experts x out x in)" if sites.experts else ""
    print(f"{args.model}: {prepared.captured.kind}, {sites.n_layers} layers, {sites.attention_count} attentions, "
          f"{len(sites.linears)} linears{stacked}")
    width = max([len(r["path"]) for r in rows] + [len(embed["path"]) if embed else 0])
    print(f"{'layer':>5}  {'role':<7}  {'module path':<{width}}  {'shape (out x in)':>16}  {'kind':<6}  "
          "fused slices (output rows)")
    if embed:
        shape = f"{embed['vocab']} x {embed['hidden']}"
        print(f"{'-':>5}  {'embed':<7}  {embed['path']:<{width}}  {shape:>16}  embedding")
    for r, site in zip(rows, sites.linears + sites.experts):
        layer = "-" if r["layer"] is None else r["layer"]
        shape = f"{site.experts} x " * bool(site.experts) + f"{r['out_features']} x {r['in_features']}"
        fused = " | ".join(f"{role} {describe(f)}" for role, f in (site.slices or {}).items())
        print(f"{layer:>5}  {r['role'] or '?':<7}  {r['path']:<{width}}  {shape:>16}  {r['kind']:<6}  {fused}".rstrip())
    return 0


def cmd_graph(args) -> int:
    spec = parse_file(args.spec)
    with step(f"loading and capturing {args.model}"):
        prepared = prepare(args.model, args.dtype)
    if not 0 <= args.layer < prepared.sites.n_layers:
        raise PeftcError(f"--layer {args.layer}: {args.model} has layers 0..{prepared.sites.n_layers - 1}")
    before = copy.deepcopy(prepared.captured.gm)
    model = compile_prepared(prepared, spec)
    write_text(args.out, block_svg(before, model.graph_module, args.layer))
    print(f"wrote {args.out}: layer {args.layer} before and after {args.spec}")
    return 0


def cmd_explain(args) -> int:
    directory, manifest, ref = read_manifest(args)
    with step(f"loading {ref} and the adapter in {directory}"):
        model = load_run(directory, manifest, ref, args.dtype)
    print(layer_table(model))
    if any(r.method == "prompt" for r in model.records):
        try:
            tokenizer = load_tokenizer(ref)
        except PeftcError:
            tokenizer = None      # token ids are shown instead of text
        print()
        print(prompt_table(model, tokenizer, top=args.top))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("inspect", help="list a model's linears (and stacked expert weights) with their role, layer, "
                       "shape and fused slices")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--model", dest="model_option", default=None, help="the model, as the positional argument "
                   "(a directory with only config.json will do: no weight is read)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_dtype_option(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("explain", help="what an adapter learned: per-layer change of each statement, "
                       "nearest tokens of a soft prompt")
    p.add_argument("dir", help="a directory written by 'peftc compile' or 'peftc train'")
    p.add_argument("--model", default=None, help="override the model named in the directory")
    p.add_argument("--top", type=int, default=5, help="nearest tokens shown per soft-prompt vector")
    add_dtype_option(p, None, "; default: as the directory's manifest says")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("graph", help="draw one transformer block before and after a spec's rewrite (SVG)")
    p.add_argument("spec")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--out", required=True, help="the .svg file to write")
    add_dtype_option(p)
    p.set_defaults(func=cmd_graph)

"""``peftc compile``: compile a model with a spec and write the run directory (adapter, report, graph)."""
from __future__ import annotations

from pathlib import Path

from peftc.cli.loading import add_adapter_dtype_option, add_dtype_option
from peftc.cli.progress import step
from peftc.rundir import check_replaceable, write_compiled
from peftc.compiler.compiled import compile_prepared, prepare
from peftc.lang.spec import parse_file
from peftc.models import DEFAULT_MODEL


def cmd_compile(args) -> int:
    spec = parse_file(args.spec)
    out = Path(args.out)
    check_replaceable(out)
    with step(f"loading and capturing {args.model}"):
        prepared = prepare(args.model, args.dtype)
    with step(f"compiling {args.spec}"):
        model = compile_prepared(prepared, spec, seed=args.seed, autocast_adapter_dtype=args.autocast_adapter_dtype)
    report = model.report()
    written = write_compiled(out, model, spec, args.model, report)
    print(report)
    print(f"\nwrote {out}/: {', '.join(written)}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("compile", help="compile a model with a spec; write the adapter and a report")
    p.add_argument("spec")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", required=True, help="directory for the adapter, report and graph dump")
    p.add_argument("--seed", type=int, default=0, help="seed for the inserted weights' initialisation (default 0)")
    add_dtype_option(p)
    add_adapter_dtype_option(p)
    p.set_defaults(func=cmd_compile)

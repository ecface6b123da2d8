"""``peftc compile``: compile a model with a spec and write the run directory (adapter, report, graph)."""
from __future__ import annotations

from pathlib import Path

from peftc.cli.loading import add_adapter_dtype_option, add_dtype_option
from peftc.cli.progress import step
from peftc.rundir import check_replaceable, write_compiled
from peftc.compiler.compiled import compile_prepared, prepare
from peftc.errors import PeftcError
from peftc.lang.spec import parse_file
from peftc.models import DEFAULT_MODEL


def cmd_compile(args) -> int:
    spec = parse_file(args.spec)
    if args.out is None and not args.dry_run:
        raise PeftcError("give --out DIR for the run directory, or --dry-run to print the report only")
    out = Path(args.out) if args.out else None
    if out is not None:
        check_replaceable(out)
    what = "building from its config" if args.dry_run else "loading"
    with step(f"{what} and capturing {args.model}"):
        prepared = prepare(args.model, args.dtype, weights=not args.dry_run)
    with step(f"compiling {args.spec}"):
        model = compile_prepared(prepared, spec, seed=args.seed, autocast_adapter_dtype=args.autocast_adapter_dtype)
    report = model.report()
    if args.dry_run:       # the weights are on the meta device: nothing to write
        print(report)
        return 0
    written = write_compiled(out, model, spec, args.model, report)
    print(report)
    print(f"\nwrote {out}/: {', '.join(written)}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("compile", help="compile a model with a spec; write the adapter and a report")
    p.add_argument("spec")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", default=None, help="directory for the adapter, report and graph dump")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model from its config alone (no weight is read; a directory with only "
                        "config.json will do), compile, print the report and write nothing")
    p.add_argument("--seed", type=int, default=0, help="seed for the inserted weights' initialisation (default 0)")
    add_dtype_option(p)
    add_adapter_dtype_option(p)
    p.set_defaults(func=cmd_compile)

"""``peftc check`` (parse a spec, print it normalized) and ``peftc methods`` (the language reference)."""
from __future__ import annotations

from peftc.compiler.passmanager import load_passes
from peftc.lang.reference import markdown, method_reference
from peftc.lang.spec import parse_file


def cmd_check(args) -> int:
    print(parse_file(args.spec).format(), end="")
    return 0


def cmd_methods(args) -> int:
    print(markdown() if args.markdown else method_reference(load_passes(), args.method), end="")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("check", help="parse a spec file; print it normalized, or its errors")
    p.add_argument("spec")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("methods", help="list the spec language's methods with their options and defaults")
    p.add_argument("method", nargs="?", default=None)
    p.add_argument("--markdown", action="store_true",
                   help="the whole language reference as Markdown (docs/language.md is this output)")
    p.set_defaults(func=cmd_methods)

"""README.md and docs/*.md stay true to the code: their shell blocks parse, every ``peftc`` command and
option they show exists, their spec examples parse, their relative links resolve, and the README stays
short. Fast: no model is loaded, nothing is run but ``bash -n``."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import peftc

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12_000          # bytes, as `wc -c README.md` counts them
SHELL_INFO = {"bash", "sh", "shell"}
SHELL_OPERATORS = {";", "&", "&&", "|", "||", "(", ")", ">", ">>", "<", "<<", ">&", "<&", "|&", ";;"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """(info string, line number of the opening fence, text) of every fenced code block."""
    blocks, info, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if info is None:
                info, start, lines = line[3:].strip(), number, []
            else:
                blocks.append((info, start, "\n".join(lines) + "\n"))
                info = None
        elif info is not None:
            lines.append(line)
    assert info is None, f"a fence opened at line {start} is never closed"
    return blocks


def prose(text: str) -> str:
    """The text outside fenced code blocks (fence lines and their contents blanked)."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            out.append("")
        else:
            out.append("" if inside else line)
    return "\n".join(out)


def shell_blocks() -> list[tuple[Path, int, str]]:
    return [(page, start, block) for page in PAGES for info, start, block in
            fenced_blocks(page.read_text(encoding="utf-8")) if info in SHELL_INFO]


# --- the real command line ------------------------------------------------------------------------

def subcommands() -> dict[str, set[str]]:
    """Each ``peftc`` subcommand with its option strings, from the real argparse parser."""
    from peftc.cli import build_parser
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices
    return {name: set(sub._option_string_actions) for name, sub in choices.items()}


COMMANDS = subcommands()


def logical_lines(block: str) -> list[str]:
    """Lines with backslash continuations joined and a leading ``$ `` prompt removed."""
    out, pending = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\") and not line.lstrip().startswith("#"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        stripped = line.lstrip()
        out.append(stripped[2:] if stripped.startswith("$ ") else stripped)
    if pending:
        out.append(pending)
    return out


def tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def peftc_invocations(line: str) -> list[list[str]]:
    """The arguments after ``peftc`` of each simple command in ``line`` that runs peftc: ``peftc ...``,
    ``.venv/bin/peftc ...``, or ``... -m peftc.cli ...`` (``python -m``, ``torchrun -m``)."""
    found, command = [], []
    for token in tokens(line) + [";"]:
        if token not in SHELL_OPERATORS:
            command.append(token)
            continue
        if command:
            if command[0] in ("peftc", ".venv/bin/peftc"):
                found.append(command[1:])
            else:
                for i in range(len(command) - 1):
                    if command[i] == "-m" and command[i + 1] == "peftc.cli":
                        found.append(command[i + 2:])
                        break
        command = []
    return found


def check_invocation(args: list[str], where: str) -> list[str]:
    if not args:
        return [f"{where}: 'peftc' without a subcommand"]
    sub, rest = args[0], args[1:]
    if sub in ("-h", "--help"):
        return []
    if sub not in COMMANDS:
        return [f"{where}: 'peftc {sub}' is not a subcommand (there are: {', '.join(COMMANDS)})"]
    bad = []
    for arg in rest:
        if arg == "--":
            break
        if arg.startswith("--"):
            option = arg.split("=", 1)[0]
            if option not in COMMANDS[sub]:
                bad.append(f"{where}: 'peftc {sub}' has no option {option} "
                           f"(it has: {', '.join(sorted(o for o in COMMANDS[sub] if o.startswith('--')))})")
    return bad


def test_the_parser_introspection_sees_the_commands():
    # a guard on the private argparse attributes the checks below read
    assert {"check", "compile", "export", "train"} <= set(COMMANDS)
    assert "--onnx" in COMMANDS["export"] and "--data" in COMMANDS["train"]


# --- (1) every shell block parses -------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_shell_block_parses_as_bash():
    blocks = shell_blocks()
    assert len(blocks) >= 5
    bad = []
    for page, start, block in blocks:
        result = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        if result.returncode != 0:
            bad.append(f"{rel(page)}:{start}: {result.stderr.strip()}")
    assert not bad, "\n".join(bad)


# --- (2) every peftc command and option shown exists ------------------------------------------------

def test_every_peftc_command_in_a_shell_block_exists_with_its_options():
    bad, seen = [], 0
    for page, start, block in shell_blocks():
        for line in logical_lines(block):
            try:
                invocations = peftc_invocations(line)
            except ValueError as e:                          # unbalanced quotes: bash -n reports the block
                bad.append(f"{rel(page)}:{start}: cannot split {line!r}: {e}")
                continue
            for args in invocations:
                seen += 1
                bad += check_invocation(args, f"{rel(page)} (block at line {start}): {line.strip()!r}")
    assert seen >= 10, "the pages should show the commands"
    assert not bad, "\n".join(bad)


def test_every_peftc_command_in_inline_code_exists_with_its_options():
    """`peftc SUBCOMMAND ...` in running text and tables: the subcommand and each --option exist."""
    bad = []
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", prose(page.read_text(encoding="utf-8"))):
            if not span.startswith("peftc "):
                continue
            words = span.split()
            options = re.findall(r"--[A-Za-z][\w-]*", span)
            bad += check_invocation([words[1], *options], f"{rel(page)}: `{span}`")
    assert not bad, "\n".join(bad)


def test_a_misspelt_option_or_command_is_caught():
    assert check_invocation(["export", "out/x", "--onnx", "x.onnx"], "ok") == []
    assert check_invocation(["export", "out/x", "--onx", "x.onnx"], "typo")
    assert check_invocation(["exprot", "out/x"], "typo")
    line = logical_lines("peftc train s.peft --data d.jsonl \\\n    --stpes 3 --out o\n")[0]
    assert check_invocation(peftc_invocations(line)[0], "typo")
    assert peftc_invocations("torchrun --nproc_per_node 2 -m peftc.cli eval --data d > log") == [["eval", "--data", "d"]]


# --- spec examples in the docs parse (tests/project/test_readme.py does the README's) ----------------------

def method_keywords() -> set[str]:
    from peftc.methods import METHODS
    return set(METHODS)


def test_every_spec_example_in_the_docs_parses():
    keywords, bad, seen = method_keywords(), [], 0
    for page in PAGES:
        for info, start, block in fenced_blocks(page.read_text(encoding="utf-8")):
            words = [line.split()[0] for line in block.splitlines() if line.strip() and not line.startswith("#")]
            if info or not words or words[0] not in keywords:
                continue
            seen += 1
            try:
                spec = peftc.parse(block)
                assert peftc.parse(spec.format()) == spec
            except (ValueError, AssertionError) as e:
                bad.append(f"{rel(page)}:{start}: {e}")
    assert seen >= 4
    assert not bad, "\n".join(bad)


# --- (3) the README stays short ---------------------------------------------------------------------

def test_readme_is_at_most_12_kb():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move detail to docs/"


# --- (4) every relative link resolves ---------------------------------------------------------------

def slugs(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown text."""
    out, counts = set(), {}
    for line in prose(text).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_every_relative_link_resolves():
    bad, seen = [], 0
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):          # http:, https:, mailto:
                continue
            seen += 1
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                bad.append(f"{rel(page)}: link to {target}: no file {file}")
            elif anchor and file.suffix == ".md" and anchor not in slugs(file.read_text(encoding="utf-8")):
                bad.append(f"{rel(page)}: link to {target}: no heading with anchor #{anchor} in {rel(file)}")
    assert seen >= 10
    assert not bad, "\n".join(bad)


def test_the_language_reference_is_generated_from_the_option_declarations():
    """docs/language.md is what ``peftc methods --markdown`` writes from the methods' declarations: a changed
    option without a regenerated page fails here."""
    from peftc.lang.reference import markdown
    page = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    assert page == markdown(), "docs/language.md is stale: run `peftc methods --markdown > docs/language.md`"

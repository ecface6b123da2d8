"""The README's spec examples and option table stay true to the language."""
from pathlib import Path

import peftc
from peftc.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def fenced_blocks() -> list[tuple[str, str]]:
    """(info string, text) of every fenced code block."""
    blocks, info, lines = [], None, []
    for line in README.splitlines():
        if line.startswith("```"):
            if info is None:
                info, lines = line[3:].strip(), []
            else:
                blocks.append((info, "\n".join(lines) + "\n"))
                info = None
        elif info is not None:
            lines.append(line)
    return blocks


def spec_blocks() -> list[str]:
    """Blocks without a language whose first statement starts with a method keyword."""
    out = []
    for info, text in fenced_blocks():
        words = [line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if not info and words and words[0] in METHODS:
            out.append(text)
    return out


def test_every_spec_example_in_the_readme_parses():
    blocks = spec_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        spec = peftc.parse(block)
        assert spec.statements
        assert peftc.parse(spec.format()) == spec


def test_every_sample_parses_and_the_lora_ones_compile(tiny):
    for path in sorted((ROOT / "samples").glob("*.peft")):
        spec = peftc.parse_file(path)
        if {s.method for s in spec.statements} == {"lora"}:
            assert peftc.compile(tiny("tiny-llama"), spec).report().trainable > 0


def test_option_table_names_every_declared_option():
    table = README.split("**Methods and options.**", 1)[1].split("\n\n", 2)[1]
    rows = {line.split("|")[1].strip().strip("`").split()[0]: line for line in table.splitlines()[2:]}
    assert set(rows) == set(METHODS)
    for keyword, method in METHODS.items():
        for option in method.options:
            assert f"`{option.name}`" in rows[keyword], (keyword, option.name)

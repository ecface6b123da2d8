"""Mistakes in spec text: each is reported at its line and column, with the message a user reads."""
import pytest

from peftc.lang.diagnostics import Diagnostic, Span, SpecError, render
from peftc.lang.spec import parse

TARGET = 'a target (a role word, a "glob" or a /regex/)'

# (spec text, line, column, message, hint)
MISTAKES = [
    ("lora q @ r=4", 1, 8, "unexpected character '@'", None),
    ('lora "model.layers ; r=4', 1, 6, 'unterminated string: no closing " before the end of the line', None),
    ("lora /model.* r=4", 1, 6, "unterminated regex: no closing / before the end of the line", None),
    ("lora q,, v", 1, 8, f"unexpected ','; expected {TARGET}", None),
    ("lora q,", 1, 8, f"unexpected end of statement; expected {TARGET}", None),
    ("lora q r=8 v", 1, 12, "unexpected 'v'; expected ',', '..', key=value or end of statement", None),
    ("lroa q, v", 1, 1, "unknown method 'lroa'", "did you mean 'lora'?"),
    ("r=8", 1, 1, "unknown method 'r'",
     "a statement starts with one of lora, quant, prefix, prompt, adapter, ia3, bitfit, full"),
    ("lora q, v aplha=16", 1, 11, "unknown option 'aplha' for lora", "did you mean 'alpha'?"),
    ("bitfit rank=4", 1, 8, "unknown option 'rank' for bitfit", "bitfit options: layers, exclude"),
    ("lora q r=1.5", 1, 10, "option 'r' of lora expects an integer, got '1.5'", None),
    ("lora q r=0", 1, 10, "option 'r' of lora must be >= 1, got '0'", None),
    ("lora q dropout=1", 1, 16, "option 'dropout' of lora must be < 1, got '1'", None),
    ("lora q alpha=0", 1, 14, "option 'alpha' of lora must be > 0, got '0'", None),
    ("quant nf4 block=48", 1, 17,
     "option 'block' of quant must be one of 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, got '48'", None),
    ("lora q r=4 alpha=8 r=8", 1, 20, "option 'r' given twice", "it was first given at column 8"),
    ("lora q, vv", 1, 9, "unknown role 'vv'", "did you mean 'v'?"),
    ("lora q, base", 1, 9, "role 'base' is only meaningful for quant", "did you mean 'all-linear'?"),
    ("lora q v", 1, 8, "missing ',' before target 'v'", None),
    ("lora /(/", 1, 6, "invalid regex /(/: missing ), unterminated subpattern at position 0", None),
    ("lora q, \"\"", 1, 9, "empty glob", 'a glob matches module paths, e.g. "model.layers.*.mlp.up_proj"'),
    ('prompt tokens=4 init="a\\qb"', 1, 22, "unknown escape '\\q' in string", 'escapes are \\\\ \\" \\n \\r \\t'),
    ("prefix q tokens=4", 1, 8, "prefix takes no targets", "prefix options: tokens, project, layers"),
    ("lora r=8", 1, 1, 'lora needs targets: role words, "globs" or /regexes/', "e.g. 'lora q, v'"),
    ("quant base", 1, 7, "quant needs its scheme first: nf4 or int8", None),
    ("quant", 1, 1, "quant needs its scheme first: nf4 or int8", None),
    ("quant nf5 base", 1, 7, "unknown scheme 'nf5' for quant; expected nf4 or int8", "did you mean 'nf4'?"),
    ("quant nf4, base", 1, 12, "quant's scheme is followed by a space, not ','", "write 'quant nf4 base'"),
    ("prefix project=64", 1, 1, "prefix needs option 'tokens'", "tokens=<int>: number of virtual tokens"),
    ("lora q layers=5..2", 1, 15, "empty layer range '5..2'", "did you mean '2..5'?"),
    ("lora q layers=-1", 1, 15, "layer indices cannot be negative, got '-1'", None),
    ("lora q layers=0.5", 1, 15, "option 'layers' of lora expects layer indices and ranges such as 0..3,8, "
     "got '0.5'", None),
    ("lora q init=xavier", 1, 13, "option 'init' of lora must be one of zero, gaussian, random, got 'xavier'", None),
    ("lora q init=gausian", 1, 13, "option 'init' of lora must be one of zero, gaussian, random, got 'gausian'",
     "did you mean 'gaussian'?"),
    ("lora q rslora=maybe", 1, 15, "option 'rslora' of lora expects true or false, got 'maybe'", None),
    ("lora q rslora=ture", 1, 15, "option 'rslora' of lora expects true or false, got 'ture'",
     "did you mean 'true'?"),
    ("lora q r=", 1, 8, "missing value after 'r='", "r=<int>: rank of the update"),
    ("lora q r=4,8", 1, 12, "option 'r' of lora takes one value, not a list", None),
    ("adapter after=attn,attn", 1, 20, "option 'after' of adapter lists attn twice", None),
    ("adapter after=mlp", 1, 15, "option 'after' of adapter must be one of attn, ffn, got 'mlp'", None),
    ("lora q exclude=qq", 1, 16, "unknown role 'qq'", "did you mean 'q'?"),
    ("# ok\nbitfit\r\nquant nf4; lora q\taplha=1", 3, 19, "unknown option 'aplha' for lora",
     "did you mean 'alpha'?"),
]


@pytest.mark.parametrize("text, line, column, message, hint", MISTAKES, ids=[m[3][:40] for m in MISTAKES])
def test_mistake_is_reported_where_it_is(text, line, column, message, hint):
    with pytest.raises(SpecError) as caught:
        parse(text)
    err = caught.value
    assert len(err.diagnostics) == 1, str(err)
    diagnostic = err.diagnostics[0]
    assert (err.line, err.column) == (line, column)
    assert (diagnostic.span.line, diagnostic.span.column) == (line, column)
    assert diagnostic.message == message
    assert diagnostic.hint == hint


def test_mistakes_are_distinct():
    assert len({m[3] for m in MISTAKES}) >= 18


def test_every_mistake_in_a_file_is_reported_in_order():
    text = ("lora q, v aplha=16\n"
            "quant nf4 base\n"
            "prefix tokens=4 ; lora q @\n"
            "lroa v\n")
    with pytest.raises(SpecError) as caught:
        parse(text, "three.peft")
    err = caught.value
    assert [(d.span.line, d.span.column, d.message) for d in err.diagnostics] == [
        (1, 11, "unknown option 'aplha' for lora"),
        (3, 26, "unexpected character '@'"),
        (4, 1, "unknown method 'lroa'"),
    ]
    assert (err.line, err.column, err.filename) == (1, 11, "three.peft")
    rendered = str(err)
    assert rendered.index("three.peft:1:11:") < rendered.index("three.peft:3:26:") < rendered.index("three.peft:4:1:")


def test_several_mistakes_in_one_statement_are_all_reported():
    with pytest.raises(SpecError) as caught:
        parse("lora qq r=0 dropout=2")
    assert [d.span.column for d in caught.value.diagnostics] == [6, 11, 21]


def test_rendering_has_source_line_and_caret():
    with pytest.raises(SpecError) as caught:
        parse("quant nf4 base\nlora q, v aplha=16\n", "samples/bad.peft")
    assert str(caught.value) == (
        "samples/bad.peft:2:11: error: unknown option 'aplha' for lora; did you mean 'alpha'?\n"
        "    lora q, v aplha=16\n"
        "              ^^^^^")


def test_rendering_without_filename_keeps_tabs_and_marks_end_of_statement():
    with pytest.raises(SpecError) as caught:
        parse("\tlora q,")
    assert str(caught.value).splitlines() == [
        f"<spec>:1:9: error: unexpected end of statement; expected {TARGET}",
        "    \tlora q,",
        "    \t       ^"]


def test_compiler_can_raise_for_a_statement_span():
    spec = parse("lora q\nlora \"*.nope\" r=2\n", "s.peft")
    err = SpecError.at(spec.statements[1].span, "'lora ...' selects nothing in the model", spec.source,
                       hint="the model has q (4)")
    assert (err.line, err.column, err.filename) == (2, 1, "s.peft")
    assert str(err).splitlines() == [
        "s.peft:2:1: error: 'lora ...' selects nothing in the model; the model has q (4)",
        '    lora "*.nope" r=2',
        "    ^^^^^^^^^^^^^^^^^"]


def test_render_without_source_gives_the_first_line_only():
    diagnostic = Diagnostic("boom", Span(3, 2, 3, 4))
    assert render(diagnostic, None) == "<spec>:3:2: error: boom"
    assert render(diagnostic, "one line") == "<spec>:3:2: error: boom"


def test_spec_error_needs_a_diagnostic():
    with pytest.raises(ValueError, match="at least one diagnostic"):
        SpecError([])

"""Spec text to IR: every statement form, separators and comments, normalized text, and round trips."""
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftc.lang import spec as spec_module
from peftc.lang.diagnostics import visible
from peftc.methods import METHODS
from peftc.lang.spec import LayerSelection, Target, grammar_text, parse, parse_file, quote

LORA_DEFAULTS = {"r": 8, "alpha": 8.0, "dropout": 0.0, "rslora": False, "init": "zero", "layers": None,
                 "attn": None, "exclude": None}


def one(text: str):
    spec = parse(text)
    assert len(spec.statements) == 1
    return spec.statements[0]


def targets(statement):
    return [(t.kind, t.value) for t in statement.targets]


def test_quant_takes_its_scheme_then_targets():
    s = one("quant nf4 base")
    assert (s.method, s.leading, targets(s)) == ("quant", "nf4", [("role", "base")])
    assert dict(s.options) == {"block": 64, "double_quant": True, "layers": None, "exclude": None}
    assert s.explicit == frozenset()


def test_quant_without_targets_gets_base():
    s = one("quant int8")
    assert (s.leading, targets(s)) == ("int8", [("role", "base")])
    assert s.targets[0].span.column == 1        # the default points at the method word


def test_lora_roles_and_typed_options_with_defaults():
    s = one("lora q, v r=8 alpha=16 dropout=0.05")
    assert targets(s) == [("role", "q"), ("role", "v")]
    assert dict(s.options) == {**LORA_DEFAULTS, "alpha": 16.0, "dropout": 0.05}
    assert type(s.options["alpha"]) is float and type(s.options["r"]) is int
    assert s.explicit == {"r", "alpha", "dropout"}


def test_layer_range_is_inclusive():
    s = one("lora up, down r=4 layers=20..29")
    layers = s.options["layers"]
    assert layers == LayerSelection(((20, 29),))
    assert layers.contains(20) and layers.contains(29) and not layers.contains(30) and not layers.contains(19)
    assert layers.indices(25) == (20, 21, 22, 23, 24)


def test_layer_list_keeps_what_was_written():
    layers = one("lora q layers=8,0..3,3..3").options["layers"]
    assert layers.parts == ((8, 8), (0, 3), (3, 3))
    assert str(layers) == "8,0..3,3"
    assert layers.indices(10) == (0, 1, 2, 3, 8)


def test_glob_and_regex_targets():
    glob = one('lora "model.layers.*.mlp.gate_proj" r=4')
    assert targets(glob) == [("glob", "model.layers.*.mlp.gate_proj")]
    regex = one(r"lora /model\.layers\.[0-3]\..*/ r=4")
    assert targets(regex) == [("regex", r"model\.layers\.[0-3]\..*")]
    assert regex.options["r"] == 4


def test_exclude_takes_the_target_forms():
    s = one(r'lora q, v exclude="model.layers.0.*",/.*\.k_proj/,o')
    assert [(t.kind, t.value) for t in s.options["exclude"]] == [
        ("glob", "model.layers.0.*"), ("regex", r".*\.k_proj"), ("role", "o")]


def test_prefix_and_prompt():
    prefix = one("prefix tokens=16 project=128")
    assert (prefix.targets, dict(prefix.options)) == ((), {"tokens": 16, "project": 128, "layers": None})
    prompt = one('prompt tokens=8 init="Classify:"')
    assert dict(prompt.options) == {"tokens": 8, "init": "Classify:"}


def test_adapter_names_list_and_defaults():
    s = one("adapter after=attn,ffn bottleneck=64 act=gelu parallel=false")
    assert dict(s.options) == {"after": ("attn", "ffn"), "bottleneck": 64, "act": "gelu", "parallel": False,
                               "scale": 1.0, "layers": None}
    assert one("adapter after=ffn").options["after"] == ("ffn",)


def test_ia3_bitfit_full():
    ia3 = one("ia3 k, v, down")
    assert targets(ia3) == [("role", "k"), ("role", "v"), ("role", "down")] and ia3.options["init"] == "ones"
    bitfit = one("bitfit")
    assert bitfit.targets == () and dict(bitfit.options) == {"layers": None, "exclude": None}
    full = one("full o layers=0")
    assert targets(full) == [("role", "o")] and full.options["layers"].parts == ((0, 0),)


def test_all_role_words_and_hyphen():
    assert targets(one("full q,k,v,o,gate,up,down,attn,ffn,all-linear,embed,head")) == [
        ("role", r) for r in ("q", "k", "v", "o", "gate", "up", "down", "attn", "ffn", "all-linear", "embed", "head")]


def test_string_escapes_and_separators_inside_strings_and_regexes():
    s = one(r'prompt tokens=2 init="say \"hi\"; # not a comment\\ \n"')
    assert s.options["init"] == 'say "hi"; # not a comment\\ \n'
    assert targets(one(r"lora /a;b#c\/d/")) == [("regex", r"a;b#c\/d")]


def test_comments_semicolons_blank_lines_and_crlf():
    text = "# header\r\n\r\nquant nf4 base ; lora q r=2 # trailing\r\n  ;;\r\n\tlora v # ; not a split\r\n"
    spec = parse(text, "x.peft")
    assert [s.method for s in spec.statements] == ["quant", "lora", "lora"]
    assert [(s.span.line, s.span.column) for s in spec.statements] == [(3, 1), (3, 18), (5, 2)]
    assert spec.statements[2].targets[0].value == "v"
    assert spec.statements[1].span.filename == "x.peft" and spec.filename == "x.peft" and spec.source == text


def test_spans_are_absolute():
    s = parse("bitfit\nquant nf4; lora q,  v  alpha=16 r=2").statements[2]
    assert (s.span.line, s.span.column, s.span.end_column) == (2, 12, 36)
    assert [(t.span.line, t.span.column, t.span.end_column) for t in s.targets] == [(2, 17, 18), (2, 21, 22)]
    assert (s.option_spans["alpha"].column, s.option_spans["alpha"].end_column) == (24, 32)
    assert set(s.option_spans) == {"alpha", "r"}


def test_empty_spec():
    assert parse("").statements == () and parse("# nothing\n\n;\n").format() == ""


def test_normalized_format():
    spec = parse("quant nf4 base\n"
                 "lora q,v   alpha=16 r=8 dropout=0.05 layers=0..3,8,2..2 # note\n"
                 'lora "a.*\\"b" exclude=/x\\.y/ alpha=0.5 rslora=true\n'
                 "prefix tokens=16; prompt init=\"Classify:\" tokens=8\n"
                 "adapter after=ffn scale=-2.5\n"
                 "bitfit exclude=head\n")
    assert spec.format() == (
        "quant nf4 base block=64 double_quant=true\n"
        "lora q, v r=8 alpha=16 dropout=0.05 rslora=false init=zero layers=0..3,8,2\n"
        'lora "a.*\\"b" r=8 alpha=0.5 dropout=0 rslora=true init=zero exclude=/x\\.y/\n'
        "prefix tokens=16\n"
        'prompt tokens=8 init="Classify:"\n'
        "adapter after=ffn bottleneck=64 act=relu parallel=false scale=-2.5\n"
        "bitfit exclude=head\n")
    assert str(spec.statements[3]) == "prefix tokens=16"
    assert parse(spec.format()) == spec


def test_equality_ignores_spans_and_source():
    assert parse("lora q r=8") == parse("# c\n\n   lora  q   r = 8   ", "other.peft")
    assert parse("lora q r=8") != parse("lora q r=9")


def test_parse_file(tmp_path):
    path = tmp_path / "s.peft"
    path.write_text("lora q\n", encoding="utf-8")
    spec = parse_file(path)
    assert spec.filename == str(path) and spec.statements[0].span.filename == str(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.peft"))):
        parse_file(tmp_path / "none.peft")


def test_grammar_is_package_data_of_peftc_lang():
    """The grammar is read with importlib.resources from the package itself, the same in a checkout and in
    an installed wheel (tests/project/test_wheel.py checks the wheel), not searched for in two places."""
    path = Path(spec_module.__file__).with_name("peft.lark")
    assert path.is_file() and grammar_text() == path.read_text(encoding="utf-8")
    assert "statement" in grammar_text()


# ── round trip: random valid statements drawn from the METHODS declarations ────────────────────────

def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


REGEXES = st.lists(st.sampled_from(["a", "b", r"\.", ".*", "[0-9]", r"\/", "(x|y)", "_proj", "+", "?", "#", ";"]),
                   min_size=1, max_size=6).map("".join).filter(_compiles)
# spec strings hold any text but raw control characters (escapes \n \r \t stand for those three)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)).filter(lambda c: c in "\t\n\r" or visible(c) == c),
               max_size=12)


def target(method):
    return st.one_of(
        st.sampled_from(method.role_words).map(lambda r: (r, ("role", r))),
        TEXT.filter(bool).map(lambda g: (quote(g), ("glob", g))),
        REGEXES.map(lambda r: (f"/{r}/", ("regex", r))))


def target_list(method, min_size):
    return st.lists(target(method), min_size=min_size, max_size=3, unique_by=lambda t: t[1]).flatmap(
        lambda ts: st.sampled_from([",", ", ", " , "]).map(lambda sep: (sep.join(t[0] for t in ts),
                                                                         tuple(t[1] for t in ts))))


def layer_part():
    return st.tuples(st.integers(0, 60), st.integers(0, 5)).flatmap(lambda p: st.sampled_from(
        [f"{p[0]}..{p[0] + p[1]}"] + ([str(p[0])] if p[1] == 0 else [])).map(lambda t: (t, (p[0], p[0] + p[1]))))


def option_value(method, option):
    """(text, expected value) for one option."""
    if option.choices is not None and option.type in ("int", "name"):
        return st.sampled_from(option.choices).map(lambda c: (str(c), c))
    if option.type == "int":
        low = 0 if option.min is None else int(option.min)
        return st.integers(low, 10_000).map(lambda i: (str(i), i))
    if option.type == "float":
        floats = st.floats(option.min, option.max, exclude_min=option.min_open, exclude_max=option.max_open,
                           allow_nan=False, allow_infinity=False, width=32)     # float options are float32
        return st.one_of(floats.map(lambda f: (repr(f), f)),
                         st.integers(1 if option.min_open else 0, 0 if option.max is not None else 99)
                         .map(lambda i: (str(i), float(i))))
    if option.type == "bool":
        return st.booleans().map(lambda b: (str(b).lower(), b))
    if option.type == "str":
        return TEXT.map(lambda s: (quote(s), s))
    if option.type == "names":
        return st.lists(st.sampled_from(option.choices), min_size=1, unique=True).map(
            lambda ns: (",".join(ns), tuple(ns)))
    if option.type == "layers":
        return st.lists(layer_part(), min_size=1, max_size=4).map(
            lambda ps: (",".join(p[0] for p in ps), LayerSelection(tuple(p[1] for p in ps))))
    assert option.type == "targets"
    return target_list(method, 1)


@st.composite
def statement(draw):
    method = draw(st.sampled_from(list(METHODS.values())))
    words = [method.keyword]
    if method.leading:
        words.append(draw(st.sampled_from(method.leading.choices)))
    expected_targets = ()
    if method.targets != "none":
        text, expected_targets = draw(target_list(method, 1 if method.targets == "required" else 0))
        words += [text] if text else []
    chosen = [o for o in method.options if o.required or draw(st.booleans())]
    values = {}
    for option in draw(st.permutations(chosen)):
        text, values[option.name] = draw(option_value(method, option))
        words.append(f"{option.name}={text}")
    if not expected_targets:
        expected_targets = tuple(("role", r) for r in method.default_targets)
    return " ".join(words), (method.keyword, expected_targets, values)


def _as_plain(value):
    if isinstance(value, tuple) and value and isinstance(value[0], Target):
        return tuple((t.kind, t.value) for t in value)
    return value


@settings(max_examples=300, deadline=None)
@given(st.lists(statement(), max_size=5),
       st.lists(st.sampled_from(["\n", ";", " ; ", "\r\n", "  # comment ; x\n\n"]), min_size=5, max_size=5))
@pytest.mark.slow
def test_round_trip(statements, separators):
    text = "".join(s + sep for (s, _), sep in zip(statements, separators))
    spec = parse(text)
    assert len(spec.statements) == len(statements)
    for parsed, (_, (method, expected_targets, values)) in zip(spec.statements, statements):
        assert (parsed.method, targets(parsed)) == (method, list(expected_targets))
        assert parsed.explicit == set(values)
        assert {k: _as_plain(parsed.options[k]) for k in values} == values
    formatted = spec.format()
    again = parse(formatted)
    assert again == spec
    assert again.format() == formatted

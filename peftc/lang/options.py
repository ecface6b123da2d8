"""The vocabulary every spec method declares its leading word, targets and options in (each method in its
package, peftc/methods/<keyword>/options.py).

The parser (peftc.lang.spec) checks statements against these declarations, fills in defaults, and draws its
"did you mean" suggestions (method keywords, option names, role words, choices) from them; help text
lives next to each option, as in HF PEFT's config dataclasses. How a value of each option type is
spelled in normalized text (``OptionSpec.format``) is here too."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

OptionType = Literal["int", "float", "bool", "str", "name", "names", "layers", "targets"]

#: what a value of each option type looks like, for messages and help
TYPE_WORDS: dict[str, str] = {
    "int": "an integer", "float": "a number", "bool": "true or false", "str": 'a "string"', "name": "a name",
    "names": "names separated by ','", "layers": "layer indices and ranges such as 0..3,8",
    "targets": 'targets (role words, "globs" or /regexes/)',
}

#: escapes in spec strings: the character after the backslash, and the character it stands for
ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}
_QUOTE = str.maketrans({v: "\\" + k for k, v in ESCAPES.items()})


def quote(text: str) -> str:
    """``text`` as a spec string: double-quoted, with ``\\ \\" \\n \\r \\t`` escaped."""
    return '"' + text.translate(_QUOTE) + '"'


#: role words a target can name; the analysis finds these roles in the captured graph
ROLES: dict[str, str] = {
    "q": "attention query projection",
    "k": "attention key projection",
    "v": "attention value projection",
    "o": "attention output projection",
    "gate": "MLP gate projection",
    "up": "MLP up projection",
    "down": "MLP down projection",
    "router": "mixture-of-experts router (the linear whose scores choose the experts); not in all-linear",
    "experts": "mixture-of-experts stacked expert weights (3-D parameters, one LoRA per expert; lora only); "
               "not in all-linear",
    "attn": "every attention projection (q, k, v, o)",
    "ffn": "every MLP projection (gate, up, down)",
    "all-linear": "every linear layer but the output head and the routers (never the experts)",
    "embed": "the token embedding",
    "head": "the output head",
}


@dataclass(frozen=True)
class OptionSpec:
    """One ``key=value`` option. ``min``/``max`` are inclusive unless ``min_open``/``max_open``;
    ``choices`` lists the allowed values (for ``names``, of each element). A ``default`` of None means
    the option is off or "all" (e.g. ``layers``), and is not printed by ``Spec.format()``."""
    name: str
    type: OptionType
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    required: bool = False
    min_open: bool = False
    max_open: bool = False

    @property
    def usage(self) -> str:
        return f"{self.name}=<{self.type}>: {self.help}"

    def format(self, value: Any) -> str:
        """``value`` spelled the way the parser reads it back: ``16`` for 16.0, ``"text"``, ``true``,
        ``attn,ffn``, ``0..3,8``."""
        if self.type == "str":
            return quote(value)
        if self.type == "bool":
            return "true" if value else "false"
        if self.type == "float":
            return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
        if self.type in ("names", "targets"):
            return ",".join(str(v) for v in value)
        return str(value)

    def violation(self, value: Any) -> str | None:
        """Why ``value`` (one element, already of this option's type) is not allowed, or None."""
        if self.choices is not None and value not in self.choices:
            return "must be one of " + ", ".join(str(c) for c in self.choices)
        if self.min is not None and (value < self.min or (self.min_open and value == self.min)):
            return f"must be {'>' if self.min_open else '>='} {self.min:g}"
        if self.max is not None and (value > self.max or (self.max_open and value == self.max)):
            return f"must be {'<' if self.max_open else '<='} {self.max:g}"
        return None


@dataclass(frozen=True)
class MethodSpec:
    """A spec method: ``keyword [leading] [targets] [options]``. ``targets`` says whether targets are
    required, optional (``default_targets`` when none are given) or not allowed; ``roles`` are role
    words only this method accepts (quant's ``base``)."""
    keyword: str
    help: str
    options: tuple[OptionSpec, ...]
    targets: Literal["required", "optional", "none"]
    default_targets: tuple[str, ...] = ()
    leading: OptionSpec | None = None
    roles: tuple[str, ...] = ()

    def option(self, name: str) -> OptionSpec | None:
        return next((o for o in self.options if o.name == name), None)

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    @property
    def role_words(self) -> tuple[str, ...]:
        return (*ROLES, *self.roles)


LAYERS = OptionSpec("layers", "layers", None, "layer indices and inclusive ranges to act on, e.g. 0..3,8; "
                    "default every layer")
ATTN = OptionSpec("attn", "name", None, "only the projections of self-attentions (self) or of cross-attentions "
                  "(cross: an encoder-decoder's decoder attending over the encoder); other targets are kept; "
                  "default both", choices=("self", "cross"))
EXCLUDE = OptionSpec("exclude", "targets", None, "targets to leave out, in the same forms as the "
                     "statement's targets (role words, \"globs\", /regexes/)")

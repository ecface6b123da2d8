"""The one place each spec method declares its leading word, targets and options.

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
    "attn": "every attention projection (q, k, v, o)",
    "ffn": "every MLP projection (gate, up, down)",
    "all-linear": "every linear layer but the output head",
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
EXCLUDE = OptionSpec("exclude", "targets", None, "targets to leave out, in the same forms as the "
                     "statement's targets (role words, \"globs\", /regexes/)")

_METHODS = (
    MethodSpec("lora", "low-rank update y = W x + s·B(A(dropout(x))), s = alpha/r (HF PEFT LoraConfig)", (
        OptionSpec("r", "int", 8, "rank of the update", min=1),
        OptionSpec("alpha", "float", 8.0, "scale numerator: the update is scaled by alpha/r, or "
                   "alpha/sqrt(r) with rslora; 8 like HF PEFT's lora_alpha, not tied to r", min=0, min_open=True),
        OptionSpec("dropout", "float", 0.0, "dropout probability on the adapter's input (lora_dropout)",
                   min=0, max=1, max_open=True),
        OptionSpec("rslora", "bool", False, "rank-stabilised scale alpha/sqrt(r) (use_rslora)"),
        OptionSpec("init", "name", "zero", "zero: A Kaiming-uniform and B zero (init_lora_weights=True); "
                   "gaussian: A normal(0, 1/r) and B zero (init_lora_weights=\"gaussian\"); random: A and B "
                   "both Kaiming-uniform, so a fresh adapter already changes the model (init_lora_weights="
                   "False, for checking merge and export before training)",
                   choices=("zero", "gaussian", "random")),
        LAYERS, EXCLUDE), targets="required"),
    MethodSpec("quant", "quantize the frozen base linears: NF4 (QLoRA) or int8", (
        OptionSpec("block", "int", 64, "weights per absmax block (nf4): a power of two from 16 to 4096 "
                   "(bitsandbytes takes 32..4096; ONNX Runtime's MatMulBnb4, which runs the nf4 export, "
                   "16..256)",
                   choices=tuple(2 ** e for e in range(4, 13))),
        OptionSpec("double_quant", "bool", True, "store the absmax constants in 8 bits per block of 256 (nf4)"),
        LAYERS, EXCLUDE), targets="optional", default_targets=("base",),
        leading=OptionSpec("scheme", "name", None, "nf4: 4-bit NormalFloat with per-block absmax; "
                           "int8: 8-bit with per-row absmax", choices=("nf4", "int8"), required=True),
        roles=("base",)),
    MethodSpec("prefix", "learned key/value prefixes in every attention (HF PEFT prefix tuning)", (
        OptionSpec("tokens", "int", None, "number of virtual tokens", min=1, required=True),
        OptionSpec("project", "int", None, "hidden size of the reparameterisation MLP "
                   "(prefix_projection); default none: the prefixes are learned directly", min=1),
        LAYERS), targets="none"),
    MethodSpec("prompt", "a learned soft prompt prepended to the input embeddings (prompt tuning)", (
        OptionSpec("tokens", "int", None, "number of virtual tokens", min=1, required=True),
        OptionSpec("init", "str", None, "text whose token embeddings initialise the prompt "
                   "(prompt_tuning_init_text); default random"),
        ), targets="none"),
    MethodSpec("adapter", "bottleneck adapters: after=attn,ffn is Houlsby, after=ffn alone Pfeiffer", (
        OptionSpec("after", "names", ("attn", "ffn"), "sublayers whose output gets an adapter",
                   choices=("attn", "ffn")),
        OptionSpec("bottleneck", "int", 64, "hidden size of the adapter", min=1),
        OptionSpec("act", "name", "relu", "activation between the down and up projections",
                   choices=("relu", "gelu", "silu", "tanh")),
        OptionSpec("parallel", "bool", False, "add the adapter beside the sublayer instead of after it"),
        OptionSpec("scale", "float", 1.0, "factor on the adapter's output"),
        LAYERS), targets="none"),
    MethodSpec("ia3", "learned per-feature scales on the selected linears' outputs (HF PEFT IA3)", (
        LAYERS, EXCLUDE,
        OptionSpec("init", "name", "ones", "initial scales: ones leaves the model unchanged", choices=("ones",)),
        ), targets="required"),
    MethodSpec("bitfit", "train the biases of the selected linears; no targets: every bias", (
        LAYERS, EXCLUDE), targets="optional"),
    MethodSpec("full", "plain fine-tuning of the selected weights", (LAYERS, EXCLUDE), targets="required"),
)

#: every method by keyword, in declaration order
METHODS: dict[str, MethodSpec] = {m.keyword: m for m in _METHODS}

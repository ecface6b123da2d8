"""The ``ia3`` statement's syntax: its targets and options, with their help text."""
from peftc.lang.options import ATTN, EXCLUDE, LAYERS, MethodSpec, OptionSpec

METHOD = MethodSpec("ia3", "learned per-feature scales on the selected linears' outputs (HF PEFT IA3)", (
    LAYERS, ATTN, EXCLUDE,
    OptionSpec("init", "name", "ones", "initial scales: ones leaves the model unchanged", choices=("ones",)),
    ), targets="required")

"""The ``prefix`` statement's syntax: its targets and options, with their help text."""
from peftc.lang.options import LAYERS, MethodSpec, OptionSpec

METHOD = MethodSpec("prefix", "learned key/value prefixes in every attention (HF PEFT prefix tuning)", (
    OptionSpec("tokens", "int", None, "number of virtual tokens", min=1, required=True),
    OptionSpec("project", "int", None, "hidden size of the reparameterisation MLP "
               "(prefix_projection); default none: the prefixes are learned directly", min=1),
    LAYERS), targets="none")

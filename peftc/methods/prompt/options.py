"""The ``prompt`` statement's syntax: its targets and options, with their help text."""
from peftc.lang.options import MethodSpec, OptionSpec

METHOD = MethodSpec("prompt", "a learned soft prompt prepended to the input embeddings (prompt tuning)", (
    OptionSpec("tokens", "int", None, "number of virtual tokens", min=1, required=True),
    OptionSpec("init", "str", None, "text whose token embeddings initialise the prompt "
               "(prompt_tuning_init_text); default random"),
    ), targets="none")

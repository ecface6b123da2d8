"""The ``full`` statement's syntax: its targets and options, with their help text."""
from peftc.lang.options import ATTN, EXCLUDE, LAYERS, MethodSpec

METHOD = MethodSpec("full", "plain fine-tuning of the selected weights", (LAYERS, ATTN, EXCLUDE), targets="required")

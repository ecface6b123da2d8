"""Errors that are not about spec text: a model that cannot be loaded, a pass that fails, an export that
does not verify. Spec-text errors are :class:`peftc.diagnostics.SpecError`, which carries line and column."""
from __future__ import annotations


class PeftcError(Exception):
    """Base of peftc's own errors; the CLI prints these without a traceback."""


class ModelError(PeftcError, ValueError):
    """A model reference that cannot be loaded, or a model part that cannot be handled."""


class PassError(PeftcError, RuntimeError):
    """A rewrite pass failed; the message names the pass, the statement's span and the passes before it."""


class ExportError(PeftcError, RuntimeError):
    """An export that could not be written or did not verify."""


class AdapterError(PeftcError, ValueError):
    """An adapter file that does not fit the compiled model."""

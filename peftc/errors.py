"""Errors that are not about spec text: a model that cannot be loaded, a pass that fails, an export that
does not verify. Spec-text errors are :class:`peftc.lang.diagnostics.SpecError` (a PeftcError too), which
carries line and column."""
from __future__ import annotations

import json
from pathlib import Path


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


def read_json(path: str | Path, error: type[PeftcError] = PeftcError):
    """The value of a JSON file peftc is given (a manifest, an adapter config): text that is not UTF-8
    (a BOM is accepted), is not JSON, or nests too deeply for Python's parser is an ``error`` naming the
    file, with the line and column where the parser stopped."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise error(f"{path}: not JSON peftc can read: nested too deeply") from None

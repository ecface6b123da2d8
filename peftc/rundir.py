"""The run directory, what ``peftc compile`` and ``peftc train`` write (both use these names) and ``export``, ``explain``,
``eval`` and ``generate`` read: ``peftc.json`` (the manifest: model, spec file, kind, report), ``spec.peft``
and the adapter files. It is written whole or not at all (:func:`peftc.fsutil.atomic_dir`)."""
from __future__ import annotations

import errno
from pathlib import Path

from peftc.compiler.compiled import compile as compile_model
from peftc.errors import PeftcError, read_json
from peftc.fsutil import atomic_dir, write_json, write_text
from peftc.lang.spec import parse_file
from peftc.models import DTYPES, dtype_name

MANIFEST = "peftc.json"
SPEC_FILE = "spec.peft"


def read_manifest(args) -> tuple[Path, dict, str]:
    """The directory ``args.dir`` written by ``peftc compile``/``train``, its manifest, and the model
    reference (``--model`` overrides the manifest's). The manifest's ``spec`` must name a file inside the
    directory (no absolute path, no '..', no link out of it); a manifest that is not JSON, lacks a key or
    has one of the wrong type is a PeftcError naming it."""
    directory = Path(args.dir)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise PeftcError(f"{directory} has no {MANIFEST}: make it with 'peftc compile SPEC --out {directory}' "
                         "or 'peftc train'")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise PeftcError(f"{manifest_path}: expected a JSON object, got {type(manifest).__name__}")
    for key in ("spec", *(() if args.model else ("model",))):
        if key not in manifest:
            raise PeftcError(f"{manifest_path}: '{key}' is missing")
        if not isinstance(manifest[key], str) or not manifest[key]:
            raise PeftcError(f"{manifest_path}: '{key}' must be a non-empty string, got {manifest[key]!r}")
    spec = Path(manifest["spec"])
    inside = directory.resolve()
    if spec.is_absolute() or ".." in spec.parts or not (directory / spec).resolve().is_relative_to(inside):
        raise PeftcError(f"{manifest_path}: 'spec' must name a file inside {directory}, got {str(spec)!r}")
    if not (directory / spec).is_file():
        raise PeftcError(f"{manifest_path}: 'spec' names {str(spec)!r}, which is not a file in {directory}")
    return directory, manifest, args.model or manifest["model"]


def load_run(directory: Path, manifest: dict, model, dtype: str | None = None):
    """The compiled model of a run directory with its adapter loaded: ``model`` (a model, or a reference
    loaded in ``dtype``, by default the manifest's, which records how compile or train loaded it; float32
    for a manifest from before peftc recorded it) compiled with the directory's spec as the manifest says."""
    model = compile_model(model, parse_file(directory / manifest["spec"]), dtype=dtype or manifest_dtype(manifest),
                          autocast_adapter_dtype=manifest.get("autocast_adapter_dtype", True))
    model.load_adapter(directory)
    return model


def manifest_dtype(manifest: dict) -> str:
    """The dtype a run directory's base model was loaded in (``fp32`` when the manifest predates it)."""
    dtype = manifest.get("dtype", "fp32")
    if dtype not in DTYPES or dtype == "auto":
        raise PeftcError(f"{MANIFEST}: 'dtype' must be one of bf16, fp16, fp32, got {dtype!r}")
    return dtype


def check_replaceable(out: Path) -> None:
    """Refuse an ``--out`` that ``peftc compile`` must not replace: a file, a training run, or a directory
    of other files (an empty one, or an earlier compile's, is replaced)."""
    if out.exists() and not out.is_dir():
        raise PeftcError(f"--out {out} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if (out / "checkpoints").exists() or (out / "train.json").exists():
        raise PeftcError(f"--out {out} holds a training run; compile would replace it: choose another --out")
    if not (out / MANIFEST).is_file():
        names = sorted(p.name for p in out.iterdir())
        raise PeftcError(f"--out {out} is not empty and is not a 'peftc compile' directory (no {MANIFEST}; "
                         f"it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): "
                         "choose another --out")


def write_run(directory: Path, model, spec, model_ref: str, report, manifest_report: dict, **more) -> list[str]:
    """The files every run directory holds: the adapter (peftc's file, and HF PEFT's when they can hold it),
    ``spec.peft``, ``report.txt`` and the manifest (``more`` adds keys to it). Returns the names written."""
    written = model.save_adapter(directory)
    write_text(directory / SPEC_FILE, spec.format())
    write_text(directory / "report.txt", str(report) + "\n")
    write_json(directory / MANIFEST, {"model": model_ref, "spec": SPEC_FILE, "kind": model.kind,
                                      "dtype": dtype_name(model.base_dtype),
                                      "autocast_adapter_dtype": model.autocast_adapter_dtype,
                                      "report": manifest_report, **more})
    return written + [SPEC_FILE, "report.txt", MANIFEST]


def write_compiled(out: Path, model, spec, model_ref: str, report) -> list[str]:
    """Write a compile's run directory: built beside ``out`` and swapped in whole, so none of an earlier
    compile's files (HF PEFT's, say, when this adapter has no HF PEFT format) survive, and a failure leaves
    it as it was. Returns the names written."""
    # the manifest without the report's timings: the same inputs give the same bytes (timings are on stderr)
    summary = {k: v for k, v in report.to_dict().items() if k != "timings_s"}
    try:
        with atomic_dir(out) as tmp:
            written = write_run(tmp, model, spec, model_ref, report, summary)
            write_text(tmp / "graph.txt", model.dump_graph())
    except OSError as exc:
        what = exc.strerror or errno.errorcode.get(exc.errno or 0) or str(exc)
        kept = f"{out} was left as it was" if out.exists() else "nothing was written"
        raise PeftcError(f"cannot write {out}: {what}; {kept}") from exc
    return written + ["graph.txt"]

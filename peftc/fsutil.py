"""The one safe writer: every file peftc writes goes to a temporary name and is renamed into place.

* **Atomic.** A file (:func:`atomic_path`) or a whole directory (:func:`atomic_dir`) is built under a
  temporary name beside its final one and renamed into place only when it is complete, so the final name
  holds either the previous complete version or the new complete one, never a half-written mix.
* **Permissions.** ``tempfile`` creates files 0600 and directories 0700 whatever the umask; what is
  renamed into place is given the mode an ordinary ``open``/``mkdir`` would have (0666 / 0777 less the
  umask), so a server running as another user can read an exported model.
* **Reproducible.** Identical inputs give identical bytes: JSON is written with sorted keys, and the
  safetensors header (whose metadata the Rust writer orders by a per-process hash) is rewritten in a
  fixed order (:func:`save_tensors`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file

_umask_lock = threading.Lock()
_umask: int | None = None


def umask() -> int:
    """The process umask, read once (reading it means setting it, so it is done under a lock, then cached)."""
    global _umask
    if _umask is None:
        with _umask_lock:
            if _umask is None:
                current = os.umask(0o022)
                os.umask(current)
                _umask = current
    return _umask


umask()     # at import, before any thread of ours could be creating files


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def _fix_modes(path: Path) -> None:
    """Give ``path``, made by tempfile, the permissions the umask gives an ordinary file or directory."""
    if path.is_dir() and not path.is_symlink():
        os.chmod(path, dir_mode())
    elif path.is_file():
        os.chmod(path, file_mode())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.
    The file renamed into place has the permissions the umask gives (not tempfile's 0600)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fix_modes(tmp_path)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors as safetensors, atomically and byte-reproducibly. Tensors are made contiguous CPU
    copies. safetensors orders the tensors itself (by dtype, then name); its header's ``__metadata__``
    comes out in the order of a Rust hash map seeded per process, so the header is rewritten here with
    the metadata keys sorted."""
    flat = {k: tensors[k].detach().to("cpu").contiguous() for k in sorted(tensors)}
    meta = {str(k): str(metadata[k]) for k in sorted(metadata)} if metadata else None
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)
        if meta:
            _sort_header(tmp)
    return Path(path)


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with ``__metadata__`` first and its keys sorted, tensors in
    the order written. The header is padded with spaces to its old length (the data do not move); a
    header that came out longer (it cannot: the same keys and values, reordered) rewrites the file."""
    with open(path, "r+b") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(length)
        header = json.loads(raw)
        ordered = {}
        if "__metadata__" in header:
            ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
        ordered.update(header)
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= length:
            fh.seek(8)
            fh.write(text + b" " * (length - len(text)))
            return
    padded = text + b" " * (-len(text) % 8)
    rewritten = path.with_name(path.name + ".sorted")
    try:
        with open(path, "rb") as src, open(rewritten, "wb") as dst:
            src.seek(8 + length)
            dst.write(struct.pack("<Q", len(padded)) + padded)
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(rewritten, path)
    finally:
        if rewritten.exists():
            rewritten.unlink()


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never a pickle)."""
    return load_file(str(path))


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the complete directory ``new`` at ``final`` (same file system), replacing what is there as a
    unit: the old directory is renamed aside, the new one renamed in, and only then the old one deleted,
    so ``final`` never holds a mix and the old one is never deleted before the new one is in place.
    (Between the two renames ``final`` is briefly absent.) If the second rename fails the old directory
    is put back."""
    new, final = Path(new), Path(final)
    if not final.exists() and not final.is_symlink():
        os.replace(new, final)
        return
    if final.is_symlink() or not final.is_dir():
        raise NotADirectoryError(f"{final} is {'a symbolic link' if final.is_symlink() else 'not a directory'}; "
                                 "only a directory is replaced")
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
    os.rmdir(aside)                        # a unique free name beside final
    os.replace(final, aside)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name beside ``path`` (``.NAME.XXXXXXXX``) and, when the block
    succeeds, put it in place of ``path`` with :func:`replace_dir`: an earlier ``path`` is replaced as a
    unit (none of its files survive beside the new ones), and is left whole if the block fails. The
    directory gets the permissions the umask gives (not tempfile's 0700)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        _fix_modes(tmp)
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

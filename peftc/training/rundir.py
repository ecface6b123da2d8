"""The directory a ``peftc train`` run is written in: one run per ``--out``, ``--resume`` to continue it,
``--overwrite`` to replace it without risking it (the new run trains in a staging directory beside ``OUT``
and is swapped in as a unit when it has finished), and what an interrupted run left under temporary names
removed by the next one."""
from __future__ import annotations

import shutil
from pathlib import Path

from peftc.training.checkpoints import step_dirs
from peftc.training.config import CHECKPOINTS, RUN_MARKERS, TrainConfig, TrainError
from peftc.training.distributed import Dist, say


def staging_dir(out: str | Path) -> Path:
    """Where an ``--overwrite`` run of ``out`` trains until it is complete: ``.NAME.overwrite`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.overwrite"


def is_temporary(path: Path) -> bool:
    """What fsutil's atomic writers leave when killed: ``.NAME.XXXX.tmp`` files, ``.step-N.XXXX`` dirs."""
    return path.name.startswith(".") and (path.name.endswith(".tmp") or path.name.startswith(".step-"))


def contents(out: Path) -> list[str]:
    """The entries of ``out`` that are not temporaries (none when it does not exist)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if not is_temporary(p))


def _listing(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def prepare_out(config: TrainConfig, dist_info: Dist) -> tuple[Path, Path]:
    """(the directory the run is written in, the directory it ends up in): ``out`` itself, or under
    ``--overwrite`` its staging directory. Refuses a non-empty ``out`` without ``--resume``/``--overwrite``."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a directory")
    found = contents(out)
    if config.overwrite:
        if out.is_symlink():
            raise TrainError(f"--out {out} is a symbolic link; --overwrite replaces only a directory")
        if found and not any(marker in found for marker in RUN_MARKERS):
            raise TrainError(f"--out {out} holds files that are not a peftc run ({_listing(found)}); "
                             "--overwrite replaces only a peftc directory: choose another --out")
        work = staging_dir(out)
        if dist_info.main and work.exists() and not config.resume:
            shutil.rmtree(work)             # an unfinished earlier --overwrite run; this one starts afresh
        return work, out
    if found and not config.resume:
        done = step_dirs(out)
        what = f"a run (checkpoints up to {done[-1].name})" if done else _listing(found)
        raise TrainError(f"--out {out} is not empty: it holds {what}; give --resume to continue it, "
                         "--overwrite to replace it, or another --out")
    if config.resume and not step_dirs(out):
        foreign = [name for name in found if name not in ("train.log", CHECKPOINTS)]
        if foreign:
            raise TrainError(f"--resume: {out} has no checkpoint to continue from but holds other files "
                             f"({', '.join(foreign[:3])}); give --overwrite to replace it, or another --out")
    return out, out


def clean_temporaries(work: Path, dist_info: Dist) -> None:
    """Remove what a killed run left under temporary names (rank 0)."""
    if not dist_info.main:
        return
    for folder in (work, work / CHECKPOINTS):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if is_temporary(path):
                say(dist_info, f"removing {path}, left by an interrupted run")
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

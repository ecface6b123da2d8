"""What a finished ``peftc train`` run leaves in ``--out`` besides its checkpoints: the adapter, the spec,
the report, ``peftc.json`` (what ``peftc export``/``eval`` read), ``train.json``, ``train.log`` and
``loss.png``."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from peftc.fsutil import atomic_path, write_json, write_text
from peftc.rundir import write_run
from peftc.training.config import TrainConfig


class TrainLog:
    """train.log: a header, then one line per logged step; rewritten whole (atomically) on each flush."""

    def __init__(self, path: Path, enabled: bool, lines: list[str] | None = None):
        self.path, self.enabled, self.lines = path, enabled, list(lines or [])

    def add(self, line: str) -> None:
        self.lines.append(line)

    def flush(self) -> None:
        if self.enabled:
            write_text(self.path, "\n".join(self.lines) + "\n")


def summary_of(history: list, seconds: float, tokens: int, steps_run: int) -> dict:
    """The ``train`` entry of the manifest (and ``summary`` of train.json)."""
    last = history[-1] if history else {}
    return {"steps": last.get("step", 0), "final_loss": last.get("loss"),
            "eval_loss": next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None),
            "seconds": round(seconds, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2) if seconds else None, "steps_this_run": steps_run}


def write_outputs(model, config: TrainConfig, spec, out: Path, history: list, log: TrainLog, identity: dict,
                  seconds: float, tokens: int, steps_run: int) -> list[str]:
    """Write the adapter and the run's files into ``out``; the names written."""
    report = model.report()
    summary = summary_of(history, seconds, tokens, steps_run)
    files = write_run(out, model, spec, config.model, report, report.to_dict(), train=summary)
    write_json(out / "train.json", {"config": asdict(config), "identity": identity, "summary": summary,
                                    "history": history})
    log.add(f"# done: {summary['steps']} steps, final loss {summary['final_loss']}, "
            f"{tokens:,d} tokens in {seconds:.1f} s ({summary['tokens_per_s']} tok/s this run)")
    log.flush()
    files += ["train.json", "train.log"]
    if plot_losses(history, out / "loss.png", title=f"{config.spec} on {config.model}"):
        files.append("loss.png")
    return files


def plot_losses(history: list[dict], path: Path, title: str = "") -> bool:
    """The loss curve (and eval loss where measured) as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1.2)
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per completion token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return True

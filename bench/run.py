"""peftc against its peers, measured side by side: writes bench/RESULTS.md, bench/results.json and
bench/results.png.

    .venv/bin/python bench/run.py                       # SmolLM2-135M and tiny-llama, 5 rounds each
    .venv/bin/python bench/run.py --models tiny-llama --repeats 2 --out /tmp/bench   # a quick look

Each figure is a ratio peftc / peer of medians over ``--repeats`` alternating rounds (after one warm-up
round), with the min–max of both sides; peak resident memory comes from one fresh process per
configuration (see bench/cases.py). Groups:

- compile: capture + analysis + passes, and passes alone, against HF PEFT's ``get_peft_model`` for
  ``lora q, v r=8``; a second compile of the same model served from the capture cache;
- train: a training step (forward, backward, AdamW; batch 4 × 128, loss on every position) for LoRA q,v
  r=8, LoRA all-linear r=16, IA3 and prefix tuning (16 tokens) against HF PEFT, against full fine-tuning
  and against the floor (forward + backward through the frozen model); peak RSS of each;
- traindata: ``peftc train``'s step on prompt/completion data against the same loop computing logits for
  every position: the date task as shipped (batch 8) and a 5-shot version of it (long prompts, batch 4);
- infer: compiled (unmerged) and merged against the base model in torch, batch 1 × 128;
- export: ``peftc export``'s path (capture, convert, save, check, verify in ONNX Runtime) against a plain
  ``torch.onnx.export`` of the Hugging Face model; the merged ONNX against the base model's ONNX in ONNX
  Runtime (latency and operator counts)."""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = Path(__file__).resolve().parent / "cases.py"
MIB = 2 ** 20
PRELOAD = ("torch", "transformers", "peft", "onnx", "onnxruntime", "onnxscript", "torch.onnx", "peftc",
           "peftc.export.onnx", "peftc.training.train", "cases")
TRAIN_METHODS = {"lora-qv": "LoRA q,v r=8", "lora-all": "LoRA all-linear r=16", "ia3": "IA3 k,v,down",
                 "prefix": "prefix 16 tokens"}


def worker(group: str, model: str, args, **extra) -> dict:
    """One group in a child process of its own. The child is forked from this process, which has imported
    torch, transformers and peft but run nothing, so it starts clean without paying for those imports."""
    import multiprocessing
    import cases
    argv = [group, model, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    start = time.perf_counter()
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)

    def child():
        try:
            send.send(("ok", cases.run(argv)))
        except BaseException as exc:   # reported by the parent, which stops the run
            send.send(("error", f"{type(exc).__name__}: {exc}"))
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    status, value = receive.recv()
    process.join()
    if status != "ok":
        raise SystemExit(f"bench: {' '.join(argv)} failed: {value}")
    print(f"  {group} {extra.get('case', '')} {model}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return value


GROUPS = ("compile", "train", "traindata", "infer", "export")
DATASETS = (("dates", 0, 8), ("dates-5shot", 5, 4))     # name, solved examples before each prompt, batch


def measure(model: str, args) -> dict:
    out: dict = {}
    groups = args.groups.split(",")
    if "compile" in groups:
        out["compile"] = worker("compile", model, args)
    if "train" in groups:
        out["train"] = worker("train", model, args)
        cases = [f"{tool}:{m}" for m in TRAIN_METHODS for tool in ("peftc", "hf")] + ["full", "floor"]
        out["train_memory"] = {c: worker("train-memory", model, args, case=c) for c in cases}
    if "traindata" in groups:
        for name, shots, batch in DATASETS:
            out[f"traindata:{name}"] = worker("traindata", model, args, batch=batch, shots=shots)
            out[f"traindata_memory:{name}"] = {v: worker("traindata-memory", model, args, case=v, batch=batch,
                                                         shots=shots) for v in ("peftc", "all-positions")}
    if "infer" in groups:
        out["infer"] = worker("infer", model, args)
    if "export" in groups:
        out["export"] = worker("export", model, args)
    return out


# --- report ---------------------------------------------------------------------------------------------

def _ratio(a: dict, b: dict) -> float:
    return a["median"] / b["median"]


def _span(s: dict, unit: str = "s") -> str:
    if unit == "ms":
        return f"{1000 * s['median']:.1f} ms ({1000 * s['min']:.1f}–{1000 * s['max']:.1f})"
    return f"{s['median']:.3f} s ({s['min']:.3f}–{s['max']:.3f})"


def rows_for(model: str, r: dict) -> list[dict]:
    """One row per figure: what, peftc, peer, ratio, goal (callable on the ratio) and its text."""
    rows = []

    def add(what, ours, peer, ratio, goal=None, goal_text=""):
        rows.append({"model": model, "what": what, "peftc": ours, "peer": peer, "ratio": ratio,
                     "goal": goal_text, "met": None if goal is None else bool(goal(ratio))})

    if "compile" in r:
        _compile_rows(r["compile"]["times"], add)
    if "train" in r:
        _train_rows(r["train"]["times"], r["train_memory"], add)
    for name, _, _ in DATASETS:
        if f"traindata:{name}" in r:
            _traindata_rows(name, r[f"traindata:{name}"], r[f"traindata_memory:{name}"], add)
    if "infer" in r:
        _infer_rows(r["infer"]["times"], add)
    if "export" in r:
        _export_rows(r["export"], add)
    return rows


def _compile_rows(c: dict, add) -> None:
    add("compile: capture + passes vs HF PEFT get_peft_model", _span(c["cold"]), _span(c["hf"]),
        _ratio(c["cold"], c["hf"]))
    add("compile: passes alone / capture", _span(c["passes"]), _span(c["capture"]), _ratio(c["passes"], c["capture"]),
        lambda x: x <= 0.05, "≤ 0.05")
    add("compile: cached second compile / first", _span(c["cached"]), _span(c["cold"]), _ratio(c["cached"], c["cold"]),
        lambda x: x <= 0.2, "≤ 0.2")


def _train_rows(t: dict, mem: dict, add) -> None:
    for m, label in TRAIN_METHODS.items():
        add(f"train step {label} vs HF PEFT", _span(t[f"peftc:{m}"]), _span(t[f"hf:{m}"]),
            _ratio(t[f"peftc:{m}"], t[f"hf:{m}"]), lambda x: x <= 1.0, "≤ 1.00")
    add("train step LoRA q,v vs the floor (frozen fwd+bwd)", _span(t["peftc:lora-qv"]), _span(t["floor"]),
        _ratio(t["peftc:lora-qv"], t["floor"]), lambda x: x <= 1.05, "≤ 1.05")
    add("train step LoRA q,v vs full fine-tuning", _span(t["peftc:lora-qv"]), _span(t["full"]),
        _ratio(t["peftc:lora-qv"], t["full"]))
    for m, label in TRAIN_METHODS.items():
        ours, peer = mem[f"peftc:{m}"]["rss_peak"], mem[f"hf:{m}"]["rss_peak"]
        add(f"peak RSS of a step {label} vs HF PEFT", f"{ours / MIB:.0f} MiB", f"{peer / MIB:.0f} MiB", ours / peer)
    ours, full = mem["peftc:lora-qv"]["rss_peak"], mem["full"]["rss_peak"]
    add("peak RSS LoRA q,v vs full fine-tuning", f"{ours / MIB:.0f} MiB", f"{full / MIB:.0f} MiB", ours / full)
    floor = mem["floor"]["rss_peak"]
    add("peak RSS LoRA q,v vs the floor", f"{ours / MIB:.0f} MiB", f"{floor / MIB:.0f} MiB", ours / floor)


def _traindata_rows(name: str, d: dict, dm: dict, add) -> None:
    shape = "×".join(map(str, d["batch"]))
    what = f"peftc train step, {name} ({shape}, {d['labelled_positions']} labelled)"
    tt = d["times"]
    add(f"{what}: time vs all-position logits", _span(tt["peftc"]), _span(tt["all-positions"]),
        _ratio(tt["peftc"], tt["all-positions"]), lambda x: x <= 0.85, "≤ 0.85")
    ours, peer = dm["peftc"]["rss_peak"], dm["all-positions"]["rss_peak"]
    add(f"{what}: peak RSS vs all-position logits", f"{ours / MIB:.0f} MiB", f"{peer / MIB:.0f} MiB",
        ours / peer, lambda x: x <= 0.7, "≤ 0.70")
    grown_ours = ours - dm["peftc"]["rss_before"]
    grown_peer = peer - dm["all-positions"]["rss_before"]
    add(f"{what}: RSS growth during the step", f"{grown_ours / MIB:.0f} MiB", f"{grown_peer / MIB:.0f} MiB",
        grown_ours / max(grown_peer, 1))


def _infer_rows(i: dict, add) -> None:
    add("inference (torch, 1×128): compiled unmerged vs base", _span(i["unmerged"], "ms"), _span(i["base"], "ms"),
        _ratio(i["unmerged"], i["base"]))
    add("inference (torch, 1×128): merged vs base", _span(i["merged"], "ms"), _span(i["base"], "ms"),
        _ratio(i["merged"], i["base"]))


def _export_rows(e: dict, add) -> None:
    o = e["ort"]["times"]
    same_ops = e["merged_ops"] == e["base_ops"]
    add(f"ONNX Runtime (1×128): merged vs base ONNX (operator counts {'identical' if same_ops else 'DIFFER'})",
        _span(o["merged"], "ms"), _span(o["base"], "ms"), _ratio(o["merged"], o["base"]),
        lambda x: abs(x - 1) <= 0.03 and same_ops, "1.00 ± 0.03")
    et = e["times"]
    add(f"export ({e['route']} route, with ORT verification) vs plain torch.onnx.export", _span(et["peftc"]),
        _span(et["plain"]), _ratio(et["peftc"], et["plain"]), lambda x: x <= 0.5, "≤ 0.50")


def machine() -> str:
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def write_outputs(results: dict, rows: list[dict], args, seconds: float) -> None:
    from peftc.fsutil import atomic_path
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps({"machine": machine(), "date": datetime.date.today().isoformat(),
                                   "threads": args.threads, "repeats": args.repeats, "seconds": seconds,
                                   "rows": rows, "raw": results}, indent=1, default=str))
    lines = ["# peftc benchmark results", "",
             f"Machine: {machine()}; {args.threads} threads. Date: {datetime.date.today().isoformat()}. ",
             f"Command: `.venv/bin/python bench/run.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` "
             f"({seconds / 60:.1f} minutes). Times are medians of {args.repeats} alternating rounds (min–max); "
             "ratio = peftc / peer. Memory is the peak RSS of a steady-state step, one process per configuration.",
             ""]
    for model in dict.fromkeys(row["model"] for row in rows):
        lines += [f"## {model}", "", "| figure | peftc | peer | ratio | goal | met |", "|---|---|---|---|---|---|"]
        for row in (r for r in rows if r["model"] == model):
            met = "" if row["met"] is None else ("yes" if row["met"] else "**no**")
            lines.append(f"| {row['what']} | {row['peftc']} | {row['peer']} | {row['ratio']:.3f} | {row['goal']} | {met} |")
        lines.append("")
    with atomic_path(out / "RESULTS.md") as tmp:
        tmp.write_text("\n".join(lines))
    chart(rows, out / "results.png")


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from peftc.fsutil import atomic_path
    models = list(dict.fromkeys(row["model"] for row in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(8 * len(models), 0.32 * len(rows) / len(models) + 1.5),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["ratio"] <= 3]
        colours = ["grey" if r["met"] is None else ("tab:green" if r["met"] else "tab:red") for r in mine]
        ax.barh(range(len(mine)), [r["ratio"] for r in mine], color=colours)
        ax.set_yticks(range(len(mine)), [r["what"][:70] for r in mine], fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("peftc / peer (median); green: goal met, red: missed, grey: no goal; ratios above 3 only in RESULTS.md", fontsize=8)
        ax.set_title(model)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny-llama,smollm2-135m", help="comma-separated model references")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per figure (default 5)")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="where the three files go")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(CASES.parent))
    warnings.simplefilter("ignore")         # library deprecation chatter, in every worker
    for name in PRELOAD:                    # imported once here; every forked worker inherits them
        importlib.import_module(name)
    start = time.perf_counter()
    results, rows = {}, []
    for model in args.models.split(","):
        print(f"bench: {model}", file=sys.stderr)
        results[model] = measure(model, args)
        rows += rows_for(model, results[model])
    write_outputs(results, rows, args, time.perf_counter() - start)
    print((Path(args.out) / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()

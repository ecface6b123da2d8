"""The measurements ``bench/run.py`` makes, each in its own worker process (forked by run.py, or run alone
as ``python bench/cases.py GROUP MODEL ...``, which prints the result as JSON).

Timings alternate between peftc and its peer inside one process, round by round (the first round is a
warm-up and is dropped), so both see the same machine state; peak resident memory is measured in a fresh
process per configuration, over one steady-state step after a warm-up step (the kernel's peak-RSS counter
is reset first), so model loading and the other configuration do not count."""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: training configurations: peftc spec, and the HF PEFT config built by ``_hf_config``
METHODS = {
    "lora-qv": "lora q, v r=8 alpha=16",
    "lora-all": "lora all-linear r=16 alpha=32",
    "ia3": "ia3 k, v, down",
    "prefix": "prefix tokens=16",
}
INFER_SPEC = "lora q, v r=8 alpha=16 init=random"
LR = 1e-4
MIB = 2 ** 20


# --- helpers ------------------------------------------------------------------------------------------

def status(field: str) -> int:
    """A byte count from /proc/self/status (VmRSS: resident now; VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_and_reset_peak() -> None:
    """Hand freed memory back to the OS and reset the kernel's peak-RSS counter to the current RSS."""
    gc.collect()
    with contextlib.suppress(OSError):          # no glibc: freed memory simply stays with the process
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")     # VmHWM := VmRSS


def _summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def _round_robin(runs: dict, repeats: int, warm_up: bool = True) -> dict:
    """Call every ``runs[name]()`` once per round, rotating the order; with ``warm_up``, a first round
    runs before and is dropped."""
    names = list(runs)
    times = {name: [] for name in names}
    first = 0 if warm_up else 1
    for r in range(first, repeats + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: _summary(t) for name, t in times.items()}


def _batch(model_config, batch: int, seq: int):
    seq = min(seq, getattr(model_config, "max_position_embeddings", seq) - 32)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_config.vocab_size, (batch, seq), generator=gen)
    return ids, torch.ones_like(ids)


def _load(ref: str):
    import peftc
    model = peftc.load_model(ref)
    model.eval()
    return model


# --- training steps -----------------------------------------------------------------------------------

def _hf_config(method: str):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig
    if method == "lora-qv":
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")
    if method == "lora-all":
        return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    if method == "ia3":
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                         task_type="CAUSAL_LM")
    return PrefixTuningConfig(num_virtual_tokens=16, task_type="CAUSAL_LM")


def peftc_step_fn(model, ids, mask, labels, head_only: bool = True):
    """One peftc training step as ``peftc train`` takes it: the compiled graph up to the head, then the head
    and the loss only on labelled positions, in chunks (the full logits when the head is rewritten). With
    ``head_only=False``: the same step computing the logits of every position, the loss on the labelled ones."""
    from peftc.training.headloss import head_split
    from peftc.training.train import token_loss_sum
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    split = head_split(model) if head_only else None
    count = (labels[:, 1:] != -100).sum()

    def step():
        if split is not None:
            loss = split.loss_sum(split(ids, mask), labels)
        else:
            loss = token_loss_sum(model(ids, mask), labels)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def hf_step_fn(model, ids, mask, labels):
    """A transformers/HF PEFT training step: ``model(..., labels=...).loss``, backward, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)

    def step():
        model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def floor_step_fn(model, ids, mask, labels):
    """Forward and backward through the frozen model (gradient w.r.t. the input embeddings only): the
    work any method that trains something in the first layer cannot avoid."""
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step():
        inputs = embed(ids).detach().requires_grad_()
        model(inputs_embeds=inputs, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    return step


def build_case(case: str, base, ids, mask, labels):
    """A step function for ``case``: peftc:<method>, hf:<method>, full or floor. ``base`` is not modified
    except by ``floor`` (which only freezes it)."""
    import peftc
    if case.startswith("peftc:"):
        model = peftc.compile(base, METHODS[case.split(":", 1)[1]], seed=0)
        model.train()
        return peftc_step_fn(model, ids, mask, labels)
    if case.startswith("hf:"):
        from peft import get_peft_model
        model = get_peft_model(copy.deepcopy(base), _hf_config(case.split(":", 1)[1]))
        model.train()
        return hf_step_fn(model, ids, mask, labels)
    if case == "full":
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        return hf_step_fn(model, ids, mask, labels)
    if case == "floor":
        return floor_step_fn(base, ids, mask, labels)
    raise ValueError(case)


def group_train(args) -> dict:
    base = _load(args.model)
    ids, mask = _batch(base.config, args.batch, args.seq)
    labels = ids.clone()
    cases = [f"{tool}:{m}" for m in METHODS for tool in ("peftc", "hf")] + ["full", "floor"]
    runs = {case: build_case(case, base, ids, mask, labels) for case in cases}
    return {"batch": list(ids.shape), "times": _round_robin(runs, args.repeats)}


def group_train_memory(args) -> dict:
    base = _load(args.model)
    ids, mask = _batch(base.config, args.batch, args.seq)
    step = build_case(args.case, base, ids, mask, ids.clone())
    step()
    release_and_reset_peak()
    before = status("VmRSS")
    step()
    return {"case": args.case, "rss_before": before, "rss_peak": status("VmHWM")}


# --- peftc train on prompt/completion data --------------------------------------------------------------

def _completion_batch(ref: str, data: Path, batch: int, shots: int):
    """The first ``batch`` records of ``data``; with ``shots``, each prompt is preceded by that many solved
    records (a few-shot prompt: long prompt, short completion, only the completion labelled)."""
    from peftc.training.data import Record, collate, load_codec, read_jsonl, tokenize
    codec = load_codec(ref)
    records = read_jsonl(data)
    chosen = []
    for i in range(batch):
        k = shots + i * (shots + 1)
        solved = "".join(r.prompt + r.completion + "\n\n" for r in records[k - shots:k])
        chosen.append(Record(solved + records[k].prompt, records[k].completion, records[k].line))
    collated = collate(tokenize(chosen, codec, 512, False), codec.pad_id)
    return collated["input_ids"], collated["attention_mask"], collated["labels"]


def _traindata_step(variant: str, ref: str, base, ids, mask, labels):
    import peftc
    model = peftc.compile(base, METHODS["lora-qv"], seed=0)
    model.train()
    return peftc_step_fn(model, ids, mask, labels, head_only=variant == "peftc")


def group_traindata(args) -> dict:
    base = _load(args.model)
    ids, mask, labels = _completion_batch(args.model, args.data, args.batch, args.shots)
    runs = {v: _traindata_step(v, args.model, base, ids, mask, labels) for v in ("peftc", "all-positions")}
    labelled = int((labels[:, 1:] != -100).sum())
    return {"batch": list(ids.shape), "labelled_positions": labelled, "times": _round_robin(runs, args.repeats)}


def group_traindata_memory(args) -> dict:
    base = _load(args.model)
    ids, mask, labels = _completion_batch(args.model, args.data, args.batch, args.shots)
    step = _traindata_step(args.case, args.model, base, ids, mask, labels)
    step()
    release_and_reset_peak()
    before = status("VmRSS")
    step()
    return {"case": args.case, "rss_before": before, "rss_peak": status("VmHWM")}


# --- compile --------------------------------------------------------------------------------------------

def group_compile(args) -> dict:
    import peftc
    from peftc.graph import capture
    from peft import get_peft_model
    base = _load(args.model)
    spec = METHODS["lora-qv"]
    passes, captures, copies = [], [], []

    def cold():
        capture.clear_cache()
        model = peftc.compile(base, spec, seed=0)
        passes.append(model.timings["passes"])
        captures.append(model.timings["capture"] + model.timings["analysis"])

    def cached():
        peftc.compile(base, spec, seed=0)

    def hf():
        model = copies.pop()
        start = time.perf_counter()
        get_peft_model(model, _hf_config("lora-qv"))
        return time.perf_counter() - start

    hf_times = []
    runs = {"cold": cold, "hf": lambda: hf_times.append(hf())}
    for _ in range(args.repeats + 1):
        copies.append(copy.deepcopy(base))      # get_peft_model changes its model: a fresh copy each time
    times = _round_robin(runs, args.repeats)
    times["hf"] = _summary(hf_times[1:])        # get_peft_model alone, without the copy
    capture.clear_cache()
    peftc.compile(base, spec, seed=0)
    times.update(_round_robin({"cached": cached}, args.repeats))
    times["passes"] = _summary(passes[1:])
    times["capture"] = _summary(captures[1:])
    return {"times": times}


# --- inference and export -------------------------------------------------------------------------------

def group_infer(args) -> dict:
    import peftc
    base = _load(args.model)
    ids, mask = _batch(base.config, 1, args.seq)
    unmerged = peftc.compile(base, INFER_SPEC, seed=0)
    merged = unmerged.merge()

    def run(fn):
        def call():
            with torch.inference_mode():
                fn()
        return call
    runs = {"base": run(lambda: base(input_ids=ids, attention_mask=mask, use_cache=False)),
            "unmerged": run(lambda: unmerged(ids, mask)), "merged": run(lambda: merged(ids, mask))}
    return {"batch": list(ids.shape), "times": _round_robin(runs, max(args.repeats, 10))}


def _export_runs(ref: str, out: Path, details: list) -> tuple[dict, object]:
    import peftc
    from peftc.graph.capture import dynamic_shapes, max_positions
    from peftc.export.onnx import quiet
    base = _load(ref)
    base.config.use_cache = False
    merged = peftc.compile(base, INFER_SPEC, seed=0).merge()
    ids, mask = _batch(base.config, 2, 16)

    def ours():
        details.append(peftc.export_onnx(merged, out / "merged.onnx"))

    def plain():
        with quiet():
            torch.onnx.export(base, (), str(out / "plain.onnx"), kwargs={"input_ids": ids, "attention_mask": mask},
                              dynamo=True, dynamic_shapes=dynamic_shapes(max_positions(base.config)),
                              input_names=["input_ids", "attention_mask"], output_names=["logits"])
    return {"peftc": ours, "plain": plain}, base


def group_export(args) -> dict:
    """Both exports alternate; the warm-up round (first use of torch.onnx and ONNX Runtime) runs on
    tiny-llama, so a 40-second export of a real model is not spent on it."""
    import peftc
    out = Path(tempfile.mkdtemp(prefix="peftc-bench-"))
    details = []
    if args.model != "tiny-llama":
        for warm_up in _export_runs("tiny-llama", out, details)[0].values():
            warm_up()
        details.clear()
    runs, base = _export_runs(args.model, out, details)
    times = _round_robin(runs, args.repeats, warm_up=args.model == "tiny-llama")
    if args.model == "tiny-llama":
        del details[0]
    last = details[-1]
    parts = {k: _summary([d.seconds[k] for d in details]) for k in last.seconds}
    base_result = peftc.export_onnx(peftc.compile(base, "", seed=0), out / "base.onnx", verify=False)
    latency = _ort_latency(out / "merged.onnx", out / "base.onnx", args, base.config)
    plain_nodes = sum(peftc.export.onnx.onnx_op_counts(out / "plain.onnx").values())
    return {"times": times, "peftc_parts": parts, "route": last.route, "max_abs_diff": last.max_abs_diff,
            "merged_ops": dict(last.op_counts), "base_ops": dict(base_result.op_counts),
            "plain_nodes": plain_nodes, "ort": latency}


def _ort_latency(merged: Path, base: Path, args, config) -> dict:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    ids, mask = _batch(config, 1, args.seq)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in (("merged", merged), ("base", base))}
    runs = {name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}
    return {"batch": list(ids.shape), "times": _round_robin(runs, max(args.repeats, 20))}


GROUPS = {"train": group_train, "train-memory": group_train_memory, "traindata": group_traindata,
          "traindata-memory": group_traindata_memory, "compile": group_compile, "infer": group_infer,
          "export": group_export}


def run(argv: list[str]) -> dict:
    """Run one group as ``python bench/cases.py GROUP MODEL [options]`` would, and return its result."""
    parser = argparse.ArgumentParser()
    parser.add_argument("group", choices=sorted(GROUPS))
    parser.add_argument("model")
    parser.add_argument("--case", default="")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--data", type=Path, default=ROOT / "samples" / "dates" / "train.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return GROUPS[args.group](args)


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1:]), default=str))

"""Serving many tasks: mixed-task batches, the OpenAI-compatible server, and the adapter bank's memory.

    python bench/serve.py                    # writes bench/SERVE.md and bench/serve.json
    python bench/serve.py --quick            # tiny-llama, short runs, one round: a check of the harness (writes
                                             # its report under --work, not bench/)

SmolLM2-135M with eight LoRAs of ``samples/lora-random.peft`` (B non-zero from the start), seeds 1..8, each
written as ``peftc compile --out`` writes a run directory. Then, in this process unless said otherwise:

1. **Mixed batch.** 8 left-padded rows (prompts of 16 to 58 tokens), greedy with the KV cache, 32 new tokens
   (eos masked, so every run decodes exactly that many), one thread, in torch (``AdapterBank.torch_engine()``)
   and in ONNX Runtime (``OnnxEngine`` of ``AdapterBank.export_onnx``), in alternating rounds (median):
   the 8-adapter bank with one adapter per row (*mixed*), a bank of the first adapter alone with every row on
   it (*single*), and a bank of no adapter, every row on the base (what a merged adapter costs: the floor).
   Decode tokens/s counts every row's tokens after the first step (the prefill). Row 0 has the same adapter
   and prompt in *mixed* and *single*, so its tokens must be the same in both.
2. **Server.** ``peftc serve`` on the 8-adapter ONNX bank directory, a subprocess on 127.0.0.1 (``--port 0``,
   ONNX Runtime's default threads, ``--max-batch 8``); 24 completion requests (greedy; prompts of about 136
   tokens; ``max_tokens`` 32, then 128, as two workloads: a prompt's prefill costs the same batched or not,
   so the ratio depends on how much of the work is decoding) over 4 of the adapters, sent by 8 concurrent
   clients (the official ``openai`` package, one thread and one client each, 3 requests each) and the same requests one after another from one client, in alternating
   rounds after a warm-up request per adapter. Total tokens/s is the completion tokens the server reports
   over the wall time of the whole set; latency is each request's, from the client's call to its answer.
3. **Memory.** One process per configuration under ``/usr/bin/time -v``, three alternating rounds (median): load
   the bank of N = 0 (the base alone), 1 and 8 adapters, then run one prefill, in torch (``AdapterBank.load``) and from the ONNX bank
   directory (``OnnxEngine``). Peak RSS is time's maximum resident set; the process also reports its
   resident set after the step. The extra adapters' own bytes are the tensors in their
   ``peftc_adapter.safetensors``."""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import peftc  # noqa: E402
from peftc.export.genai import left_padded  # noqa: E402
from peftc.rundir import write_compiled  # noqa: E402
from peftc.serve.bank import AdapterBank  # noqa: E402
from peftc.serve.bank_onnx import OnnxEngine  # noqa: E402
from peftc.serve.engine import BASE  # noqa: E402
from peftc.serve.rows import join_starts  # noqa: E402
from peftc.training.data import load_codec, read_jsonl  # noqa: E402

FULL = {"model": "smollm2-135m", "adapters": 8, "rows": 8, "new": 32, "rounds": 3, "server_adapters": 4,
        "clients": 8, "per_client": 3, "max_tokens": (32, 128), "server_rounds": 2, "memory_rounds": 3}
QUICK = {"model": "tiny-llama", "adapters": 8, "rows": 8, "new": 8, "rounds": 1, "server_adapters": 4,
         "clients": 8, "per_client": 1, "max_tokens": (8,), "server_rounds": 1, "memory_rounds": 1}
#: the bank sizes loaded: 0 (the base alone), 1 (the single-adapter peer) and all of them
BANK_SIZES = (0, 1, 8)
GOALS = {"mixed_over_single": 0.8, "concurrent_over_sequential": 3.0}
SERVER_START_S = 600


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def make_adapters(model_ref: str, work: Path, count: int) -> dict[str, Path]:
    """``count`` run directories of samples/lora-random.peft, seeds 1..count, on one loaded base."""
    base = peftc.load_model(model_ref)
    spec = (ROOT / "samples" / "lora-random.peft").read_text()
    dirs = {}
    for i in range(count):
        model = peftc.compile(base, spec, seed=i + 1)
        dirs[f"lora{i + 1}"] = work / "adapters" / f"lora{i + 1}"
        write_compiled(dirs[f"lora{i + 1}"], model, model.spec, model_ref, model.report())
    return dirs


def first(dirs: dict[str, Path], n: int) -> dict[str, Path]:
    return dict(list(dirs.items())[:n])


def text_items() -> list[str]:
    return [r.prompt + r.completion for r in read_jsonl(ROOT / "samples/dates/train.jsonl")[:400]]


def batch_prompts(codec, rows: int) -> list[list[int]]:
    """One prompt a row, 16 + 6·row tokens of the dates task's text (each from its own place in it)."""
    items = text_items()
    return [codec.encode_prompt("\n".join(items[10 * row:10 * row + 10]), False)[:16 + 6 * row] for row in range(rows)]


def server_prompts(count: int) -> list[str]:
    """Three solved date conversions and a fourth to solve: the model goes on with the list (no early eos)."""
    items, records = text_items(), read_jsonl(ROOT / "samples/dates/test.jsonl")
    return ["\n".join(items[3 * i:3 * i + 3] + [records[i].prompt]) for i in range(count)]


def decode_run(engine, names: list[str], prompts: list[list[int]], new: int, eos: int, pad: int):
    """Greedy decoding of a left-padded batch, each row from its adapter's starting cache, exactly ``new``
    tokens a row; returns (first step s, decode tokens/s over every row after it, tokens (rows, new))."""
    ids, mask = left_padded(prompts, pad)
    past, start = join_starts(engine, names)
    mask = np.concatenate([start, mask], 1)
    task_ids = engine.task_ids(names)
    tokens, first_s = [], None
    begin = time.perf_counter()
    while len(tokens) < new:
        logits, past = engine(ids, mask, past, task_ids)
        last = np.array(logits[:, -1], np.float32)
        last[:, eos] = -np.inf                           # every run decodes exactly ``new`` tokens
        token = last.argmax(-1)
        tokens.append(token)
        first_s = first_s or time.perf_counter() - begin
        ids = token[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((len(names), 1), np.int64)], 1)
    total = time.perf_counter() - begin
    return first_s, len(names) * (new - 1) / (total - first_s), np.stack(tokens, 1)


def prepare_banks(model_ref: str, dirs: dict[str, Path], work: Path) -> dict:
    """The torch banks of 0, 1 and all adapters on one loaded base, and each one's ONNX directory."""
    base = peftc.load_model(model_ref)
    banks, seconds = {}, {}
    for n in BANK_SIZES:
        start = time.perf_counter()
        bank = AdapterBank.load(base, first(dirs, n))
        seconds[f"load {n}"] = time.perf_counter() - start
        start = time.perf_counter()
        print(bank.export_onnx(work / f"bank{n}"), flush=True)
        seconds[f"export {n}"] = time.perf_counter() - start
        banks[n] = bank
    return {"banks": banks, "seconds": seconds,
            "base_bytes": sum(p.numel() * p.element_size() for p in base.parameters())}


def batch_configs(banks: dict, work: Path, names: list[str], rows: int) -> dict:
    """{label: (engine, row names)}: mixed, single and base, torch and ONNX."""
    configs = {}
    for backend in ("torch", "onnx"):
        engine = {n: banks[n].torch_engine() if backend == "torch" else OnnxEngine(work / f"bank{n}", threads=1)
                  for n in BANK_SIZES}
        configs[f"{backend} mixed"] = (engine[8], [names[i % len(names)] for i in range(rows)])
        configs[f"{backend} single"] = (engine[1], [names[0]] * rows)
        configs[f"{backend} base"] = (engine[0], [BASE] * rows)
    return configs


def measure_batches(configs: dict, prompts, cfg: dict, eos: int, pad: int) -> dict:
    """Alternating rounds over the configurations (after a warm-up run each); medians."""
    for engine, names in configs.values():
        decode_run(engine, names, prompts, 2, eos, pad)
    runs = {label: [] for label in configs}
    tokens = {}
    for _ in range(cfg["rounds"]):
        for label, (engine, names) in configs.items():
            first_s, rate, out = decode_run(engine, names, prompts, cfg["new"], eos, pad)
            runs[label].append((first_s, rate))
            tokens[label] = out
    rows = {}
    for label, values in runs.items():
        rows[label] = {"adapters_in_batch": len(set(configs[label][1])), "rows": len(prompts),
                       "first_step_s": statistics.median(v[0] for v in values),
                       "tokens_per_s": statistics.median(v[1] for v in values),
                       "samples_tokens_per_s": [v[1] for v in values]}
        print(label, rows[label], flush=True)
    for backend in ("torch", "onnx"):
        rows[f"{backend} mixed"]["row0_same_tokens_as_single"] = bool(
            (tokens[f"{backend} mixed"][0] == tokens[f"{backend} single"][0]).all())
    return rows


# --- the server ---------------------------------------------------------------------------------------
def start_server(directory: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``peftc serve DIRECTORY --port 0`` as a subprocess; returns it and its base URL once it listens."""
    process = subprocess.Popen([sys.executable, "-m", "peftc.cli", "serve", str(directory), "--host", "127.0.0.1",
                                "--port", "0", "--max-batch", "8"], stdout=subprocess.PIPE,
                               stderr=log.open("w"), text=True, cwd=ROOT)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        found = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line)
        if found:
            return process, found.group(1)
    process.kill()
    raise SystemExit(f"peftc serve did not start: {log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def one_request(client, request: tuple[str, str], max_tokens: int) -> dict:
    model, prompt = request
    start = time.perf_counter()
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return {"model": model, "latency_s": time.perf_counter() - start, "tokens": out.usage.completion_tokens,
            "text": out.choices[0].text}


def run_requests(url: str, requests: list[tuple[str, str]], clients: int, max_tokens: int) -> dict:
    """Every request, spread round-robin over ``clients`` threads (each with its own client, its requests
    one after another); 1 client sends them all in order."""
    from openai import OpenAI

    def client_loop(c: int) -> list[tuple[int, dict]]:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        return [(i, one_request(client, requests[i], max_tokens)) for i in range(c, len(requests), clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [pair for part in pool.map(client_loop, range(clients)) for pair in part]
    wall = time.perf_counter() - start
    results = [r for _, r in sorted(done, key=lambda pair: pair[0])]
    return {"wall_s": wall, "results": results, "tokens": sum(r["tokens"] for r in results)}


def measure_server(bank_dir: Path, names: list[str], cfg: dict, work: Path) -> dict:
    """Concurrent clients against one after another, alternating rounds, for each ``max_tokens`` (see the
    module doc): {"exit_status", ..., "workloads": {max_tokens: figures}}."""
    adapters = names[:cfg["server_adapters"]]
    count = cfg["clients"] * cfg["per_client"]
    prompts = server_prompts(count)
    requests = [(adapters[i % len(adapters)], prompts[i]) for i in range(count)]
    process, url = start_server(bank_dir, work / "server.log")
    runs = {(n, mode): [] for n in cfg["max_tokens"] for mode in ("concurrent", "sequential")}
    try:
        run_requests(url, [(a, prompts[0]) for a in adapters], 1, cfg["max_tokens"][0])      # warm-up
        for _ in range(cfg["server_rounds"]):
            for n in cfg["max_tokens"]:
                runs[n, "sequential"].append(run_requests(url, requests, 1, n))
                runs[n, "concurrent"].append(run_requests(url, requests, cfg["clients"], n))
    finally:
        status = stop_server(process)
    out = {"exit_status": status, "requests": count, "adapters": adapters, "clients": cfg["clients"],
           "workloads": {n: _server_figures({m: runs[n, m] for m in ("concurrent", "sequential")})
                         for n in cfg["max_tokens"]}}
    print("server", out, flush=True)
    return out


def _server_figures(runs: dict) -> dict:
    out = {}
    for mode, rounds in runs.items():
        latencies = [r["latency_s"] for run in rounds for r in run["results"]]
        out[mode] = {"tokens_per_s": statistics.median(run["tokens"] / run["wall_s"] for run in rounds),
                     "samples_tokens_per_s": [run["tokens"] / run["wall_s"] for run in rounds],
                     "tokens": [run["tokens"] for run in rounds], "wall_s": [run["wall_s"] for run in rounds],
                     "p50_latency_s": float(np.percentile(latencies, 50)),
                     "p99_latency_s": float(np.percentile(latencies, 99)), "latencies": len(latencies)}
    texts = {mode: [r["text"] for r in rounds[-1]["results"]] for mode, rounds in runs.items()}
    out["same_text"] = sum(a == b for a, b in zip(texts["concurrent"], texts["sequential"]))
    out["ratio"] = out["concurrent"]["tokens_per_s"] / out["sequential"]["tokens_per_s"]
    return out


# --- memory -------------------------------------------------------------------------------------------
def memory_child(kind: str, n: int, work: Path, model_ref: str) -> None:
    """One configuration's process: load the bank of the first ``n`` adapters, one prefill, print the resident
    set (what /usr/bin/time's peak is compared with)."""
    torch.set_num_threads(1)
    if kind == "torch":
        dirs = sorted((work / "adapters").iterdir(), key=lambda p: int(p.name[4:]))[:n]
        engine = AdapterBank.load(model_ref, {d.name: d for d in dirs}).torch_engine()
    else:
        engine = OnnxEngine(work / f"bank{n}", threads=1)
    name = engine.names[-1]
    past, start = engine.start(name)
    ids = np.arange(1, 17, dtype=np.int64)[None]
    engine(ids, np.concatenate([start, np.ones_like(ids)], 1), past, engine.task_ids([name]))
    status = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    print(json.dumps({"resident_bytes": rss}))


def _memory_process(kind: str, n: int, work: Path, model_ref: str) -> dict:
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, __file__, "--memory-child", kind, "--n", str(n),
                           "--work", str(work), "--model", model_ref], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"the memory process {kind} N={n} failed: {done.stderr[-3000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
    return {"peak_rss_bytes": peak, "resident_bytes": json.loads(done.stdout.strip().splitlines()[-1])["resident_bytes"]}


def measure_memory(work: Path, model_ref: str, dirs: dict[str, Path], rounds: int) -> dict:
    """Each configuration in its own process, ``rounds`` times in alternating order; the median of each
    figure (ONNX Runtime's peak moves by tens of MiB between identical processes)."""
    samples = {f"{kind} {n}": [] for kind in ("torch", "onnx") for n in BANK_SIZES}
    for _ in range(rounds):
        for key in samples:
            kind, n = key.split()
            samples[key].append(_memory_process(kind, int(n), work, model_ref))
            print(key, samples[key][-1], flush=True)
    out = {key: {figure: statistics.median(s[figure] for s in runs) for figure in ("peak_rss_bytes", "resident_bytes")}
           | {"samples": runs} for key, runs in samples.items()}
    from safetensors.numpy import load_file
    sizes = [sum(t.nbytes for t in load_file(str(d / "peftc_adapter.safetensors")).values()) for d in dirs.values()]
    out["adapter_bytes"] = sizes
    out["extra_adapter_bytes"] = sum(sizes[1:8])
    return out


# --- the report ---------------------------------------------------------------------------------------
MIB = 1 << 20


def ratios(batches: dict, server: dict, memory: dict) -> dict:
    out = {}
    for backend in ("torch", "onnx"):
        mixed = batches[f"{backend} mixed"]["tokens_per_s"]
        out[f"{backend} mixed / single"] = mixed / batches[f"{backend} single"]["tokens_per_s"]
        out[f"{backend} mixed / base"] = mixed / batches[f"{backend} base"]["tokens_per_s"]
    for n, figures in server["workloads"].items():
        out[f"server concurrent / sequential, max_tokens {n}"] = figures["ratio"]
    for kind in ("torch", "onnx"):
        for key in ("peak_rss_bytes", "resident_bytes"):
            eight, one, base = (memory[f"{kind} {n}"][key] for n in (8, 1, 0))
            out[f"{kind} {key} (8 - 1) / 7 adapters"] = (eight - one) / memory["extra_adapter_bytes"]
            out[f"{kind} {key} 8 / base"] = eight / base
    return out


def batch_lines(batches: dict) -> list[str]:
    lines = ["| engine | bank | rows on | decode tokens/s (8 rows) | first step (ms) | samples |",
             "|---|---|---|---|---|---|"]
    what = {"mixed": ("8 adapters", "one adapter each"), "single": ("1 adapter", "that adapter"),
            "base": ("no adapter", "the base")}
    for label, row in batches.items():
        backend, kind = label.split()
        bank, on = what[kind]
        samples = ", ".join(f"{v:.1f}" for v in row["samples_tokens_per_s"])
        lines.append(f"| {'torch' if backend == 'torch' else 'ONNX Runtime'} | {bank} | {on} | "
                     f"{row['tokens_per_s']:.1f} | {1000 * row['first_step_s']:.0f} | {samples} |")
    same = {b: batches[f"{b} mixed"]["row0_same_tokens_as_single"] for b in ("torch", "onnx")}
    lines += ["", f"Row 0 (same adapter and prompt) decodes the same tokens in the mixed batch as in the single "
                  f"one: torch {'yes' if same['torch'] else 'no'}, ONNX Runtime {'yes' if same['onnx'] else 'no'}."]
    return lines


def server_lines(server: dict) -> list[str]:
    lines = [f"{server['requests']} requests over {', '.join(server['adapters'])} (greedy), with each max_tokens; "
             f"server exit status {server['exit_status']} after SIGTERM.", "",
             "| max_tokens | clients | total tokens/s | samples | completion tokens | p50 latency (s) | p99 latency (s) |",
             "|---|---|---|---|---|---|---|"]
    for n, figures in server["workloads"].items():
        for mode in ("concurrent", "sequential"):
            row = figures[mode]
            clients = f"{server['clients']} concurrent" if mode == "concurrent" else "1 (one after another)"
            samples = ", ".join(f"{v:.1f}" for v in row["samples_tokens_per_s"])
            lines.append(f"| {n} | {clients} | {row['tokens_per_s']:.1f} | {samples} | "
                         f"{'/'.join(map(str, row['tokens']))} | {row['p50_latency_s']:.2f} | {row['p99_latency_s']:.2f} |")
    same = ", ".join(f"{f['same_text']} of {server['requests']} at max_tokens {n}" for n, f in server["workloads"].items())
    lines += ["", f"Latencies over every round's requests; the same completion text concurrently as one after "
                  f"another: {same}."]
    return lines


def server_goal(server: dict) -> str:
    parts = []
    for n, f in server["workloads"].items():
        c, s = f["concurrent"], f["sequential"]
        parts.append(f"max_tokens {n}: {goal(f['ratio'], GOALS['concurrent_over_sequential'])}, p50 / p99 latency "
                     f"{c['p50_latency_s']:.2f} / {c['p99_latency_s']:.2f} s concurrently, {s['p50_latency_s']:.2f} / "
                     f"{s['p99_latency_s']:.2f} s one after another")
    return "; ".join(parts)


def memory_goal(data: dict) -> str:
    """The memory goal's line: per engine, (RSS with 8 adapters − with 1) ÷ the 7 extra adapters' bytes and 8 ÷
    the base alone; no ratio where identical processes differ by more than those bytes."""
    r, memory = data["ratios"], data["memory"]
    parts = []
    for kind, label in (("torch", "torch"), ("onnx", "ONNX Runtime")):
        spread = max(max(x["peak_rss_bytes"] for x in memory[f"{kind} {n}"]["samples"])
                     - min(x["peak_rss_bytes"] for x in memory[f"{kind} {n}"]["samples"]) for n in BANK_SIZES)
        if spread > memory["extra_adapter_bytes"]:
            parts.append(f"{label}: identical processes' peak RSS differed by up to {spread / MIB:.0f} MiB, more than "
                         f"the 7 extra adapters' {memory['extra_adapter_bytes'] / MIB:.1f} MiB, so no ratio (the table)")
            continue
        parts.append(f"{label}: (RSS with 8 adapters − RSS with 1) ÷ the 7 extra adapters' bytes, peak "
                     f"{r[f'{kind} peak_rss_bytes (8 - 1) / 7 adapters']:.2f}, resident "
                     f"{r[f'{kind} resident_bytes (8 - 1) / 7 adapters']:.2f}; RSS with 8 adapters ÷ the base alone, "
                     f"peak {r[f'{kind} peak_rss_bytes 8 / base']:.3f}, resident {r[f'{kind} resident_bytes 8 / base']:.3f}")
    return "; ".join(parts) + "."


def memory_lines(memory: dict, base_bytes: int) -> list[str]:
    lines = ["| engine | adapters | peak RSS (MiB) | samples | resident after a prefill (MiB) |", "|---|---|---|---|---|"]
    for kind in ("torch", "onnx"):
        for n in BANK_SIZES:
            row = memory[f"{kind} {n}"]
            peaks = ", ".join(f"{r['peak_rss_bytes'] / MIB:.0f}" for r in row["samples"])
            lines.append(f"| {'torch AdapterBank.load' if kind == 'torch' else 'ONNX Runtime OnnxEngine'} | {n} | "
                         f"{row['peak_rss_bytes'] / MIB:.1f} | {peaks} | {row['resident_bytes'] / MIB:.1f} |")
    lines += ["", f"The base's own weights: {base_bytes / MIB:.1f} MiB; one adapter: "
                  f"{memory['adapter_bytes'][0] / MIB:.2f} MiB; the 7 extra adapters of N = 8: "
                  f"{memory['extra_adapter_bytes'] / MIB:.2f} MiB."]
    return lines


def goal(value: float, target: float) -> str:
    return f"{value:.2f} (goal ≥ {target:g}: {'met' if value >= target else 'missed'})"


def report(data: dict, out: Path) -> str:
    r, cfg = data["ratios"], data["config"]
    lines = ["# Serving many tasks (bench/serve.py)", "",
             f"CPU: {data['cpu']} ({data['cores']} cores); {cfg['model']} with {cfg['adapters']} LoRAs of "
             f"samples/lora-random.peft (seeds 1..{cfg['adapters']}); {data['minutes']:.1f} minutes in all. "
             "How each figure is measured: the docstring of bench/serve.py.", "",
             "## Goals", "",
             f"- Mixed batch (8 rows over 8 LoRAs) ÷ the same batch on one adapter, decode tokens/s: torch "
             f"{goal(r['torch mixed / single'], GOALS['mixed_over_single'])}, ONNX Runtime "
             f"{goal(r['onnx mixed / single'], GOALS['mixed_over_single'])}. Against the base with no adapter (the "
             f"cost of a merged adapter): torch {r['torch mixed / base']:.2f}, ONNX Runtime {r['onnx mixed / base']:.2f}.",
             f"- Server, 8 concurrent clients over 4 adapters ÷ the same requests one after another, total "
             f"tokens/s (prompts of about 136 tokens; the ratio grows with the completion's share of the work, as "
             f"prefill costs the same either way): {server_goal(data['server'])}.",
             f"- Memory: {memory_goal(data)}",
             "", f"## Mixed batch ({cfg['rows']} rows, {cfg['new']} new tokens, one thread, median of {cfg['rounds']} "
             "alternating rounds)", "", *batch_lines(data["batches"]),
             "", f"## Server (peftc serve, ONNX Runtime; median of {cfg['server_rounds']} alternating rounds)", "",
             *server_lines(data["server"]), "", f"## Memory (one process per configuration, median of {cfg['memory_rounds']} alternating rounds)",
             "",
             *memory_lines(data["memory"], data["base_bytes"]), "",
             "Preparation (in this process): " + ", ".join(f"bank {k} {v:.1f} s" for k, v in data["prepare_s"].items())
             + "."]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/peftc-bench-serve", help="where the adapters and exports go")
    parser.add_argument("--quick", action="store_true", help="tiny-llama, short runs, one round; the report goes "
                        "to --out, by default the work directory")
    parser.add_argument("--out", help="where SERVE.md and serve.json go (default bench/, or --work with --quick)")
    parser.add_argument("--memory-child", choices=("torch", "onnx"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.memory_child:
        return memory_child(args.memory_child, args.n, work, args.model)
    cfg = QUICK if args.quick else FULL
    out = Path(args.out) if args.out else work if args.quick else ROOT / "bench"
    torch.set_num_threads(1)
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    dirs = make_adapters(cfg["model"], work, cfg["adapters"])
    made = prepare_banks(cfg["model"], dirs, work)
    codec = load_codec(cfg["model"])
    pad = codec.tokenizer.pad_token_id if isinstance(codec.tokenizer.pad_token_id, int) else 0
    configs = batch_configs(made["banks"], work, list(dirs), cfg["rows"])
    batches = measure_batches(configs, batch_prompts(codec, cfg["rows"]), cfg, codec.eos_id, pad)
    del configs
    made["banks"].clear()
    server = measure_server(work / "bank8", list(dirs), cfg, work)
    memory = measure_memory(work, cfg["model"], dirs, cfg["memory_rounds"])
    data = {"cpu": cpu_name(), "cores": os.cpu_count(), "config": cfg, "batches": batches, "server": server,
            "memory": memory, "base_bytes": made["base_bytes"], "prepare_s": made["seconds"],
            "ratios": ratios(batches, server, memory), "minutes": (time.perf_counter() - start) / 60}
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(data, indent=1))
    print(report(data, out / "SERVE.md"))


if __name__ == "__main__":
    main()

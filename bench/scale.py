"""Peak memory and time at real sizes: peftc against HF PEFT and HF PEFT + bitsandbytes on random LLaMA
checkpoints saved in bfloat16, which this script writes itself, shard by shard (one layer in memory at a time).

    python bench/scale.py                        # 0.5b, 1.5b, 3b and 13b; writes bench/SCALE.md and bench/scale.png
    python bench/scale.py --sizes tiny --out /tmp/scale    # a seconds-long check of the harness

Every configuration runs in its own process under ``/usr/bin/time -v`` (peak RSS is its "Maximum resident
set size"): ``peftc compile`` of ``lora q, v r=8`` and of ``quant nf4 base; lora q, v r=8``; one training
step on 1×128 tokens after each; HF PEFT (bf16) and HF PEFT on a bitsandbytes NF4 base loading the same
checkpoint and taking the same step; ``peftc export`` of the merged LoRA run at the sizes given by
``--export``. A tool that does not fit in memory is recorded as such (killed, or exit status)."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEFTC = [sys.executable, "-m", "peftc.cli"]
#: LLaMA shapes (hidden, layers, intermediate, heads); vocab 32000, untied head
SIZES = {
    "tiny": (64, 2, 128, 4),
    "0.5b": (1280, 24, 3456, 20),
    "1.5b": (2048, 24, 5632, 16),
    "3b": (2560, 32, 6912, 20),
    "13b": (5120, 42, 13824, 40),
}
SPECS = {"lora": "lora q, v r=8\n", "qlora": "quant nf4 base; lora q, v r=8\n"}
VOCAB = 32000


def parameters(size: str) -> int:
    hidden, layers, inter, _ = SIZES[size]
    return 2 * VOCAB * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) + hidden


def build(directory: Path, size: str) -> Path:
    """A random bf16 LLaMA checkpoint of ``size`` in ``directory`` (kept for reuse), one shard per layer."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    if (directory / "model.safetensors.index.json").is_file():
        return directory
    need = 2 * parameters(size)
    free = shutil.disk_usage(directory.parent).free
    if free < 1.1 * need:
        raise SystemExit(f"{size} needs {need / 1e9:.1f} GB of disk for its checkpoint; {free / 1e9:.1f} GB free")
    hidden, layers, inter, heads = SIZES[size]
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
                num_key_value_heads=heads, vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False,
                dtype="bfloat16", architectures=["LlamaForCausalLM"]).save_pretrained(tmp)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0

    def shard(index: int, shapes: dict[str, tuple]) -> None:
        nonlocal total
        name = f"model-{index:05d}-of-{layers + 2:05d}.safetensors"
        tensors = {k: (torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=gen) * 0.02)
                   .to(torch.bfloat16) for k, s in shapes.items()}
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * 2 for t in tensors.values())
    shard(1, {"model.embed_tokens.weight": (VOCAB, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(i + 2, {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                      p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                      p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                      p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                      p + "post_attention_layernorm.weight": (hidden,)})
    shard(layers + 2, {"model.norm.weight": (hidden,), "lm_head.weight": (VOCAB, hidden)})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    tmp.rename(directory)
    return directory


def step_job(tool: str, method: str, model: str, step: bool) -> dict:
    """In the measured process: set up ``method`` with ``tool`` on ``model``, optionally take one training
    step on 1×128 tokens; returns what it measured."""
    import torch
    start = time.perf_counter()
    if tool == "peftc":
        import peftc
        compiled = peftc.compile(model, SPECS[method], seed=0)
        run, params = compiled, [p for p in compiled.parameters() if p.requires_grad]
        tensors = {id(t): t for t in (*compiled.graph_module.parameters(), *compiled.graph_module.buffers())}
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16) if method == "qlora" else None
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, quantization_config=quant)
        hf = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        # a training step runs in train mode, as Trainer's does (from_pretrained returns the model in eval).
        # In eval mode bitsandbytes repacks NF4 weights for a fused AVX512-BF16 CPU kernel (on CPUs that have
        # it) whose rounding differs from dequantize + linear: the 1.5B first loss was 10.7745 that way
        hf.train()
        params = [p for p in hf.parameters() if p.requires_grad]
        tensors = {id(t): t for t in (*hf.parameters(), *hf.buffers())}
        run = lambda ids: hf(input_ids=ids).logits  # noqa: E731
    out = {"setup_s": time.perf_counter() - start,
           "resident_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    out["setup_peak_bytes"] = peak_rss()
    if step:
        from peftc.training.loss import token_loss_sum
        ids = torch.randint(0, VOCAB, (1, 128), generator=torch.Generator().manual_seed(0))
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        start = time.perf_counter()
        loss = token_loss_sum(run(ids), ids) / 127
        loss.backward()
        optimizer.step()
        out.update(step_s=time.perf_counter() - start, loss=loss.item())
    return out


def peak_rss() -> int:
    """This process's peak resident set so far (VmHWM), in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024


def measure(command: list[str], log: Path) -> dict:
    """Run ``command`` under ``/usr/bin/time -v``; its peak RSS, wall time, exit status and RESULT line."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    result = {"rc": done.returncode, "wall_s": time.perf_counter() - start,
              "peak_bytes": int(peak.group(1)) * 1024 if peak else None}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result.update(json.loads(line[len("RESULT "):]))
    return result


def run_size(size: str, work: Path, export: bool, results: dict) -> None:
    checkpoint = build(work / f"llama-{size}", size)
    bf16 = 2 * parameters(size)
    row = results.setdefault(size, {"parameters": parameters(size), "bf16_bytes": bf16})
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    for method, spec in SPECS.items():
        if method == "lora" and bf16 > 0.8 * ram_bytes():
            row["skipped"] = (f"lora q, v (peftc and HF PEFT) needs the bf16 weights resident: {gib(bf16)} GiB, "
                              f"over this machine's {gib(ram_bytes())} GiB")
            continue
        spec_file = work / f"{method}.peft"
        spec_file.write_text(spec)
        out = work / f"run-{size}-{method}"
        shutil.rmtree(out, ignore_errors=True)
        row[f"peftc compile {method}"] = measure([*PEFTC, "compile", str(spec_file), "--model", str(checkpoint),
                                                  "--out", str(out)], logs / f"{size}-compile-{method}.log")
        for tool in ("peftc", "hf"):
            row[f"{tool} step {method}"] = measure([sys.executable, __file__, "--job", tool, method, str(checkpoint)],
                                                   logs / f"{size}-{tool}-step-{method}.log")
        print(size, method, json.dumps({k: v for k, v in row.items() if method in k}), flush=True)
    if export:
        onnx = work / f"export-{size}.onnx"
        row["peftc export lora"] = measure([*PEFTC, "export", str(work / f"run-{size}-lora"), "--onnx", str(onnx)],
                                           logs / f"{size}-export.log")
        for path in (onnx, onnx.with_name(onnx.name + ".data")):
            path.unlink(missing_ok=True)


def baseline() -> int:
    """The peak RSS of a process that only imports what every configuration imports."""
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", "import peftc.cli, transformers"],
                          capture_output=True, text=True, cwd=ROOT)
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024


def ram_bytes() -> int:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemTotal:\s+(\d+) kB", text).group(1)) * 1024


def gib(n) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


def ratio(a, b) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}"


def table(results: dict, cpu: str) -> str:
    lines = ["# Scale: peak memory and time on random bf16 LLaMA checkpoints", "",
             f"Written by `python bench/scale.py` on {cpu}. Peak RSS is `/usr/bin/time -v`'s maximum resident set",
             "size, one process per configuration; GiB = 2^30 bytes. A dash: the tool did not finish (out of memory",
             "or not run at that size).", "",
             "| size | parameters | bf16 GiB | configuration | peak GiB | wall s | peak / bf16 | resident GiB | "
             "peak / resident | loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for size, row in results.items():
        for name, r in row.items():
            if not isinstance(r, dict):
                continue
            peak = r.get("peak_bytes") if r.get("rc") == 0 else None
            loss = f"{r['loss']:.4f}" if "loss" in r else ""
            lines.append(f"| {size} | {row['parameters'] / 1e9:.2f}B | {gib(row['bf16_bytes'])} | {name} | {gib(peak)} | "
                         f"{r['wall_s']:.0f} | {ratio(peak, row['bf16_bytes'])} | {gib(r.get('resident_bytes'))} | "
                         f"{ratio(peak, r.get('resident_bytes'))} | {loss} |")
    lines += [f"- {size}: not run: {row['skipped']}" for size, row in results.items() if "skipped" in row]
    lines += ["", "Every process starts at the peak of importing torch, transformers and peftc: "
              f"{gib(baseline())} GiB here (`python -c 'import peftc.cli, transformers'`), included in every peak."]
    lines += ["", "## Goals", ""] + goals(results)
    return "\n".join(lines) + "\n"


def goals(results: dict) -> list[str]:
    out = []
    for size, row in results.items():
        def peak(name):
            r = row.get(name) or {}
            return r.get("peak_bytes") if r.get("rc") == 0 else None
        q_compile, q_step = peak("peftc compile qlora"), row.get("peftc step qlora") or {}
        # HF PEFT's counterpart of a compile is its load and get_peft_model: its process's peak before the step
        hf_q = (row.get("hf step qlora") or {}).get("setup_peak_bytes") if peak("hf step qlora") else None
        checks = [
            ("`quant nf4 base; lora q, v` compile peak ≤ 1.3 × the compiled model's resident size",
             q_compile, q_step.get("resident_bytes"), 1.3),
            ("... and ≤ 0.4 × HF PEFT + bitsandbytes' peak loading the same checkpoint", q_compile, hf_q, 0.4),
            ("`lora q, v` compile peak ≤ 1.2 × the bf16 checkpoint", peak("peftc compile lora"), row["bf16_bytes"], 1.2),
            ("`peftc export` peak ≤ 1.5 × the bf16 checkpoint", peak("peftc export lora"), row["bf16_bytes"], 1.5),
        ]
        for what, a, b, goal in checks:
            if a is None or not b:
                continue
            met = "met" if a / b <= goal else "missed"
            out.append(f"- {size}: {what}: {a / b:.2f} ({met})")
        ours, theirs = q_step.get("loss"), (row.get("hf step qlora") or {}).get("loss")
        if ours is not None and theirs is not None:
            out.append(f"- {size}: first QLoRA loss, peftc {ours:.4f} vs HF PEFT + bitsandbytes {theirs:.4f}")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = sorted({k for row in results.values() for k, v in row.items() if isinstance(v, dict)})
    for name in names:
        points = [(row["parameters"] / 1e9, row[name]["peak_bytes"] / 2**30) for row in results.values()
                  if name in row and row[name].get("rc") == 0 and row[name].get("peak_bytes")]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.axhline(24, color="grey", linestyle=":", label="this machine's RAM (24 GiB)")
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return "an unknown CPU"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--job":
        tool, method, model = sys.argv[2:5]
        print("RESULT " + json.dumps(step_job(tool, method, model, step=True)), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.5b,1.5b,3b,13b", help="comma-separated, of " + ", ".join(SIZES))
    parser.add_argument("--export", default="0.5b,1.5b,tiny", help="sizes whose merged LoRA run is exported")
    parser.add_argument("--work", default=str(ROOT / "out" / "scale"), help="checkpoints, runs and logs")
    parser.add_argument("--out", default=str(ROOT / "bench"), help="where SCALE.md, scale.json and scale.png go")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "scale.json").read_text()) if (out / "scale.json").is_file() else {}
    for size in args.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"unknown size '{size}'; sizes: {', '.join(SIZES)}")
        results.pop(size, None)
        run_size(size, work, size in args.export.split(","), results)
        ordered = dict(sorted(results.items(), key=lambda kv: kv[1]["parameters"]))
        (out / "scale.json").write_text(json.dumps(ordered, indent=1))
        (out / "SCALE.md").write_text(table(ordered, cpu_name()))
        plot(ordered, out / "scale.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""QLoRA benchmark on SmolLM2-135M: memory and time of a training step, NF4 quantization throughput, and
the size and ONNX Runtime latency of the fp32, nf4 and int4 exports.

    .venv/bin/python bench/qlora.py                 # everything (8 to 15 minutes on 2 CPU cores)
    .venv/bin/python bench/qlora.py --skip-onnx     # training and quantization only (3 to 6 minutes)

Every training configuration runs in its own subprocess, so peak resident memory is not polluted by
another one. In each, the model is loaded and compiled, freed memory is handed back to the OS
(``malloc_trim``), the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), and then one
warm-up and ``--steps`` timed AdamW steps run; "step peak" is the highest RSS during those steps and
"lifetime peak" includes loading. Configurations:

- peftc QLoRA: ``quant nf4 base; lora q, v r=8``
- peftc LoRA:  ``lora q, v r=8`` (the same adapter on float32 weights)
- HF PEFT + bitsandbytes 4-bit: ``BitsAndBytesConfig(load_in_4bit, nf4, double quant, float32 compute)``
  and ``LoraConfig(r=8, target_modules=[q_proj, v_proj])``, when it runs on this CPU (it says so if not)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QLORA = "quant nf4 base; lora q, v r=8"
LORA = "lora q, v r=8"
CONFIGS = {"peftc-qlora": "peftc QLoRA (nf4 base)", "peftc-lora": "peftc LoRA (fp32 base)",
           "hf-bnb-qlora": "HF PEFT + bitsandbytes 4-bit"}
MIB = 2 ** 20
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import release_and_reset_peak, status  # noqa: E402  (bench/ is not a package)


# --- measurements inside a worker ---------------------------------------------------------------------

def _batch(args, vocab: int):
    import torch
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    return ids, torch.ones_like(ids)


def _build(mode: str, args):
    """(forward(ids, mask) -> logits, trainable parameters, frozen tensors to check afterwards)."""
    import torch
    import peftc
    if mode.startswith("peftc"):
        model = peftc.compile(args.model, QLORA if mode == "peftc-qlora" else LORA, seed=0)
        model.train()
        frozen = {n: t for n, t in list(model.named_buffers()) + list(model.named_parameters()) if not t.requires_grad}
        return model, [p for p in model.parameters() if p.requires_grad], frozen, model.config.vocab_size
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peftc.models import resolve
    _kind, directory = resolve(args.model)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), quantization_config=quant, device_map="cpu",
                                              dtype=torch.float32)
    hf = get_peft_model(hf, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    hf.train()

    def forward(ids, mask):
        return hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return forward, [p for p in hf.parameters() if p.requires_grad], {}, hf.config.vocab_size


def worker_train(args) -> dict:
    import torch
    torch.manual_seed(0)
    start = time.perf_counter()
    forward, params, frozen, vocab = _build(args.mode, args)
    setup_s = time.perf_counter() - start
    before = {n: t.detach().clone() for n, t in list(frozen.items())[:8]}
    ids, mask = _batch(args, vocab)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    release_and_reset_peak()
    resident = status("VmRSS")
    times, losses = [], []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        logits = forward(ids, mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        del logits
        if step:                                  # the first step is a warm-up
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    unchanged = all(torch.equal(before[n], frozen[n]) for n in before)
    return {"mode": args.mode, "setup_s": setup_s, "resident_before_step": resident,
            "step_peak": status("VmHWM"), "lifetime_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_s": statistics.median(times), "losses": losses, "frozen_unchanged": unchanged,
            "trainable": sum(p.numel() for p in params)}


def worker_quantize(args) -> dict:
    """NF4 quantization of every base linear of the model: peftc vs bitsandbytes, bytes compared."""
    import torch
    import bitsandbytes.functional as bnb
    import peftc
    from peftc.quant import nf4
    model = peftc.load_model(args.model)
    weights = [m.weight.detach() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")]
    numel = sum(w.numel() for w in weights)
    out, identical = {}, 0
    for name in ("peftc", "bitsandbytes"):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            if name == "peftc":
                results = [nf4.quantize(w, 64, True) for w in weights]
            else:
                results = [bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                           for w in weights]
            best = min(best, time.perf_counter() - t0)
        out[name] = results
        out[name + "_s"] = best
    for ours, (packed, state) in zip(out["peftc"], out["bitsandbytes"]):
        identical += int(torch.equal(ours.packed, packed.reshape(-1)) and torch.equal(ours.absmax, state.absmax)
                         and torch.equal(ours.absmax_scale, state.state2.absmax))
    return {"linears": len(weights), "weights": numel, "peftc_s": out["peftc_s"], "bnb_s": out["bitsandbytes_s"],
            "identical": identical, "bits_per_weight": 8 * sum(q.nbytes for q in out["peftc"]) / numel}


def _ort_latency(path: str, args) -> float:
    import numpy as np
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    gen = np.random.default_rng(0)
    ids = gen.integers(0, 1000, size=(1, args.seq), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for _ in range(2):
        session.run(None, feed)
    t0 = time.perf_counter()
    for _ in range(args.runs):
        session.run(None, feed)
    return (time.perf_counter() - t0) / args.runs


def worker_onnx(args) -> dict:
    """Merge a QLoRA adapter (B small and non-zero, as after training) and export each target."""
    import torch
    import peftc
    from peftc.export.targets import export_target
    model = peftc.compile(args.model, QLORA, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.adapter_parameters().items():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=gen) * 1e-3)
    merged = model.merge()
    ids = torch.randint(0, 1000, (2, 64), generator=gen)
    with torch.no_grad():
        float_base = peftc.compile(args.model, "", seed=0)(ids)
        quantization = float((model(ids) - float_base).abs().max())
    del float_base
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in ("fp32", "nf4", "int4"):
            t0 = time.perf_counter()
            path = os.path.join(tmp, f"{target}.onnx")
            result = export_target(merged, path, target)
            export_s = time.perf_counter() - t0
            rows.append({"target": target, "bytes": result.export.size_bytes, "ort_vs_torch": result.export.max_abs_diff,
                         "vs_merged": result.vs_merged, "logits_absmax": result.merged_absmax,
                         "bits": result.bits_per_weight, "latency_s": _ort_latency(path, args), "export_s": export_s})
            os.remove(path)
    return {"targets": rows, "nf4_base_vs_float": quantization}


# --- the driver ----------------------------------------------------------------------------------------

def _run_worker(kind: str, args, mode: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq", str(args.seq), "--runs", str(args.runs)]
    if mode:
        cmd += ["--mode", mode]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail}
    return json.loads(lines[-1])


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps after one warm-up; "
                        "the step time is their median")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=10, help="ONNX Runtime runs per latency figure")
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--worker", choices=("train", "quantize", "onnx"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work = {"train": worker_train, "quantize": worker_quantize, "onnx": worker_onnx}[args.worker]
        print(json.dumps(work(args)))
        return 0

    begin = time.perf_counter()
    print(f"QLoRA benchmark: {args.model}, spec '{QLORA}', batch {args.batch} x {args.seq} tokens, "
          f"{os.cpu_count()} CPU cores\n")
    train = {mode: _run_worker("train", args, mode) for mode in CONFIGS}
    print(f"{'training step':<32}{'weights+opt':>12}{'step peak':>12}{'lifetime':>12}{'step time':>11}   loss")
    for mode, label in CONFIGS.items():
        r = train[mode]
        if "error" in r:
            print(f"{label:<32}does not run here: {r['error']}")
            continue
        print(f"{label:<32}{_mib(r['resident_before_step']):>12}{_mib(r['step_peak']):>12}"
              f"{_mib(r['lifetime_peak']):>12}{r['step_s']:>9.2f} s   {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
              f"{'' if r['frozen_unchanged'] else '  (frozen weights CHANGED)'}")
    q, lora = train["peftc-qlora"], train["peftc-lora"]
    if "error" not in q and "error" not in lora:
        print(f"\npeftc QLoRA / LoRA: step peak x{q['step_peak'] / lora['step_peak']:.2f}, "
              f"resident before the step x{q['resident_before_step'] / lora['resident_before_step']:.2f}, "
              f"step time x{q['step_s'] / lora['step_s']:.2f}")
        hf = train["hf-bnb-qlora"]
        if "error" not in hf:
            print(f"peftc QLoRA / HF PEFT + bitsandbytes: step peak x{q['step_peak'] / hf['step_peak']:.2f}, "
                  f"step time x{q['step_s'] / hf['step_s']:.2f}")

    quant = _run_worker("quantize", args)
    print()
    if "error" in quant:
        print(f"NF4 quantization throughput: failed: {quant['error']}")
    else:
        rate = quant["weights"] / 1e6
        print(f"NF4 quantization of {quant['linears']} linears ({quant['weights']:,} weights, block 64, double quant): "
              f"peftc {rate / quant['peftc_s']:.0f} M weights/s, bitsandbytes {rate / quant['bnb_s']:.0f} M weights/s "
              f"(peftc/bitsandbytes throughput x{quant['bnb_s'] / quant['peftc_s']:.2f}); "
              f"bit-identical on {quant['identical']}/{quant['linears']} linears; {quant['bits_per_weight']:.3f} bits per weight")

    if not args.skip_onnx:
        onnx = _run_worker("onnx", args)
        print()
        if "error" in onnx:
            print(f"ONNX exports: failed: {onnx['error']}")
        else:
            rows = onnx["targets"]
            fp32 = rows[0]
            print(f"{'ONNX export':<12}{'file':>11}{'x fp32':>8}{'ORT latency':>13}{'x fp32':>8}{'ORT vs torch':>14}"
                  f"{'logits vs fp32 merged':>23}")
            for r in rows:
                print(f"{r['target']:<12}{_mib(r['bytes']):>11}{r['bytes'] / fp32['bytes']:>8.2f}"
                      f"{r['latency_s'] * 1000:>10.1f} ms{r['latency_s'] / fp32['latency_s']:>8.2f}"
                      f"{r['ort_vs_torch']:>14.2e}{r['vs_merged']:>23.3g}")
            print(f"(batch 1 x {args.seq} tokens, mean of {args.runs} runs; logits of the fp32 merged model reach "
                  f"{fp32['logits_absmax']:.3g}; the adapter's B was set to N(0, 1e-3) before merging; for scale, "
                  f"the NF4 base itself moves logits from the float base by {onnx['nf4_base_vs_float']:.3g})")
    print(f"\nbenchmark took {time.perf_counter() - begin:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

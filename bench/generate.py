"""Generation speed: peftc's KV-cache export against ONNX Runtime GenAI's own builder and transformers.

    python bench/generate.py                 # writes bench/GENERATE.md and bench/generate.json
    python bench/generate.py --quick         # one short configuration, one round: a check of the harness

SmolLM2-135M with ``samples/lora-random.peft`` (seed 0), merged. From that one merge: ``peftc export --genai``
at fp32 and int4, and ``peftc export --hf``, from which ``python -m onnxruntime_genai.models.builder`` makes
its own fp32 and int4 models. Then, all in this process, one thread each (torch, ONNX Runtime and
onnxruntime-genai sessions), batch 1, greedy, in alternating rounds (the median is reported):

- peftc --genai in onnxruntime-genai (``og.Generator``) and in plain ONNX Runtime (peftc's decode loop);
- the builder's model in onnxruntime-genai;
- transformers ``generate()`` on the merged checkpoint (fp32 only);
- peftc's compiled graph re-run on the whole sequence (``peftc generate --recompute``; short runs only);
- peftc --genai of ``prefix tokens=16`` (the prefix stays in the graph as a constant past) in onnxruntime-genai.

Every decoder is made to produce exactly the number of new tokens asked (eos is not allowed to end a run
early: onnxruntime-genai's ``min_length``, ``generate()``'s ``min_new_tokens``, and the eos logit masked in
peftc's own loops). First-token latency is the time until the first new token exists (the prompt's prefill included);
tokens/s is the decoding rate after it. The int4 agreement counts the dates task's test prompts
(``samples/dates/test.jsonl``) on which each exporter's int4 model of the base SmolLM2 (no adapter: the
random adapter makes every continuation a coin toss) greedy-decodes what its fp32 model does, up to the
end of sequence or 12 tokens (with eos held off, the continuation after the answer is noise)."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import peftc  # noqa: E402
from peftc.export.genai import OnnxStep  # noqa: E402
from peftc.training.data import load_codec, read_jsonl  # noqa: E402

CONFIGS = [(32, 64), (32, 256), (512, 64), (512, 256)]
#: a prefix stays a graph op: its deployed decoder against the merged LoRA's
PREFIX_SPEC = "prefix tokens=16\n"
RECOMPUTE_CONFIGS = {(32, 64)}
ROUNDS = 3
AGREEMENT_PROMPTS = 40
AGREEMENT_TOKENS = 12


def single_thread(directory: Path) -> None:
    """Run a genai directory's sessions on one thread (the same edit for peftc's and the builder's)."""
    path = directory / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = 1
    config["model"]["decoder"]["session_options"]["inter_op_num_threads"] = 1
    path.write_text(json.dumps(config, indent=4))


def prepare(work: Path) -> dict:
    """The merged model and every file the decoders run; returns their paths and the merge."""
    work.mkdir(parents=True, exist_ok=True)
    spec = (ROOT / "samples" / "lora-random.peft").read_text()
    merged = peftc.compile("smollm2-135m", spec, seed=0).merge()
    paths = {"hf": work / "hf"}
    peftc.export_hf(merged, paths["hf"])
    base = peftc.compile("smollm2-135m", "", seed=0).merge()   # the int4 agreement's models: a random adapter
    paths["base-hf"] = work / "base-hf"                     # makes every greedy continuation a coin toss
    peftc.export_hf(base, paths["base-hf"])
    for target in ("fp32", "int4"):
        paths[f"base-peftc-{target}"] = work / f"base-peftc-{target}"
        peftc.export_genai(base, paths[f"base-peftc-{target}"], target)
        _build(paths["base-hf"], work / f"base-builder-{target}", target)
        paths[f"base-builder-{target}"] = work / f"base-builder-{target}"
    prefixed = peftc.compile("smollm2-135m", PREFIX_SPEC, seed=0).merge()
    paths["peftc-prefix"] = work / "peftc-prefix"
    print(peftc.export_genai(prefixed, paths["peftc-prefix"]), flush=True)
    single_thread(paths["peftc-prefix"])
    for target in ("fp32", "int4"):
        paths[f"peftc-{target}"] = work / f"peftc-{target}"
        print(peftc.export_genai(merged, paths[f"peftc-{target}"], target), flush=True)
        paths[f"builder-{target}"] = work / f"builder-{target}"
        _build(paths["hf"], paths[f"builder-{target}"], target)
        for name in (f"peftc-{target}", f"builder-{target}"):
            single_thread(paths[name])
    return {"paths": paths, "merged": merged}


def _build(hf: Path, out: Path, precision: str) -> None:
    """ONNX Runtime GenAI's model builder on a merged checkpoint."""
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                           "-p", precision, "-e", "cpu"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the builder failed on {precision}: {done.stderr[-2000:]}")


class Genai:
    def __init__(self, directory: Path):
        import onnxruntime_genai as og
        self.og, self.model = og, og.Model(str(directory))

    def run(self, prompt: list[int], new: int, exact: bool = True) -> tuple[float, float, list[int]]:
        """(first-token seconds, total seconds, tokens): exactly ``new`` tokens, or with ``exact=False`` up to
        the model's end of sequence."""
        og = self.og
        start = time.perf_counter()
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + (new if exact else 0),
                                  do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens(prompt)
        tokens, first = [], None
        while len(tokens) < new and not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            first = first or time.perf_counter() - start
        return first, time.perf_counter() - start, tokens


class Ort:
    def __init__(self, path: Path, eos: int):
        self.step, self.eos = OnnxStep(path, threads=1), eos

    def run(self, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        ids = np.array([prompt], np.int64)
        mask = np.ones_like(ids)
        past, tokens, first = self.step.empty(1), [], None
        while len(tokens) < new:
            logits, past = self.step(ids, mask, past)
            last = logits[0, -1]
            last[self.eos] = -np.inf                  # as min_length does in onnxruntime-genai
            token = int(last.argmax())
            tokens.append(token)
            first = first or time.perf_counter() - start
            ids = np.array([[token]], np.int64)
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
        return first, time.perf_counter() - start, tokens


class Transformers:
    def __init__(self, directory: Path):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(directory).eval()

    def run(self, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
        from transformers.generation.streamers import BaseStreamer
        times = []

        class Clock(BaseStreamer):
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                      min_new_tokens=new, streamer=Clock(), pad_token_id=0)
        end = time.perf_counter()
        return times[1] - start, end - start, out[0, len(prompt):].tolist()     # times[0]: the prompt itself


class Recompute:
    def __init__(self, merged, eos: int):
        self.model, self.eos = merged.eval(), eos

    def run(self, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        ids, tokens, first = torch.tensor([prompt]), [], None
        with torch.no_grad():
            while len(tokens) < new:
                last = self.model(ids)[0, -1]
                last[self.eos] = -torch.inf           # as min_new_tokens does in generate()
                token = int(last.argmax())
                tokens.append(token)
                first = first or time.perf_counter() - start
                ids = torch.cat([ids, torch.tensor([[token]])], 1)
        return first, time.perf_counter() - start, tokens


def prompt_of(codec, length: int) -> list[int]:
    text = " ".join(r["prompt"] if isinstance(r, dict) else r.prompt for r in read_jsonl(ROOT / "samples/dates/train.jsonl")[:200])
    ids = codec.encode_prompt(text, False)
    return ids[:length]


def measure(decoders: dict, configs, rounds: int, codec) -> list[dict]:
    rows = []
    for prompt_len, new in configs:
        prompt = prompt_of(codec, prompt_len)
        runs = {name: [] for name, (d, only) in decoders.items() if only is None or (prompt_len, new) in only}
        tokens = {}
        for _ in range(rounds):
            for name in runs:
                first, total, out = decoders[name][0].run(prompt, new)
                runs[name].append((first, (new - 1) / (total - first)))
                tokens[name] = out
        for name, values in runs.items():
            rows.append({"decoder": name, "prompt": prompt_len, "new": new,
                         "first_token_s": statistics.median(v[0] for v in values),
                         "tokens_per_s": statistics.median(v[1] for v in values),
                         # only the decoders of the same merged fp32 weights can give generate()'s tokens
                         "same_tokens_as_transformers": tokens[name] == tokens["transformers generate() fp32"]
                         if "fp32" in name and "prefix" not in name else None})
            print(rows[-1], flush=True)
    return rows


def agreement(paths: dict, codec) -> dict:
    """Dates test prompts on which each exporter's int4 model of the base SmolLM2 greedy-decodes what its fp32
    model does."""
    records = [r for r in read_jsonl(ROOT / "samples/dates/test.jsonl")][:AGREEMENT_PROMPTS]
    prompts = [codec.encode_prompt(r.prompt, False) for r in records]
    out = {}
    for kind in ("peftc", "builder"):
        fp32, int4 = Genai(paths[f"base-{kind}-fp32"]), Genai(paths[f"base-{kind}-int4"])
        out[kind] = sum(fp32.run(p, AGREEMENT_TOKENS, exact=False)[2] == int4.run(p, AGREEMENT_TOKENS, exact=False)[2]
                        for p in prompts)
    out["prompts"] = len(prompts)
    return out


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def ratio(rows, config, a, b, key):
    find = {r["decoder"]: r for r in rows if (r["prompt"], r["new"]) == config}
    if a not in find or b not in find:
        return None
    return find[a][key] / find[b][key]


def report(rows, agree, out: Path, seconds: float) -> str:
    lines = ["# Generation speed (bench/generate.py)", "",
             f"CPU: {cpu_name()}, one thread per decoder, batch 1, greedy; SmolLM2-135M + samples/lora-random.peft "
             f"merged; median of {ROUNDS} alternating rounds; {seconds / 60:.1f} minutes in all.", "",
             "| prompt | new | decoder | tokens/s | first token (ms) | tokens = transformers' |", "|---|---|---|---|---|---|"]
    for r in rows:
        same = {True: "yes", False: "no", None: "—"}[r["same_tokens_as_transformers"]]
        lines.append(f"| {r['prompt']} | {r['new']} | {r['decoder']} | {r['tokens_per_s']:.1f} | "
                     f"{1000 * r['first_token_s']:.1f} | {same} |")
    lines += ["", "## Goals", "", "| prompt | new | fp32 tokens/s ÷ builder | ÷ transformers | first token ÷ builder | "
              "int4 tokens/s ÷ builder int4 | prefix tokens/s ÷ merged LoRA |", "|---|---|---|---|---|---|---|"]
    ours, theirs = "peftc --genai fp32 (onnxruntime-genai)", "builder fp32 (onnxruntime-genai)"
    for config in CONFIGS:
        values = [ratio(rows, config, ours, theirs, "tokens_per_s"),
                  ratio(rows, config, ours, "transformers generate() fp32", "tokens_per_s"),
                  ratio(rows, config, ours, theirs, "first_token_s"),
                  ratio(rows, config, "peftc --genai int4 (onnxruntime-genai)", "builder int4 (onnxruntime-genai)",
                        "tokens_per_s"),
                  ratio(rows, config, "peftc --genai prefix tokens=16 fp32 (onnxruntime-genai)", ours, "tokens_per_s")]
        if all(v is None for v in values):
            continue
        lines.append(f"| {config[0]} | {config[1]} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in values)
                     + " |")
    if agree:
        lines += ["", f"Base SmolLM2 (no adapter), int4 greedy tokens ({AGREEMENT_TOKENS}) equal to the same exporter's "
                      f"fp32 model's on {agree['prompts']} dates test prompts: peftc {agree['peftc']}, "
                      f"builder {agree['builder']}."]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/peftc-bench-generate", help="where the exported models go")
    parser.add_argument("--quick", action="store_true", help="prompt 32, 16 new tokens, one round; no report")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    made = prepare(Path(args.work))
    paths, codec = made["paths"], load_codec("smollm2-135m")
    decoders = {}
    for target in ("fp32", "int4"):
        decoders[f"peftc --genai {target} (onnxruntime-genai)"] = (Genai(paths[f"peftc-{target}"]), None)
        decoders[f"peftc --genai {target} (onnxruntime)"] = (Ort(paths[f"peftc-{target}"] / "model.onnx", codec.eos_id),
                                                              None)
        decoders[f"builder {target} (onnxruntime-genai)"] = (Genai(paths[f"builder-{target}"]), None)
    decoders["peftc --genai prefix tokens=16 fp32 (onnxruntime-genai)"] = (Genai(paths["peftc-prefix"]), None)
    decoders["transformers generate() fp32"] = (Transformers(paths["hf"]), None)
    decoders["peftc generate --recompute fp32"] = (Recompute(made["merged"], codec.eos_id), RECOMPUTE_CONFIGS)
    if args.quick:
        for row in measure(decoders, [(32, 16)], 1, codec):
            pass
        return
    rows = measure(decoders, CONFIGS, ROUNDS, codec)
    agree = agreement(paths, codec)
    seconds = time.perf_counter() - start
    (ROOT / "bench" / "generate.json").write_text(json.dumps({"rows": rows, "agreement": agree}, indent=1))
    print(report(rows, agree, ROOT / "bench" / "GENERATE.md", seconds))


if __name__ == "__main__":
    main()

"""Two-process DDP (gloo on the CPU) trains the compiled model to the adapter a single process gets from the
same global batch; both ranks hold identical adapters; only trainable parameters are synchronised."""
import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from peftc.training.train import TrainConfig, train
from numerics import SAME_FUNCTION, assert_close

SPEC = "lora q, v r=4 alpha=8\n"      # no dropout: ranks draw different masks, a single process one
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, options: dict, dump: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(TrainConfig(**options))
    model = result.model
    save_file({n: p.detach().contiguous() for n, p in model.adapter_parameters().items()},
              str(Path(dump) / f"rank{rank}.safetensors"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    (Path(dump) / f"rank{rank}.json").write_text(json.dumps({
        "synchronised": result.synchronised, "trainable": trainable, "main": result.main,
        "losses": [h["loss"] for h in result.history]}))


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "lora.peft").write_text(SPEC)
    rows = [{"prompt": f"item {i}:", "completion": f" value {i * 7 % 13}"} for i in range(20)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def options(workdir: Path, out: str, batch_size: int) -> dict:
    return asdict(TrainConfig(spec=str(workdir / "lora.peft"), data=str(workdir / "data.jsonl"),
                              out=str(workdir / out), model="tiny-llama", steps=STEPS, batch_size=batch_size,
                              lr=1e-2, max_length=32, progress=False))


@pytest.fixture
def single(workdir):
    """The reference: one process, a batch of 4."""
    torch.set_num_threads(1)
    result = train(TrainConfig(**options(workdir, "single", batch_size=4)))
    return {n: p.detach().clone() for n, p in result.model.adapter_parameters().items()}, result


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_same_global_batch(workdir, single):
    reference, single_result = single
    dump = workdir / "dump"
    dump.mkdir()
    mp.spawn(_worker, args=(2, free_port(), options(workdir, "ddp", batch_size=2), str(dump)), nprocs=2, join=True)
    ranks = [load_file(str(dump / f"rank{r}.safetensors")) for r in range(2)]
    info = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() == reference.keys()
    for name in reference:
        assert torch.equal(ranks[0][name], ranks[1][name]), name          # DDP keeps ranks bit-identical
        assert_close(ranks[0][name], reference[name], rel=SAME_FUNCTION, name=name,
                     why="gradients all-reduced over two ranks sum in another order; Adam carries that into the steps")
    assert any(not torch.equal(reference[n], torch.zeros_like(reference[n])) for n in reference if "lora_B" in n)
    # the loss each step reports is the loss of the whole global batch
    assert info[0]["losses"] == pytest.approx([h["loss"] for h in single_result.history], rel=1e-5)
    assert [i["main"] for i in info] == [True, False]
    # DDP synchronises exactly the trainable parameters, not the frozen base weights
    assert sorted(info[0]["synchronised"]) == sorted(info[0]["trainable"]) and len(info[0]["trainable"]) == 16
    # rank 0 wrote the outputs; rank 1 wrote nothing
    assert (workdir / "ddp" / "adapter_model.safetensors").is_file()
    assert "2 processes" in (workdir / "ddp" / "train.log").read_text()


@pytest.mark.slow
def test_peftc_train_under_torchrun(workdir, single):
    reference, _ = single
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "peftc.cli", "train", str(workdir / "lora.peft"), "--model", "tiny-llama",
           "--data", str(workdir / "data.jsonl"), "--out", str(workdir / "torchrun"), "--steps", str(STEPS),
           "--batch-size", "2", "--lr", "1e-2", "--max-length", "32", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DDP over 2 processes (gloo): 16 trainable tensors synchronised" in done.stderr
    assert done.stdout.count("trained 3 steps") == 1                           # rank 0 reports
    written = load_file(str(workdir / "torchrun" / "adapter_model.safetensors"))
    ours = load_file(str(workdir / "single" / "adapter_model.safetensors"))
    assert written.keys() == ours.keys()
    for key in ours:
        assert_close(written[key], ours[key], rel=SAME_FUNCTION, name=key,
                     why="gradients all-reduced over two ranks sum in another order; Adam carries that into the steps")

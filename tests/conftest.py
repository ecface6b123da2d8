import functools
import json
import os
from pathlib import Path

import pytest
import torch

import peftc
from peftc.training.train import TrainConfig

if os.environ.get("PYTEST_XDIST_WORKER"):
    # .ci/run runs one pytest-xdist worker per core: each worker, and every subprocess it starts, on one thread,
    # so the workers do not contend for the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def _tiny(ref: str):
    return peftc.load_model(ref)


@pytest.fixture
def tiny():
    """A loader for the tiny built-in models; each is built once per session and never mutated."""
    return _tiny


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread, and a busy machine makes two threads far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize_adapters(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give every inserted parameter non-zero values, so equivalence tests cannot pass trivially."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters().values():
            param.copy_(torch.randn(param.shape, generator=gen) * scale)


def token_ids(batch: int = 2, seq: int = 12, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs(n: int = 24) -> list[dict]:
    """A memorisation task: n prompts ("red 0:") each with a one-word completion."""
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    return [{"prompt": f"{words[i % 8]} {i}:", "completion": f" {words[(i * 3) % 8]}"} for i in range(n)]


def train_config(workdir: Path, out: str = "out", **kw) -> TrainConfig:
    """A few quick steps on tiny-llama with ``workdir``'s lora.peft and data.jsonl; ``kw`` overrides."""
    options = dict(spec=str(workdir / "lora.peft"), data=str(workdir / "data.jsonl"), out=str(workdir / out),
                   model="tiny-llama", steps=4, batch_size=4, lr=1e-2, max_length=32, progress=False,
                   max_grad_norm=0.0)
    options.update(kw)
    return TrainConfig(**options)

import functools

import pytest
import torch

import peftc


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

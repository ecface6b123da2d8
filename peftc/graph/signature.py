"""A model's input signature: which inputs the capture takes, what it returns, and example tensors for them.

Text models take ``(input_ids, attention_mask)``; an encoder-decoder (T5, BART) adds ``decoder_input_ids``; a
vision model (ViT) takes ``pixel_values`` and a speech model (Whisper) ``input_features`` with
``decoder_input_ids``. The signature is read from the model's class and config, never by running it (the
weights may be on the meta device): ``main_input_name`` names the first input, ``config.is_encoder_decoder``
adds the decoder's. What it returns (its kind) comes from its class:

- ``causal-lm``: a decoder-only LM's logits (batch, sequence, vocab);
- ``seq2seq-lm``: an encoder-decoder LM's logits over the decoder's tokens (batch, decoder_sequence, vocab);
- ``classifier``: a ``...For*Classification`` model's logits (batch, labels);
- ``encoder``: a base model's ``last_hidden_state`` (the decoder's for an encoder-decoder base model).

Axes: batch and each token sequence are dynamic; pixels and audio features have the fixed size the config
gives (ViT's ``image_size``, Whisper's 2 × ``max_source_positions`` frames)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch.export import Dim

from peftc.errors import ModelError

TEXT = ("input_ids", "attention_mask")
DECODER = "decoder_input_ids"
#: the key of a captured graph module's ``meta`` that holds its Signature
SIGNATURE = "peftc_signature"
#: kinds whose output has one row per token of the (decoder's) sequence
PER_TOKEN = ("causal-lm", "seq2seq-lm", "encoder")


@dataclass(frozen=True)
class Signature:
    names: tuple[str, ...]
    kind: str
    output: str                 # the field of the model's output the capture returns
    use_cache: bool = True      # the model's forward takes ``use_cache`` (passed False)

    @property
    def text(self) -> bool:
        """Whether the first two inputs are ``input_ids`` and ``attention_mask``."""
        return self.names[:2] == TEXT

    def examples(self, config, *, batch: int = 2, seq: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs of every name: tokens below the vocabulary (at most 32), masks of ones, pixels and
        features from a normal distribution. The decoder's sequence is shorter than the encoder's, so the
        two axes never share a size in a capture."""
        g = torch.Generator().manual_seed(seed)
        vocab = max(2, min(32, getattr(config, "vocab_size", 32) or 32))
        out = []
        for name in self.names:
            if name == "attention_mask":
                out.append(torch.ones_like(out[0]))
            elif name in ("input_ids", DECODER):
                out.append(torch.randint(0, vocab, (batch, seq if name == "input_ids" else max(2, seq - 3)),
                                         generator=g))
            else:
                out.append(torch.randn((batch, *_fixed_shape(name, config)), generator=g))
        return tuple(out)

    def dynamic(self, max_seq: int) -> tuple[dict[int, Dim], ...]:
        """torch.export's dynamic shapes, one dict per input in order."""
        batch = Dim("batch", min=1, max=4096)
        seq = Dim("sequence", min=1, max=max(2, max_seq))
        decoder = Dim("decoder_sequence", min=1, max=max(2, max_seq))
        return tuple({0: batch, 1: seq} if name in TEXT else {0: batch, 1: decoder} if name == DECODER
                     else {0: batch} for name in self.names)

    def bind(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """Positional and named arguments as the positional inputs of the capture; a missing
        ``attention_mask`` is all ones, as transformers takes it."""
        named = dict(zip(self.names, args), **kwargs)
        unknown = sorted(set(named) - set(self.names))
        if len(args) > len(self.names) or unknown:
            raise TypeError(f"the model takes {', '.join(self.names)}; got {unknown or len(args)}")
        if "attention_mask" in self.names and named.get("attention_mask") is None and "input_ids" in named:
            named["attention_mask"] = torch.ones_like(named["input_ids"])
        missing = [n for n in self.names if named.get(n) is None]
        if missing:
            raise TypeError(f"the model needs {', '.join(missing)}")
        return tuple(named[n] for n in self.names)

    def call(self, model: torch.nn.Module, inputs: tuple) -> object:
        """The model's output field for positional ``inputs`` in this signature's order."""
        extra = {"use_cache": False} if self.use_cache else {}
        return getattr(model(**dict(zip(self.names, inputs)), **extra), self.output)


def _fixed_shape(name: str, config) -> tuple[int, ...]:
    if name == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return (getattr(config, "num_channels", 3), *size)
    if name == "input_features":
        return (config.num_mel_bins, 2 * config.max_source_positions)
    raise ModelError(f"peftc does not know the shape of the input '{name}'")


def signature_of(model: torch.nn.Module) -> Signature:
    """The signature of a transformers model, from its class and config (see the module doc)."""
    config = model.config
    cls = type(model)
    main = getattr(cls, "main_input_name", "input_ids")
    names = (main,) if main != "input_ids" else TEXT
    if getattr(config, "is_encoder_decoder", False):
        names = names + (DECODER,)
    unknown = [n for n in names if n not in inspect.signature(model.forward).parameters]
    if unknown:
        raise ModelError(f"{cls.__name__}.forward takes no '{unknown[0]}': peftc cannot call it")
    use_cache = "use_cache" in inspect.signature(model.forward).parameters
    if hasattr(cls, "get_output_embeddings") and model.get_output_embeddings() is not None:
        kind = "seq2seq-lm" if DECODER in names else "causal-lm"
        return Signature(names, kind, "logits", use_cache)
    if "For" in cls.__name__ and cls.__name__.endswith("Classification"):
        return Signature(names, "classifier", "logits", use_cache)
    if cls.__name__.endswith("Model"):
        return Signature(names, "encoder", "last_hidden_state", use_cache)
    raise ModelError(f"{cls.__name__} has no output head and is not a base model: peftc captures a language "
                     "model's or a classifier's logits, or a base model's last hidden state")

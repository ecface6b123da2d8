"""Encoder-decoders (T5, BART) on prompt/completion data: the prompt is the encoder's input, the completion
and an end-of-sequence token are the labels of the decoder, whose inputs are those labels shifted right
behind the config's ``decoder_start_token_id`` (transformers' ``shift_tokens_right``, T5's ``_shift_right``).
The loss is the cross-entropy of the decoder's logits against the labels, position by position
(:func:`peftc.training.loss.labelled_loss_sum`: the decoder's input is already one token behind).

Batches are right-padded on both sides: the encoder's pads are masked, and the decoder is causal, so its
pads come after every labelled position and change none of them.

Greedy decoding: :class:`Seq2SeqCachedDecoder` runs ``generate()`` of a transformers model holding the
merged weights (KV cache); :class:`Seq2SeqRecomputeDecoder` re-runs a compiled model (merged or not, any
adapter) on the encoder's input and the decoder's tokens so far at each step. They give the same tokens;
:func:`peftc.training.generate.decoder_for` picks one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from peftc.errors import PeftcError
from peftc.training.data import IGNORE, Codec, DataError, Record


@dataclass
class Seq2SeqExample:
    input_ids: list[int]           #: the encoder's tokens (the prompt)
    labels: list[int]              #: the decoder's targets: the completion and eos
    line: int

    @property
    def targets(self) -> int:
        return len(self.labels)


def tokenize_seq2seq(records: list[Record], codec: Codec, max_length: int, chat: bool = False) -> list[Seq2SeqExample]:
    """Encoder ids = the prompt's (with the tokenizer's special tokens), labels = completion ids + eos; each
    truncated on the right to ``max_length``. A ``text`` record has no input to encode: refused."""
    out = []
    for record in records:
        where = f"{record.source}:{record.line}"
        if record.is_text:
            raise DataError(f"{where}: an encoder-decoder trains on 'prompt' and 'completion' records (the "
                            "prompt is the encoder's input); this one has 'text'", record.source, record.line)
        prompt = codec.encode_prompt(record.prompt, chat)[:max_length]
        if not prompt:
            raise DataError(f"{where}: the prompt has no tokens: the encoder needs at least one",
                            record.source, record.line)
        labels = (codec.encode_completion(record.completion) + [codec.eos_id])[:max_length]
        out.append(Seq2SeqExample(prompt, labels, record.line))
    return out


def collate_seq2seq(examples: list[Seq2SeqExample], pad_id: int, start_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``decoder_input_ids`` (the labels shifted right
    behind ``start_id``) and ``labels`` (IGNORE on the pads)."""
    width = max(len(e.input_ids) for e in examples)
    target = max(len(e.labels) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    decoder = torch.full((len(examples), target), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), target), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, :len(e.input_ids)] = 1
        decoder[row, :len(e.labels)] = torch.tensor([start_id, *e.labels[:-1]])
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder, "labels": labels}


def start_token(config) -> int:
    """The decoder's first input: ``decoder_start_token_id`` of the config (or its generation config)."""
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(config, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise PeftcError(f"the config of {getattr(config, '_name_or_path', 'the model')} has no "
                         "decoder_start_token_id: peftc cannot build the decoder's inputs")
    return int(start)


class Seq2SeqRecomputeDecoder:
    """Greedy decoding by re-running ``logits(input_ids, attention_mask, decoder_input_ids)`` on the whole
    decoder sequence every step (no cache): works for every adapter, folded or not."""
    name = "torch (encoder-decoder, no KV cache)"

    def __init__(self, logits_fn: Callable, start_id: int):
        self.logits_fn = logits_fn
        self.start_id = start_id

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_id: int) -> torch.Tensor:
        mask = torch.ones_like(ids)
        decoded = torch.full((ids.shape[0], 1), self.start_id, dtype=torch.long)
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            with torch.no_grad():
                token = torch.as_tensor(self.logits_fn(ids, mask, decoded)[:, -1]).argmax(-1)
            token = torch.where(done, torch.full_like(token, eos_id), token)
            decoded = torch.cat([decoded, token[:, None]], dim=1)
            done |= token == eos_id
            if bool(done.all()):
                break
        return decoded[:, 1:]


class Seq2SeqCachedDecoder:
    """Greedy decoding with a transformers encoder-decoder's ``generate()`` (encoder run once, KV cache)."""
    name = "torch (encoder-decoder, KV cache)"

    def __init__(self, hf_model: torch.nn.Module):
        self.model = hf_model.eval()
        self.start_id = start_token(hf_model.config)

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_id: int) -> torch.Tensor:
        from transformers import GenerationConfig
        # a config of its own: a checkpoint's generation_config.json (beams, forced tokens, n-gram bans)
        # would make this another function than the recompute decoder's plain greedy argmax
        greedy = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                                  pad_token_id=eos_id, decoder_start_token_id=self.start_id)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=greedy)
        return out[:, 1:]                  # generate() returns the start token first

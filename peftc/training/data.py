"""Training data: JSONL files of ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}`` records.

A ``text`` record is trained on every token; a prompt/completion record only on the completion (and the
end-of-sequence token after it). Prompt and completion are tokenised separately and concatenated, the way
:mod:`peftc.training.generate` feeds a prompt at inference, so training and generation see the same tokens.

Batches are right-padded: the captured graphs use positions 0..T-1 whatever the mask says, so right
padding leaves every real token at its real position, and a causal model never attends to the pads after it.
The order of examples is a pure function of (seed, step): :func:`step_indices` gives the indices of any
step's global batch without replaying the ones before, which is what makes ``--resume`` and DDP exact."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from peftc.errors import PeftcError
from peftc.models import TINY, load_tokenizer

IGNORE = -100          # label of a token that is not trained on (prompt, padding)
MAX_ERRORS = 10        # a broken file reports this many bad lines at most


class DataError(PeftcError, ValueError):
    """A data file that cannot be used; ``.filename`` and ``.line`` locate the first bad record."""

    def __init__(self, message: str, filename: str | None = None, line: int | None = None):
        super().__init__(message)
        self.filename = filename
        self.line = line


@dataclass(frozen=True)
class Record:
    """One example. ``prompt`` is "" for a ``text`` record, whose ``completion`` is the whole text."""
    prompt: str
    completion: str
    line: int
    source: str = ""

    @property
    def is_text(self) -> bool:
        return self.prompt == ""


def _check_record(obj, where: str) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    has_text, has_prompt, has_completion = "text" in obj, "prompt" in obj, "completion" in obj
    if has_text and (has_prompt or has_completion):
        raise ValueError(f"{where}: a record has either 'text' or 'prompt' and 'completion', not both")
    if not (has_text or has_prompt or has_completion):
        found = ", ".join(repr(k) for k in obj) or "no fields"
        raise ValueError(f"{where}: missing field: a record needs 'text', or 'prompt' and 'completion' "
                         f"(found {found})")
    if has_prompt != has_completion:
        missing = "completion" if has_prompt else "prompt"
        raise ValueError(f"{where}: missing field '{missing}' ('prompt' and 'completion' go together)")
    fields = ("text",) if has_text else ("prompt", "completion")
    for name in fields:
        if not isinstance(obj[name], str):
            raise ValueError(f"{where}: field '{name}' must be a string, got {type(obj[name]).__name__}")
        try:     # JSON's \ud800 escapes can spell lone surrogates, which no tokenizer can encode
            obj[name].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{where}: field '{name}' is not valid Unicode: lone surrogate "
                             f"\\u{ord(obj[name][exc.start]):04x} at character {exc.start}") from None
    if has_text:
        if not obj["text"].strip():
            raise ValueError(f"{where}: field 'text' is empty")
        return "", obj["text"]
    if not obj["completion"]:
        raise ValueError(f"{where}: field 'completion' is empty")
    return obj["prompt"], obj["completion"]


def read_jsonl(path: str | Path) -> list[Record]:
    """Read and check a JSONL data file. Every problem names the file and the line; up to
    :data:`MAX_ERRORS` of them are reported together in one :class:`DataError`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file '{path}' does not exist", str(path))
    if path.is_dir():
        raise DataError(f"data file '{path}' is a directory", str(path))
    records, errors, first_line = [], [], None
    with open(path, encoding="utf-8-sig", errors="strict") as fh:
        try:
            lines = fh.read().splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", str(path)) from exc
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON: {exc.msg} (column {exc.colno})") from None
            except RecursionError:
                raise ValueError(f"{where}: not JSON peftc can read: nested too deeply") from None
            prompt, completion = _check_record(obj, where)
        except ValueError as exc:
            errors.append(str(exc))
            first_line = first_line or number
            if len(errors) >= MAX_ERRORS:
                errors.append(f"{path}: stopped after {MAX_ERRORS} bad lines")
                break
            continue
        records.append(Record(prompt, completion, number, str(path)))
    if errors:
        raise DataError("\n".join(errors), str(path), first_line)
    if not records:
        raise DataError(f"{path}: no records (the file is empty); each line must be a JSON object with "
                        "'text', or 'prompt' and 'completion'", str(path), 1)
    return records


# --- tokenisers ---------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as ids 3..258 (0 pad, 1 bos, 2 eos): the tokenizer of the tiny built-in models, which
    have a 512-token vocabulary and no tokenizer of their own. It makes them trainable from text in tests."""
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    OFFSET = 3
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < 256 + self.OFFSET)
        return data.decode("utf-8", errors="replace")


class Codec:
    """The few things training and generation need from a tokenizer, for HF tokenizers and ByteTokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise DataError("the tokenizer has no end-of-sequence token")
        self.eos_id = int(eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.eos_id

    def encode_prompt(self, text: str, chat: bool = False) -> list[int]:
        """The prompt's ids, with the special tokens the tokenizer adds at the start (if any). ``chat``
        wraps the prompt as a user turn of the tokenizer's chat template."""
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise DataError("this model's tokenizer has no chat template")
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
            return self._encode(text, add_special_tokens=False)
        return self._encode(text, add_special_tokens=True)

    def encode_completion(self, text: str) -> list[int]:
        return self._encode(text, add_special_tokens=False)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.encode(text, add_special_tokens)
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_codec(model_ref: str) -> Codec:
    """The model's tokenizer, or :class:`ByteTokenizer` for the tiny built-ins."""
    if model_ref in TINY:
        return Codec(ByteTokenizer())
    tokenizer = load_tokenizer(model_ref)
    return Codec(tokenizer if tokenizer is not None else ByteTokenizer())


# --- tokenised examples ---------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]      # IGNORE where not trained on; aligned with input_ids (shifted in the loss)
    line: int

    @property
    def targets(self) -> int:
        """Tokens the loss counts: labels at positions 1.. that are not IGNORE."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def tokenize(records: list[Record], codec: Codec, max_length: int, chat: bool = False) -> list[Example]:
    """prompt ids + completion ids + eos, truncated on the right to ``max_length`` tokens."""
    out = []
    for record in records:
        prompt = codec.encode_prompt("") if record.is_text else codec.encode_prompt(record.prompt, chat)
        completion = codec.encode_completion(record.completion) + [codec.eos_id]
        ids = (prompt + completion)[:max_length]
        labels = ([IGNORE] * len(prompt) + completion)[:max_length]
        example = Example(ids, labels, record.line)
        if example.targets == 0:
            raise DataError(f"{record.source}:{record.line}: nothing to train on within --max-length "
                            f"{max_length}: the prompt is {len(prompt)} tokens", record.source, record.line)
        out.append(example)
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE on the pads)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- splits and order -----------------------------------------------------------------------------------
def split_eval(records: list, eval_split: float, seed: int) -> tuple[list, list]:
    """(train, eval): ``eval_split`` < 1 is a fraction of the records, >= 1 a count. The held-out records are
    drawn with ``seed``; both parts keep the file's order."""
    if not eval_split:
        return list(records), []
    n = len(records)
    count = int(eval_split) if eval_split >= 1 else int(round(n * eval_split))
    if eval_split >= 1 and eval_split != int(eval_split):
        raise DataError(f"--eval-split {eval_split}: give a fraction below 1 or a whole number of records")
    count = max(1, count)
    if count >= n:
        raise DataError(f"--eval-split {eval_split} holds out {count} of {n} records and leaves none to train on")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held = set(perm[:count])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def step_indices(n: int, global_batch: int, step: int, seed: int) -> list[int]:
    """The example indices of step ``step``'s global batch: epochs are shuffled with (seed, epoch) and laid
    end to end, and step s takes positions [s·G, (s+1)·G) of that stream."""
    start = step * global_batch
    out, cache = [], {}
    for pos in range(start, start + global_batch):
        epoch, offset = divmod(pos, n)
        if epoch not in cache:
            cache[epoch] = epoch_order(n, seed, epoch)
        out.append(cache[epoch][offset])
    return out


def steps_for_epochs(epochs: float, n: int, global_batch: int) -> int:
    return max(1, math.ceil(epochs * n / global_batch))

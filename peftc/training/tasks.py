"""What ``peftc train`` trains, by model and data: a causal LM on JSONL (next-token loss), an encoder-decoder
on prompt/completion JSONL (loss on the decoder side, :mod:`peftc.training.seq2seq`), or an image classifier
on a folder of images (:mod:`peftc.training.images`). The loop sees only a :class:`Task`: how to read the
data into examples, batch them, call the model on a batch, and sum the loss over a batch's targets.

The task is chosen before the (slow) compile, from the data path (a folder: images) and the model's
config (``is_encoder_decoder``), so bad data fails at once; :meth:`Task.bind` then checks that the
compiled model is of the kind the task trains."""
from __future__ import annotations

from pathlib import Path

import torch

from peftc.models import resolve
from peftc.training.config import TrainConfig, TrainError
from peftc.training.data import IGNORE, collate, load_codec, read_jsonl, split_eval, tokenize
from peftc.training.images import Pixels, classification_loss_sum, collate_images, ImageExample, read_image_folder
from peftc.training.headloss import head_split
from peftc.training.loss import labelled_loss_sum, token_loss_sum
from peftc.training.seq2seq import collate_seq2seq, start_token, tokenize_seq2seq

WHAT = {"causal-lm": "a causal language model", "seq2seq-lm": "an encoder-decoder language model",
        "classifier": "an image classifier", "encoder": "an encoder without a head"}


class Task:
    """A causal LM on JSONL records: next-token loss on the completion (or the whole text)."""
    kind = "causal-lm"
    data_help = "a JSONL file"

    def __init__(self, config: TrainConfig, model_config=None):
        self.codec = load_codec(config.model)
        self.pad_id = self.codec.pad_id

    def examples(self, config: TrainConfig) -> tuple[list, list]:
        """(train, eval) examples of ``config.data``, split by ``--eval-split``."""
        records = read_jsonl(config.data)
        train_records, eval_records = split_eval(records, config.eval_split, config.seed)
        return (self.tokenize(train_records, config), self.tokenize(eval_records, config))

    def tokenize(self, records, config: TrainConfig) -> list:
        return tokenize(records, self.codec, config.max_length, config.chat)

    def bind(self, model, config: TrainConfig) -> None:
        """Check that the compiled ``model`` is what this task trains."""
        if model.kind == "encoder":
            raise TrainError(f"peftc train trains causal language models; '{config.model}' is an encoder without "
                             "a head (peftc also trains encoder-decoders such as T5 and BART on JSONL, and image "
                             "classifiers on a folder of images)")
        if model.kind != self.kind:
            raise TrainError(f"--data {config.data} is {self.data_help}, which trains {WHAT[self.kind]}; "
                             f"'{config.model}' is {WHAT.get(model.kind, model.kind)}")

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id)

    def inputs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        return batch["input_ids"], batch["attention_mask"]

    def loss_sum(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(output, labels)

    def head_split(self, model):
        """The model cut before its head, the head and the loss then run on the labelled positions only
        (:func:`peftc.training.headloss.head_split`), or None: a causal LM's when it can be cut."""
        return head_split(model) if self.kind == "causal-lm" else None

    def targets(self, batch: dict) -> int:
        """The labelled positions of a batch: what its loss sums over."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def tokens(self, batch: dict) -> int:
        """The tokens of a batch that are not padding (what tok/s counts)."""
        return int(batch["attention_mask"].sum())


class Seq2SeqTask(Task):
    """An encoder-decoder on prompt/completion JSONL: prompt to the encoder, completion + eos as labels."""
    kind = "seq2seq-lm"

    def __init__(self, config: TrainConfig, model_config=None):
        super().__init__(config, model_config)
        self.start_id = start_token(model_config)

    def tokenize(self, records, config: TrainConfig) -> list:
        return tokenize_seq2seq(records, self.codec, config.max_length, config.chat)

    def bind(self, model, config: TrainConfig) -> None:
        super().bind(model, config)
        if model.signature.names[0] != "input_ids":
            raise TrainError(f"'{config.model}' reads {model.signature.names[0]}, not text: peftc trains "
                             "encoder-decoders whose encoder reads input_ids (T5, BART)")

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        return collate_seq2seq(examples, self.pad_id, self.start_id)

    def inputs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        return batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"]

    def loss_sum(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return labelled_loss_sum(output, labels)

    def targets(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum()) + self.targets(batch)


class ImageTask(Task):
    """An image classifier on a folder of images: cross-entropy of the logits against the folder's label."""
    kind = "classifier"
    data_help = "a folder of images"

    def __init__(self, config: TrainConfig, model_config=None):
        if model_config is None:
            raise TrainError(f"--data {config.data} is a folder of images, which trains an image classifier; "
                             f"'{config.model}' is a built-in language model")
        self.model_config = model_config
        self.pixels = Pixels(model_config, resolve(config.model)[1])
        self.pad_id = 0

    def examples(self, config: TrainConfig) -> tuple[list, list]:
        records, self.names = read_image_folder(config.data, self.model_config)
        train_records, eval_records = split_eval(records, config.eval_split, config.seed)
        return tuple([ImageExample(r.path, r.label, r.line) for r in part] for part in (train_records, eval_records))

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        return collate_images(examples, self.pixels)

    def inputs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        # float32 whatever the model's dtype: the capture took float32 pixels, and ViT casts them itself
        return (batch["pixel_values"],)

    def loss_sum(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return classification_loss_sum(output, labels)

    def targets(self, batch: dict) -> int:
        return len(batch["labels"])

    def tokens(self, batch: dict) -> int:
        return len(batch["labels"])      # images: what "tok/s" counts for a classifier


def model_config(ref: str):
    """The transformers config of a model reference, read from its directory (None for a built-in)."""
    kind, directory = resolve(ref)
    if kind == "tiny":
        return None
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(directory))
    except Exception as exc:  # OSError, ValueError, KeyError... all mean "cannot read"
        raise TrainError(f"cannot read the config of '{ref}' in {directory}: {exc}") from exc


def task_for(config: TrainConfig) -> Task:
    """The task ``config`` describes: images for a data folder, seq2seq for an encoder-decoder, else causal."""
    found = model_config(config.model)
    if Path(config.data).is_dir():
        return ImageTask(config, found)
    if found is not None and any(a.endswith("ForImageClassification") for a in found.architectures or ()):
        raise TrainError(f"'{config.model}' is an image classifier: give --data a folder of images, one "
                         f"subfolder per class (DIR/<class name>/*.png), not the file {config.data}")
    if found is not None and getattr(found, "is_encoder_decoder", False):
        return Seq2SeqTask(config, found)
    return Task(config, found)

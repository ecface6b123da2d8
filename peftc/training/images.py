"""Image classification from a folder of images (the ImageFolder layout): ``DIR/<class name>/*.png|jpg``.

The labels are the class folders' names in sorted order, unless the model's config names its labels
(``id2label`` other than transformers' ``LABEL_0``... defaults), in which case the folders must be those
names and take the model's ids. Images are prepared by the model directory's image processor when it has
one (``preprocessor_config.json``), else as ``ViTImageProcessor``'s defaults do: converted to RGB, resized
to the config's ``image_size`` (bilinear), scaled to [0, 1] and normalised with mean 0.5 and std 0.5.
Each batch reads its images from disk; every file is opened and checked once, before any training."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from peftc.errors import PeftcError
from peftc.training.data import DataError

SUFFIXES = (".png", ".jpg", ".jpeg")
MEAN = STD = (0.5, 0.5, 0.5)        # ViTImageProcessor's defaults (IMAGENET_STANDARD_MEAN/STD)


@dataclass(frozen=True)
class ImageRecord:
    path: str
    label: int
    line: int                       #: its index in the folder's sorted listing (what an error names)
    source: str = ""


@dataclass
class ImageExample:
    path: str
    label: int
    line: int
    targets: int = 1                #: one label per image: the loss is the mean over images


def class_names(folder: Path) -> list[str]:
    """The class folders of ``folder``, sorted; a file beside them or an empty class is a DataError."""
    if not folder.is_dir():
        raise DataError(f"image folder '{folder}' does not exist", str(folder))
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    stray = [p.name for p in entries if not p.is_dir()]
    if stray:
        raise DataError(f"{folder}: {stray[0]} is not in a class folder: images go in "
                        f"{folder}/<class name>/ (one folder per label)", str(folder))
    if not entries:
        raise DataError(f"{folder}: no class folders: images go in {folder}/<class name>/", str(folder))
    return [p.name for p in entries]


def label_ids(classes: list[str], config) -> dict[str, int]:
    """Each class folder's label id: sorted order, or the model's own ``label2id`` when it names its labels."""
    labels = getattr(config, "num_labels", None)
    if labels != len(classes):
        raise DataError(f"the model classifies {labels} labels and the folder has {len(classes)} classes "
                        f"({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''})")
    names = dict(getattr(config, "id2label", None) or {})
    if all(str(name) == f"LABEL_{i}" for i, name in names.items()):
        return {name: i for i, name in enumerate(classes)}
    if set(map(str, names.values())) != set(classes):
        raise DataError(f"the model's labels are {', '.join(map(str, names.values()))}; the class folders "
                        f"are {', '.join(classes)}: rename the folders to the model's labels")
    return {str(name): int(i) for i, name in names.items()}


def read_image_folder(folder: str | Path, config) -> tuple[list[ImageRecord], list[str]]:
    """Every image of the folder with its label id, and the class names by id. Each file is opened and
    verified; one that is not an image names its path."""
    from PIL import Image, UnidentifiedImageError
    folder = Path(folder)
    classes = class_names(folder)
    ids = label_ids(classes, config)
    records = []
    for name in classes:
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{folder / name}: no images ({', '.join(SUFFIXES)})", str(folder / name))
        for path in files:
            try:
                with Image.open(path) as image:
                    image.verify()
            except (UnidentifiedImageError, OSError, SyntaxError) as exc:
                raise DataError(f"{path}: not an image Pillow can read ({exc})", str(path)) from None
            records.append(ImageRecord(str(path), ids[name], len(records) + 1, str(folder)))
    by_id = sorted(ids, key=ids.get)
    return records, by_id


class Pixels:
    """Image files to ``pixel_values``: the model directory's image processor, or ViT's default steps."""

    def __init__(self, config, directory: Path | None):
        self.processor = None
        if directory is not None and (directory / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor
            try:
                self.processor = AutoImageProcessor.from_pretrained(str(directory))
            except Exception as exc:      # transformers raises many types for a bad file
                raise PeftcError(f"cannot load the image processor in {directory}: {exc}") from exc
        size = getattr(config, "image_size", 224)
        self.size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        self.channels = getattr(config, "num_channels", 3)

    def __call__(self, paths: list[str]) -> torch.Tensor:
        from PIL import Image
        images = []
        for path in paths:
            with Image.open(path) as image:
                images.append(image.convert("RGB" if self.channels == 3 else "L"))
        if self.processor is not None:
            return self.processor(images=images, return_tensors="pt")["pixel_values"]
        import numpy as np
        rows = [torch.from_numpy(np.asarray(im.resize(self.size[::-1], Image.BILINEAR), dtype=np.float32))
                for im in images]
        pixels = torch.stack(rows).reshape(len(rows), *self.size, -1).permute(0, 3, 1, 2) / 255.0
        mean = torch.tensor(MEAN[:self.channels])[:, None, None]
        std = torch.tensor(STD[:self.channels])[:, None, None]
        return (pixels - mean) / std


def collate_images(examples: list[ImageExample], pixels: Pixels) -> dict[str, torch.Tensor]:
    return {"pixel_values": pixels([e.path for e in examples]),
            "labels": torch.tensor([e.label for e in examples], dtype=torch.long)}


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="sum")


@dataclass
class AccuracyResult:
    correct: int
    total: int
    seconds: float
    rows: list[tuple[ImageRecord, str, str]] = field(default_factory=list)   #: (image, predicted, expected)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> str:
        return f"accuracy: {self.correct}/{self.total} = {100 * self.accuracy:.1f}% ({self.seconds:.1f} s)"


def accuracy(model, records: list[ImageRecord], names: list[str], pixels: Pixels,
             batch_size: int = 16) -> AccuracyResult:
    """The compiled classifier's top-1 accuracy on ``records`` (dropout off)."""
    model.eval()
    start, rows = time.perf_counter(), []
    for first in range(0, len(records), batch_size):
        chunk = records[first:first + batch_size]
        with torch.no_grad():
            predicted = model(pixels([r.path for r in chunk])).argmax(-1).tolist()
        rows += [(r, names[p], names[r.label]) for r, p in zip(chunk, predicted)]
    correct = sum(p == e for _, p, e in rows)
    return AccuracyResult(correct, len(rows), time.perf_counter() - start, rows)

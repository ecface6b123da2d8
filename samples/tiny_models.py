"""Tiny seeded random models saved as Hugging Face directories, for trying ``peftc train`` on an
encoder-decoder and on an image classifier without downloading anything (the tests use them too).

    python samples/tiny_models.py t5 tiny-t5          # a T5 with a character-level tokenizer
    python samples/tiny_models.py vit tiny-vit        # a 2-class ViT on 16 x 16 images
    python samples/tiny_models.py stripes stripes     # stripes/{horizontal,vertical}/*.png
    python samples/tiny_models.py stripes held 1      # another draw (seed 1): held-out images
"""
from __future__ import annotations

import string
import sys
from pathlib import Path

import torch

#: the characters the tokenizer knows (one token each); the first ids are the special tokens
CHARACTERS = string.ascii_letters + string.digits + " .,:;!?'-+=/()"
SPECIALS = ("<pad>", "</s>", "<unk>")


def char_tokenizer():
    """A character-level PreTrainedTokenizerFast: pad 0, eos 1, unk 2, then one id per character; an
    encoded text ends with eos (as T5's tokenizer does), and decoding joins the characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {token: i for i, token in enumerate(SPECIALS + tuple(CHARACTERS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def t5_dir(path: str | Path, seed: int = 0, layers: int = 2) -> Path:
    """A T5 of ``layers`` encoder and decoder layers (d_model 64) with the character tokenizer, saved at ``path``."""
    from transformers import T5Config, T5ForConditionalGeneration
    tokenizer = char_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=layers,
                      num_decoder_layers=layers, num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def vit_dir(path: str | Path, labels=("horizontal", "vertical"), seed: int = 0) -> Path:
    """A 2-layer ViT classifier on 16 x 16 images (patches of 4), one label per name, saved at ``path``
    (no image processor: peftc resizes to image_size and normalises as ViTImageProcessor does)."""
    from transformers import ViTConfig, ViTForImageClassification
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=len(labels),
                       id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(seed)
    ViTForImageClassification(config).save_pretrained(path)
    return Path(path)


def stripes(path: str | Path, per_class: int = 16, size: int = 32, seed: int = 0) -> Path:
    """An image folder of two classes, ``horizontal`` and ``vertical``: bright stripes of period ``size / 4``
    on a dark ground, each image with its own colours and pixel noise, ``per_class`` PNGs each, ``size``
    pixels square (32 by default: twice the tiny ViT's 16, so the images are resized as a user's are)."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    period = max(2, size // 4)
    line = (torch.arange(size) % period < period // 2).float()
    for label in ("horizontal", "vertical"):
        folder = Path(path) / label
        folder.mkdir(parents=True, exist_ok=True)
        mask = (line[:, None] if label == "horizontal" else line[None, :]).expand(size, size)[..., None]
        for i in range(per_class):
            bright, dark = 0.6 + 0.4 * torch.rand(3, generator=g), 0.4 * torch.rand(3, generator=g)
            image = mask * bright + (1 - mask) * dark + 0.1 * torch.randn(size, size, 3, generator=g)
            pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return Path(path)


if __name__ == "__main__":
    makers = {"t5": t5_dir, "vit": vit_dir, "stripes": stripes}
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in makers:
        sys.exit(f"usage: python {sys.argv[0]} {{{','.join(makers)}}} DIR [SEED]")
    print(makers[sys.argv[1]](sys.argv[2], seed=int(sys.argv[3]) if len(sys.argv) == 4 else 0))

"""HF PEFT's prompt-learning files: PREFIX_TUNING and PROMPT_TUNING.

Both hold one tensor, ``prompt_embeddings``:
- prefix tuning: (P, num_layers · 2 · token_dim) with token_dim = kv_heads · head_dim; HF PEFT views it as
  (P, num_layers · 2, kv_heads, head_dim), so layer l's keys are the columns of block 2l and its values
  those of block 2l + 1, each (P, kv_heads, head_dim). With ``prefix_projection`` HF PEFT saves the MLP's
  output, not the MLP, and so does peftc (a ``project=`` prefix is written folded);
- prompt tuning: (P, hidden), the soft prompt itself.
HF PEFT fills ``token_dim`` and ``num_attention_heads`` from the model config (for prefix tuning the key/
value heads when the config has ``num_key_value_heads``); peftc writes the same values, read through the
config's attributes so that aliased names (``attribute_map``) count, and refuses to write
a prefix whose shapes HF PEFT would compute differently (Falcon's multi-query attention)."""
from __future__ import annotations

import torch

from peftc.errors import AdapterError, ModelError
from peftc.interop.hf_peft import REQUIRED, Format, check_int, check_keys, register_format
from peftc.methods.prefix.rewrite import PrefixEncoderRecord, PrefixRecord, split
from peftc.models import resolve

KEY = "prompt_embeddings"


def _text_config(model):
    """The model's config, or its ``text_config`` where it has one (a vision-language model: HF PEFT reads
    the language model's sizes)."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None)
    return text if text is not None else config


def _first(config, *names):
    """The first of ``names`` the config has a value for, read as attributes: a transformers config maps
    its own names through ``attribute_map`` (DistilBERT's ``n_heads`` is ``num_attention_heads``), which
    ``to_dict()`` does not."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def hf_shapes(model, prefix: bool) -> dict:
    """num_layers, token_dim, num_attention_heads as HF PEFT's ``_prepare_prompt_learning_config`` sets
    them for this model's config, but with every name read through the config's attributes: HF PEFT reads
    ``to_dict()``, which holds only a config's own names (DistilBERT's ``dim`` and ``n_heads``), and then
    refuses a file that leaves those fields unset. The key/value heads of a prefix (grouped-query
    attention) come from the config's own ``num_key_value_heads`` and ``head_dim``, as HF PEFT reads them."""
    config = _text_config(model)
    layers = _first(getattr(model, "config", None), "num_hidden_layers") or _first(
        config, "num_hidden_layers", "num_layers", "n_layer")
    token_dim = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    own = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    kv_heads = own.get("num_key_value_heads")        # HF PEFT's grouped-query rule reads the config's own keys
    if prefix and kv_heads and heads:
        head_dim = own.get("head_dim") or token_dim // heads
        token_dim, heads = head_dim * kv_heads, kv_heads
    return {"num_layers": layers, "token_dim": token_dim, "num_attention_heads": heads}


# ── prefix tuning ─────────────────────────────────────────────────────────────────────────────────────
def _prefix_parts(model):
    layers = [r for r in model.records if isinstance(r, PrefixRecord)]
    encoders = [r for r in model.records if isinstance(r, PrefixEncoderRecord)]
    return layers, (encoders[0] if encoders else None)


def _check_prefix_layout(model, layers, shapes: dict, what: str) -> None:
    want = list(range(shapes["num_layers"] or 0))
    have = [r.site.layer for r in layers]
    if have != want:
        raise AdapterError(f"HF PEFT's prefix tuning has prefixes in every one of the model's "
                           f"{shapes['num_layers']} layers, in order; {what} has them in layers {have}")
    for record in layers:
        site = record.site
        if (site.token_dim, site.kv_heads) != (shapes["token_dim"], shapes["num_attention_heads"]):
            raise AdapterError(f"HF PEFT sizes prefixes for this model as {shapes['num_attention_heads']} "
                               f"heads × {shapes['token_dim']} features, but the attention {site.path} takes "
                               f"{site.kv_heads} key/value heads × {site.token_dim} features; HF PEFT's "
                               "prefix tuning cannot hold this model's prefixes")


def _save_prefix(model, records) -> tuple[dict, dict]:
    layers, encoder = _prefix_parts(model)
    shapes = hf_shapes(model, prefix=True)
    _check_prefix_layout(model, layers, shapes, "this model")
    gm = model.graph_module
    tokens = layers[0].tokens
    if encoder is not None and not layers[0].weights(gm):
        with torch.no_grad():
            flat = gm.get_submodule(encoder.module)()
    else:      # HF PEFT's block b: the prefixes of the attentions reading it; zeros where none does
        owners = {r.index: r for r in layers if r.owner}
        blocks = [torch.cat([t.permute(1, 0, 2).reshape(tokens, -1) for t in owners[b].prefixes(gm)], 1)
                  if b in owners else torch.zeros(tokens, 2 * shapes["token_dim"]) for b in range(len(layers))]
        flat = torch.cat(blocks, 1)
    hidden = encoder.hidden if encoder is not None else None
    fields = {"num_virtual_tokens": tokens, **shapes, "num_transformer_submodules": _submodules(model),
              "encoder_hidden_size": hidden or shapes["token_dim"], "prefix_projection": hidden is not None,
              "init_weights": None, "modules_to_save": None}
    return fields, {KEY: flat.detach().to(torch.float32).contiguous()}


def _load_prefix(model, records, config: dict, tensors: dict, path) -> None:
    layers, encoder = _prefix_parts(model)
    gm = model.graph_module
    if encoder is not None and not layers[0].weights(gm):
        raise AdapterError(f"{path} holds the prefixes themselves; this model learns them through a "
                           "project= MLP, which cannot be recovered from them (compile 'prefix tokens=N' "
                           "without project=, as peftc.load_hf_peft does)")
    _check_common(config, path, (_submodules(model),))
    check_keys(path, tensors, {KEY})
    flat = tensors[KEY]
    shapes = {"num_layers": config.get("num_layers"), "token_dim": config.get("token_dim"),
              "num_attention_heads": config.get("num_attention_heads")}
    _check_prefix_layout(model, layers, shapes, "the compiled model")
    tokens = layers[0].tokens
    want = (tokens, shapes["num_layers"] * 2 * shapes["token_dim"])
    if config.get("num_virtual_tokens") != tokens or tuple(flat.shape) != want:
        raise AdapterError(f"{path}: prompt_embeddings has shape {tuple(flat.shape)} for "
                           f"{config.get('num_virtual_tokens')} virtual tokens; the compiled model expects "
                           f"{want} ({tokens} tokens)")
    for record in layers:
        key, value = split(flat, record.index, record.site)
        params = record.weights(gm)
        with torch.no_grad():
            params["key"].copy_(key.to(params["key"].dtype))
            params["value"].copy_(value.to(params["value"].dtype))


def _prefix_spec(config: dict, sites) -> str:
    _check_common(config, "adapter_config.json", ANY_SUBMODULES)
    return f"prefix tokens={int(config['num_virtual_tokens'])}\n"


# ── prompt tuning ─────────────────────────────────────────────────────────────────────────────────────
def _prompt_record(model):
    return next(r for r in model.records if r.method == "prompt")


def _save_prompt(model, records) -> tuple[dict, dict]:
    record = _prompt_record(model)
    embedding = record.parameters(model.graph_module)["embedding"]
    shapes = hf_shapes(model, prefix=False)
    text = record.init_text
    tokenizer = None
    if text is not None:
        try:      # a directory HF PEFT's AutoTokenizer can open (a built-in name resolves to its cache)
            directory = resolve(model.model_ref)[1]
        except ModelError:
            directory = None
        tokenizer = str(directory) if directory is not None else model.model_ref
    fields = {"num_virtual_tokens": record.tokens, **shapes, "token_dim": record.dim,
              "num_transformer_submodules": 1, "prompt_tuning_init": "TEXT" if text is not None else "RANDOM",
              "prompt_tuning_init_text": text, "tokenizer_name_or_path": tokenizer,
              "tokenizer_kwargs": None, "modules_to_save": None}
    return fields, {KEY: embedding.detach().to(torch.float32).contiguous()}


def _load_prompt(model, records, config: dict, tensors: dict, path) -> None:
    """HF PEFT's own encoder-decoder prompt files (``SEQ_2_SEQ_LM``, its default
    ``num_transformer_submodules`` = 2) hold 2P rows, of which its prompt-tuning forward and generate read
    the first P, before the encoder's input: peftc reads those."""
    submodules = config.get("num_transformer_submodules") or 1
    _check_common(config, path, ANY_SUBMODULES if model.kind == "seq2seq-lm" else (1,))
    check_keys(path, tensors, {KEY})
    record = _prompt_record(model)
    param = record.parameters(model.graph_module)["embedding"]
    value = tensors[KEY]
    if submodules == 2 and tuple(value.shape) == (2 * param.shape[0], param.shape[1]):
        value = value[:param.shape[0]]
    if tuple(value.shape) != tuple(param.shape):
        raise AdapterError(f"{path}: prompt_embeddings has shape {tuple(value.shape)}; the compiled model "
                           f"expects {tuple(param.shape)} ({record.tokens} tokens × {record.dim})")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _prompt_spec(config: dict, sites) -> str:
    _check_common(config, "adapter_config.json", ANY_SUBMODULES)
    return f"prompt tokens={int(config['num_virtual_tokens'])}\n"


def _submodules(model) -> int:
    """HF PEFT's ``num_transformer_submodules`` for a prefix: 2 on an encoder-decoder (its decoder's cache
    holds self- and cross-attention), else 1."""
    return 2 if model.kind == "seq2seq-lm" else 1


#: the num_transformer_submodules a file may give before it meets a model: 1, or 2 (an encoder-decoder)
ANY_SUBMODULES = (1, 2)


def _check_common(config: dict, path, allowed: tuple[int, ...] = (1,)) -> None:
    submodules = config.get("num_transformer_submodules", 1)
    if (submodules not in allowed and submodules is not None) or isinstance(submodules, bool):
        raise AdapterError(f"{path}: num_transformer_submodules = {submodules!r}; peftc reads "
                           f"{' or '.join(map(str, allowed))} for this model")
    check_int(config, "num_virtual_tokens", path, REQUIRED)
    for key in ("num_layers", "token_dim", "num_attention_heads"):
        check_int(config, key, path)


def _check_prefix(config: dict, path) -> None:
    _check_common(config, path, ANY_SUBMODULES)
    for key in ("num_layers", "token_dim", "num_attention_heads"):    # the layout of prompt_embeddings
        check_int(config, key, path, REQUIRED)


register_format(Format("prefix", "PREFIX_TUNING", _save_prefix, _load_prefix, _prefix_spec, _check_prefix))
register_format(Format("prompt", "PROMPT_TUNING", _save_prompt, _load_prompt, _prompt_spec,
                       lambda config, path: _check_common(config, path, ANY_SUBMODULES)))

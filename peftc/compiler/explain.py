"""What an adapter learned: per-layer sizes of each statement's change, and for a soft prompt the
vocabulary tokens nearest to each learned vector (the check the prompt-tuning literature uses)."""
from __future__ import annotations

import math

import torch

#: what the number for each method measures
MEASURES = {
    "lora": "‖s·B·A‖ (Frobenius norm of the weight update)",
    "ia3": "‖l − 1‖ (how far the scales moved from one)",
    "bitfit": "‖b − b₀‖ (how far the biases moved)",
    "full": "‖W − W₀‖ (how far the weights moved)",
    "adapter": "‖up‖·‖down‖ (a bound on the adapter's gain)",
}


def change(record, gm) -> float:
    """One number for how much a record changes the model (see MEASURES; else the parameters' norm)."""
    params = {k: v.detach().float() for k, v in record.parameters(gm).items()}
    if record.method == "lora":
        return float(record.delta(gm).float().norm())
    if record.method == "ia3":
        return float((params["ia3_l"] - 1).norm())
    if record.method in ("bitfit", "full"):
        total = 0.0
        for name, value in params.items():
            base = _base(record, gm, name)
            total += float((value - base).norm()) ** 2 if base is not None else float(value.norm()) ** 2
        return math.sqrt(total)
    if record.method == "adapter":
        return float(params["up.weight"].norm() * params["down.weight"].norm())
    return math.sqrt(sum(float(v.norm()) ** 2 for v in params.values()))


def _base(record, gm, name: str):
    """The base model's value of an owned parameter (a bias bitfit added has none: zero)."""
    target = record.site.bias if name == "bias" else record.site.weight
    return gm.get_parameter(target).detach().float() if target else None


def layer_table(model) -> str:
    """Rows per layer, a column per statement: the root-sum-square of ``change`` over its sites there."""
    gm = model.graph_module
    n = len(model.spec.statements)
    cells: dict[str, list[float]] = {}
    for record in model.records:
        if not record.parameters(gm):
            continue
        layer = record.layer
        label = "-" if layer is None else str(layer)
        cells.setdefault(label, [0.0] * n)[record.statement] += change(record, gm) ** 2
    rows = sorted(cells.items(), key=lambda kv: (kv[0] == "-", int(kv[0]) if kv[0] != "-" else 0))
    used = sorted({r.statement for r in model.records if r.parameters(gm)})
    lines = [f"{i + 1:>3}  {model.spec.statements[i]}" for i in used]
    lines += [f"     {model.spec.statements[i].method}: {MEASURES.get(model.spec.statements[i].method, '‖θ‖')}"
              for i in used]
    lines.append("")
    lines.append(f"{'layer':>5}" + "".join(f"  {'#' + str(i + 1):>10}" for i in used))
    for label, values in rows:
        lines.append(f"{label:>5}" + "".join(f"  {math.sqrt(values[i]):>10.4g}" for i in used))
    return "\n".join(lines)


def nearest_tokens(vectors: torch.Tensor, embedding: torch.Tensor, tokenizer, top: int = 5) -> list[list[tuple[str, float]]]:
    """For each learned vector, the ``top`` vocabulary tokens of highest cosine similarity."""
    vectors = torch.nn.functional.normalize(vectors.detach().float(), dim=-1)
    table = torch.nn.functional.normalize(embedding.detach().float(), dim=-1)
    scores, ids = (vectors @ table.T).topk(top, dim=-1)
    return [[(tokenizer.decode([int(i)]) if tokenizer is not None else f"#{int(i)}", float(s))
             for s, i in zip(row_scores, row_ids)] for row_scores, row_ids in zip(scores, ids)]


def prompt_table(model, tokenizer, top: int = 5) -> str | None:
    """The nearest tokens of every soft-prompt vector, or None when the model has no soft prompt."""
    gm = model.graph_module
    prompts = [r for r in model.records if r.method == "prompt"]
    if not prompts or model.sites.embed is None:
        return None
    embedding = gm.get_parameter(model.sites.embed)
    lines = []
    for record in prompts:
        vectors = next(iter(record.parameters(gm).values()))
        lines.append(f"soft prompt of {model.spec.statements[record.statement]}: nearest tokens (cosine)")
        for i, row in enumerate(nearest_tokens(vectors.reshape(-1, embedding.shape[1]), embedding, tokenizer, top)):
            lines.append(f"  {i:>3}  " + "  ".join(f"{text!r} {score:.2f}" for text, score in row))
    return "\n".join(lines)

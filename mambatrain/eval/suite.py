"""``mambatrain eval``: loss by token position over long documents, passkey retrieval by length and depth.

Does more context keep helping? The loss curve answers for natural documents (it should keep falling
with the position); the passkey grid for one fact that must survive the whole prompt. Both run the model
in windows of ``eval.window`` tokens with the Mamba state and attention KV cache carried across windows,
which gives the same numbers as one pass while bounding activation memory.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..config.schema import Recipe, RecipeError
from ..models.lm import LanguageModel
from ..models.loss import IGNORE_INDEX
from .documents import long_documents
from .passkey import passkey_prompts

log = logging.getLogger("mambatrain")


@torch.no_grad()
def token_losses(model: LanguageModel, input_ids: torch.Tensor, labels: torch.Tensor,
                 window: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and top-1 correctness at every position, (B, T) each (NaN / False where unlabelled)."""
    B, T = input_ids.shape
    if window is None or window >= T:
        spans, states = [(0, T)], None
    else:
        spans = [(a, min(a + window, T)) for a in range(0, T, window)]
        states = model.decoding_states(B, input_ids.device)
    losses, correct = [], []
    for a, b in spans:
        logits = model.logits(model(input_ids[:, a:b], states=states)).float()  # (B, t, V)
        target = labels[:, a:b]
        loss = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
        scored = target != IGNORE_INDEX
        losses.append(loss.masked_fill(~scored, math.nan))
        correct.append((logits.argmax(-1) == target) & scored)
    return torch.cat(losses, dim=1), torch.cat(correct, dim=1)


def _batches(values: dict[str, torch.Tensor], size: int, device):
    n = values["input_ids"].shape[0]
    for i in range(0, n, size):
        yield {k: v[i:i + size].to(device) for k, v in values.items()}


def loss_by_position(model: LanguageModel, recipe: Recipe, device, batch_size: int) -> dict:
    """Mean loss at each position, and over log2-spaced bins [1, 2), [2, 4), ... (positions from 1)."""
    e = recipe.eval
    length = e.seq_len or recipe.data.seq_len
    documents = long_documents(recipe, length, e.documents, e.seed)
    total = torch.zeros(length, dtype=torch.float64)
    count = torch.zeros(length, dtype=torch.float64)
    for batch in _batches(documents, batch_size, device):
        loss, _ = token_losses(model, batch["input_ids"], batch["labels"], e.window)
        scored = ~loss.isnan()
        total += loss.nan_to_num().sum(0).double().cpu()
        count += scored.sum(0).double().cpu()
    per_position = (total / count.clamp(min=1)).masked_fill(count == 0, math.nan)
    bins = []
    start = 1
    while start <= length:
        end = min(2 * start, length + 1)
        n = count[start - 1:end - 1].sum().item()
        mean = total[start - 1:end - 1].sum().item() / n if n else None
        bins.append({"first": start, "last": end - 1, "loss": mean, "tokens": int(n)})
        start *= 2
    return {"seq_len": length, "documents": int(documents["input_ids"].shape[0]), "bins": bins,
            "per_position": [None if math.isnan(v) else round(v, 5) for v in per_position.tolist()]}


def passkey_grid(model: LanguageModel, recipe: Recipe, tokenizer, device, batch_size: int) -> dict:
    """Retrieval accuracy (every passkey token top-1) per (length, depth); null where a length is too short."""
    e = recipe.eval
    accuracy: list[list[Optional[float]]] = []
    for depth in e.passkey_depths:
        row = []
        for length in e.passkey_lengths:
            prompts = passkey_prompts(tokenizer, length, depth, e.passkey_samples, recipe.data.passkey.digits,
                                      recipe.model.vocab_size, e.seed)
            if prompts is None:
                row.append(None)
                continue
            retrieved = []
            for batch in _batches(prompts, batch_size, device):
                _, correct = token_losses(model, batch["input_ids"], batch["labels"], e.window)
                scored = batch["labels"] != IGNORE_INDEX
                retrieved.append((correct | ~scored).all(dim=1).float().cpu())
            row.append(torch.cat(retrieved).mean().item())
        accuracy.append(row)
    skipped = [n for j, n in enumerate(e.passkey_lengths) if all(r[j] is None for r in accuracy)]
    if skipped:
        log.warning("eval: passkey lengths %s are too short to hold the passkey prompt; skipped", skipped)
    return {"lengths": e.passkey_lengths, "depths": e.passkey_depths, "samples": e.passkey_samples,
            "text": tokenizer is not None, "accuracy": accuracy}


def evaluate(model: LanguageModel, recipe: Recipe, tokenizer_spec: Optional[str], out_dir: Optional[str | Path],
             step: Optional[int] = None) -> dict:
    """Run both evaluations, write results.json and the plots into ``out_dir`` (if given); returns the results."""
    from ..data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_spec, recipe.data.text.eod_token) if tokenizer_spec else None
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise RecipeError(f"data.text.tokenizer: {tokenizer.name} has {tokenizer.vocab_size} tokens but the model "
                          f"has {model.config.vocab_size} embedding rows: not the model's tokenizer")
    device = next(model.parameters()).device
    batch_size = recipe.data.batch_size
    was_training = model.training
    model.eval()
    try:
        results = {"step": step, "loss_by_position": loss_by_position(model, recipe, device, batch_size)}
        if recipe.eval.passkey_lengths:
            results["passkey"] = passkey_grid(model, recipe, tokenizer, device, batch_size)
    finally:
        model.train(was_training)
    if out_dir is not None:
        from .plots import write_plots

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        write_plots(results, out)
    return results


def summary(results: dict) -> dict[str, float]:
    """Scalars for a logger: the loss of the first and last position bins, the mean passkey accuracy."""
    bins = [b for b in results["loss_by_position"]["bins"] if b["tokens"]]
    out = {}
    if bins:
        out["eval/loss_first_bin"], out["eval/loss_last_bin"] = bins[0]["loss"], bins[-1]["loss"]
    cells = [a for row in results.get("passkey", {}).get("accuracy", []) for a in row if a is not None]
    if cells:
        out["eval/passkey_accuracy"] = sum(cells) / len(cells)
    return out


def run(path: str, recipe: Recipe, out_dir: Optional[str] = None, device: Optional[str] = None) -> tuple[dict, Path]:
    """``mambatrain eval``: the model of ``path`` on the recipe's data and eval settings; returns results and folder."""
    from ..checkpoint.convert import load_model, run_tokenizer
    from ..config.load import recipe_to_dict
    from ..finetune import architecture_differences, check_tokenizer

    model, weights = load_model(path)
    differences = architecture_differences(weights.config, recipe.model)
    if differences:  # the recipe's model section is not used, but a mismatch usually means the wrong recipe
        log.warning("eval: the recipe describes another model than %s (%s); evaluating the checkpoint's",
                    weights.source, "; ".join(differences))
    check_tokenizer(weights, recipe, key="data.text.tokenizer")
    source = Path(path)
    if out_dir is None:  # runs/x/version_N/checkpoints/last.ckpt -> runs/x/version_N/eval/last
        out_dir = source.parent.parent / "eval" / source.stem if source.is_file() else source / "eval"
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer_spec, _ = run_tokenizer(recipe_to_dict(recipe))
    return evaluate(model, recipe, tokenizer_spec, out_dir), Path(out_dir)

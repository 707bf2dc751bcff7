"""Fine-tuning: a new run whose model starts from trained weights (finetune.init_from), part of it frozen.

Unlike ``--resume``, which continues a run exactly (optimizer, schedule, data position, RNG), ``init_from``
takes only the weights: the optimizer and schedule start fresh and the data, length and learning rate are
the new recipe's. The checkpoint must hold the recipe's architecture (the same tensors, same shapes) and,
when both sides read text, the same tokenizer: token ids that mean different things would train the
model on noise.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

from .checkpoint.convert import LoadedWeights, load_weights, run_tokenizer
from .config.load import recipe_to_dict
from .config.schema import ATTENTION, MAMBA, ModelConfig, Recipe, RecipeError
from .models.lm import LanguageModel

log = logging.getLogger("mambatrain")


def architecture_differences(have: ModelConfig, want: ModelConfig) -> list[str]:
    """The model keys that change a tensor's presence or shape, where ``have`` and ``want`` differ."""
    keys = ["kind", "d_model", "n_layers", "pattern", "vocab_size", "d_mlp", "tie_embeddings"]
    if MAMBA in have.pattern and MAMBA in want.pattern:
        keys += ["mamba.version", "mamba.d_state", "mamba.d_conv", "mamba.expand", "mamba.conv_bias"]
        keys += ["mamba.head_dim", "mamba.n_groups"] if want.mamba.version == 2 else ["mamba.dt_rank"]
    if ATTENTION in have.pattern and ATTENTION in want.pattern:
        keys += ["attention.n_heads", "attention.n_kv_heads"]

    def value(config: ModelConfig, key: str):
        section, _, name = key.rpartition(".")
        return getattr(getattr(config, section) if section else config, name)

    return [f"model.{k} is {value(have, k)!r} there but {value(want, k)!r} here" for k in keys
            if value(have, k) != value(want, k)]


def tokenizer_fingerprint(spec: Optional[str]) -> Optional[str]:
    """"byte", or a hash of a tokenizer.json's vocabulary; None when there is none or it cannot be read."""
    if spec is None or spec == "byte":
        return spec
    path = Path(spec).expanduser()
    path = path / "tokenizer.json" if path.is_dir() else path
    try:
        vocab = json.loads(path.read_text())["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()


def check_tokenizer(weights: LoadedWeights, recipe: Recipe, key: str = "finetune.init_from") -> None:
    """The checkpoint's tokenizer and the recipe's are the same, when both runs read text; errors name ``key``."""
    wanted, _ = run_tokenizer(recipe_to_dict(recipe))
    if weights.tokenizer is None or wanted is None:
        return  # synthetic data on one side: token ids are the task's own
    have, want = tokenizer_fingerprint(weights.tokenizer), tokenizer_fingerprint(wanted)
    if have is None or want is None:
        log.warning("%s: cannot read both tokenizers (%s, %s) to check that they match", key, weights.tokenizer,
                    wanted)
    elif have != want:
        raise RecipeError(f"{key}: {weights.source} was trained with the tokenizer {weights.tokenizer} but "
                          f"data.text.tokenizer is {wanted}: their token ids differ; use the checkpoint's tokenizer")


def init_from(model: LanguageModel, recipe: Recipe) -> None:
    """Load ``finetune.init_from`` into ``model`` (built from the recipe), reporting what did not match."""
    weights = load_weights(recipe.finetune.init_from)
    differences = architecture_differences(weights.config, recipe.model)
    if differences:
        raise RecipeError(f"finetune.init_from: {weights.source} holds another architecture than the recipe's "
                          f"model: {'; '.join(differences)}")
    check_tokenizer(weights, recipe)
    result = model.load_state_dict(weights.state_dict, strict=False)
    loaded = len(weights.state_dict) - len(result.unexpected_keys)
    log.info("fine-tuning from %s: %d tensors loaded; optimizer and schedule start fresh", weights.source, loaded)
    if result.missing_keys:
        log.warning("  missing from the checkpoint (kept at their initial values): %s", ", ".join(result.missing_keys))
    if result.unexpected_keys:
        log.warning("  in the checkpoint but not in the model (ignored): %s", ", ".join(result.unexpected_keys))


def freeze(model: LanguageModel, patterns: list[str]) -> None:
    """Keep the parameters whose names match any pattern fixed (no gradient, not in the optimizer)."""
    names = [name for name, _ in model.named_parameters()]
    frozen: set[str] = set()
    for i, pattern in enumerate(patterns):
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise RecipeError(f"finetune.freeze[{i}]: {pattern!r} matches no parameter; names look like "
                              f"{', '.join(names[:3])}, ..., {names[-1]}")
        frozen.update(matched)
    parameters = dict(model.named_parameters())
    for name in frozen:
        parameters[name].requires_grad_(False)
    count = sum(parameters[name].numel() for name in frozen)
    total = sum(p.numel() for p in parameters.values())
    log.info("frozen: %d tensors, %s of %s parameters (%s)", len(frozen), f"{count:,}", f"{total:,}",
             ", ".join(patterns))
    if "embedding.weight" in frozen and model.lm_head is None:
        log.info("  the embedding is tied to the output head: both stay fixed")


def prepare(model: LanguageModel, recipe: Recipe, resuming: bool = False) -> None:
    """Apply the recipe's finetune section (on --resume the checkpoint already holds the weights)."""
    if recipe.finetune.init_from is not None and not resuming:
        init_from(model, recipe)
    if recipe.finetune.freeze:
        freeze(model, recipe.finetune.freeze)

"""Model weights in from the layouts people hold, and out as a Hugging Face-style folder.

Reads (``load_weights``):
  - a mambatrain training checkpoint (``.ckpt``: the recipe travels in its hyper-parameters);
  - a folder written by ``mambatrain export``;
  - a transformers folder of ``MambaForCausalLM``, ``Mamba2ForCausalLM``, ``BambaForCausalLM`` or
    ``LlamaForCausalLM`` (config.json + model.safetensors, sharded or not, or pytorch_model.bin);
  - a state-spaces/mamba folder of ``MambaLMHeadModel`` (config.json with ``ssm_cfg`` + pytorch_model.bin).
Writes (``export``): config.json + model.safetensors (+ the run's tokenizer files). When a transformers
class computes what our model computes, the folder is in that class's layout and loads with
``AutoModelForCausalLM.from_pretrained`` to the same logits:

  pure Mamba-1, no MLP          -> MambaForCausalLM
  pure Mamba-2, no MLP          -> Mamba2ForCausalLM
  Mamba-2 (+ attention) with MLP -> BambaForCausalLM (full RoPE: partial_rotary_factor 1.0)
  attention with MLP            -> LlamaForCausalLM
Anything else (Mamba-1 with MLP or attention, no-MLP hybrids, sliding windows) is written in our own
layout (model_type ``mambatrain``), which only mambatrain reads. Either way config.json carries our whole
model section under the key ``mambatrain``, so a round trip rebuilds exactly the same model.

Our parameter names follow mamba_ssm, so Mamba tensors only change prefix. The rest: the fused attention
``qkv`` is q, k, v stacked (transformers keeps three matrices, mamba_ssm's MHA one ``in_proj`` in the same
order); the fused SwiGLU ``gate_up`` is gate then up (transformers: two matrices; mamba_ssm's ``fc1`` is up
then gate). RoPE rotates the two halves of each head in all three (GPT-NeoX layout), so q and k need no
permutation. Mamba-1 dt is ``x_proj``'s low-rank part times ``dt_proj.weight``, with ``dt_proj.bias`` added
inside the scan, everywhere. The Mamba-2 gated norm (``norm``: gate, then RMS over n_groups groups, then the
weight) and every RMSNorm share one epsilon, as in transformers' ``layer_norm_epsilon`` / ``rms_norm_eps``.
transformers' ``residual_in_fp32`` changes nothing in float32; ``time_step_*`` are init-only (our
``dt_min``, ``dt_max``, ``dt_init_floor``); a ``time_step_limit`` other than (0, inf) clamps dt, which we do
not, so it is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config.schema import ATTENTION, MAMBA, AttentionConfig, MambaConfig, ModelConfig, RecipeError
from ..data.tokenizer import EOD_TOKEN, load_tokenizer
from ..models.lm import LanguageModel
from .io import CheckpointError, check_contents, read_marker, verify

log = logging.getLogger("mambatrain")

WEIGHTS = "model.safetensors"
FORMAT_KEY = "mambatrain"  # our model section inside config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ConversionError(CheckpointError):
    """Weights or a config that cannot become (or come from) our model; one line, naming the file and the fix."""


@dataclass
class LoadedWeights:
    """A model read from any supported layout, in our parameter names."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    source: str  # what was read, for messages
    tokenizer: Optional[str] = None  # "byte", a tokenizer.json path, or None (synthetic data: no tokenizer)
    eod_token: str = EOD_TOKEN
    recipe: Optional[dict] = None  # the training recipe, when read from a mambatrain checkpoint


# ------------------------------------------------------------------------------------------------ layouts

@dataclass(frozen=True)
class Layout:
    """Where our tensors live in another library's state dict (``{i}`` is the layer index)."""

    embedding: str
    norm_f: str
    layer: str
    norm: str
    mamba: str = "mixer."
    qkv: tuple[str, ...] = ()
    out: str = ""
    mlp_norm: str = ""
    gate_up: tuple[str, ...] = ()
    down: str = ""
    up_first: bool = False  # a single fused MLP input matrix holding up, then gate (mamba_ssm's fc1)


HF_MAMBA = Layout("backbone.embeddings.weight", "backbone.norm_f.weight", "backbone.layers.{i}.", "norm.weight")
MAMBA_SSM = Layout("backbone.embedding.weight", "backbone.norm_f.weight", "backbone.layers.{i}.", "norm.weight",
                   qkv=("mixer.in_proj.weight",), out="mixer.out_proj.weight", mlp_norm="norm2.weight",
                   gate_up=("mlp.fc1.weight",), down="mlp.fc2.weight", up_first=True)
_HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
BAMBA = Layout("model.embed_tokens.weight", "model.final_layernorm.weight", "model.layers.{i}.",
               "input_layernorm.weight", mamba="mamba.", qkv=_HF_QKV, out="self_attn.o_proj.weight",
               mlp_norm="pre_ff_layernorm.weight", gate_up=("feed_forward.gate_proj.weight",
                                                             "feed_forward.up_proj.weight"),
               down="feed_forward.down_proj.weight")
LLAMA = Layout("model.embed_tokens.weight", "model.norm.weight", "model.layers.{i}.", "input_layernorm.weight",
               qkv=_HF_QKV, out="self_attn.o_proj.weight", mlp_norm="post_attention_layernorm.weight",
               gate_up=("mlp.gate_proj.weight", "mlp.up_proj.weight"), down="mlp.down_proj.weight")
LAYOUTS = {"mamba": HF_MAMBA, "mamba2": HF_MAMBA, "bamba": BAMBA, "llama": LLAMA, "mamba_ssm": MAMBA_SSM}
ARCHITECTURES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM", "bamba": "BambaForCausalLM",
                 "llama": "LlamaForCausalLM"}


def _their_names(key: str, config: ModelConfig, layout: Layout) -> tuple[tuple[str, ...], list[int] | None]:
    """Their tensor names for our ``key``, and the row sizes when ours is several of theirs stacked."""
    if key == "embedding.weight":
        return (layout.embedding,), None
    if key == "norm_f.weight":
        return (layout.norm_f,), None
    if key == "lm_head.weight":
        return ("lm_head.weight",), None
    i, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", key).groups()
    prefix = layout.layer.format(i=i)
    if rest == "norm.weight":
        return (prefix + layout.norm,), None
    if rest == "mlp_norm.weight":
        return (prefix + layout.mlp_norm,), None
    if rest == "mlp.down.weight":
        return (prefix + layout.down,), None
    if rest == "mlp.gate_up.weight":
        return tuple(prefix + n for n in layout.gate_up), [config.d_mlp] * len(layout.gate_up)
    name = rest.removeprefix("mixer.")
    if config.pattern[int(i)] == MAMBA:
        return (prefix + layout.mamba + name,), None
    if name == "out_proj.weight":
        return (prefix + layout.out,), None
    head_dim, att = config.d_model // config.attention.n_heads, config.attention
    sizes = [att.n_heads * head_dim, att.n_kv_heads * head_dim, att.n_kv_heads * head_dim]
    return tuple(prefix + n for n in layout.qkv), sizes if len(layout.qkv) == 3 else None


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _our_keys(config: ModelConfig) -> list[str]:
    with torch.device("meta"):
        return list(LanguageModel(config).state_dict())


def to_layout(state_dict: dict[str, torch.Tensor], config: ModelConfig, layout: Layout) -> dict[str, torch.Tensor]:
    """Our state dict -> theirs (a tied head is left out, as transformers saves it)."""
    out = {}
    for key, tensor in state_dict.items():
        names, sizes = _their_names(key, config, layout)
        if key.endswith("gate_up.weight") and layout.up_first:
            tensor = _swap_halves(tensor)
        parts = tensor.split(sizes, dim=0) if sizes else (tensor,)
        out.update({name: part.contiguous() for name, part in zip(names, parts)})
    return out


def from_layout(tensors: dict[str, torch.Tensor], config: ModelConfig, layout: Layout,
                source: str) -> dict[str, torch.Tensor]:
    """Their state dict -> ours; a missing tensor is an error, leftovers are reported."""
    ours, used, missing = {}, set(), []
    for key in _our_keys(config):
        names, _ = _their_names(key, config, layout)
        if key == "lm_head.weight" and names[0] not in tensors and config.tie_embeddings:
            continue
        if any(n not in tensors for n in names):
            missing += [n for n in names if n not in tensors]
            continue
        used.update(names)
        tensor = torch.cat([tensors[n] for n in names], dim=0) if len(names) > 1 else tensors[names[0]]
        ours[key] = _swap_halves(tensor) if key.endswith("gate_up.weight") and layout.up_first else tensor
    if missing:
        raise ConversionError(f"{source}: missing tensors {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}; the file does not match its config.json")
    # A tied head may be stored anyway (mamba_ssm does); rotary tables are buffers, not weights.
    ignorable = re.compile(r"lm_head\.weight|.*rotary_emb\.inv_freq")
    leftover = [n for n in tensors if n not in used and not ignorable.fullmatch(n)]
    if leftover:
        raise ConversionError(f"{source}: tensors our model has no place for: {', '.join(leftover[:5])}"
                              f"{' ...' if len(leftover) > 5 else ''} (biases, or a layer kind we do not build)")
    return ours


# ------------------------------------------------------------------------------------------------ configs

def config_to_dict(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(values: dict, source: str) -> ModelConfig:
    """Our model section (as written by ``config_to_dict``) -> ModelConfig, with a one-line error."""
    try:
        values = dict(values)
        mamba, attention = MambaConfig(**values.pop("mamba", {})), AttentionConfig(**values.pop("attention", {}))
        return ModelConfig(**values, mamba=mamba, attention=attention)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{source}: its model section does not build a model ({error})") from None


def hf_model_type(config: ModelConfig) -> Optional[str]:
    """The transformers model_type that computes what ``config`` computes, or None."""
    has_mamba, has_attention = MAMBA in config.pattern, ATTENTION in config.pattern
    if has_attention and config.attention.sliding_window is not None:
        return None
    if not has_attention and config.d_mlp == 0:
        return "mamba" if config.mamba.version == 1 else "mamba2"
    if config.d_mlp > 0 and has_mamba and config.mamba.version == 2:
        return "bamba"
    if config.d_mlp > 0 and not has_mamba:
        return "llama"
    return None


def _hf_config(config: ModelConfig, model_type: str, eod_id: Optional[int]) -> dict:
    m, a = config.mamba, config.attention
    common = {"model_type": model_type, "architectures": [ARCHITECTURES[model_type]], "vocab_size": config.vocab_size,
              "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
              "tie_word_embeddings": config.tie_embeddings, "bos_token_id": eod_id, "eos_token_id": eod_id,
              "pad_token_id": eod_id, "torch_dtype": "float32"}
    d_inner = m.expand * config.d_model
    if model_type == "mamba":
        return {**common, "state_size": m.d_state, "expand": m.expand, "intermediate_size": d_inner,
                "conv_kernel": m.d_conv, "use_bias": False, "use_conv_bias": m.conv_bias, "hidden_act": "silu",
                "time_step_rank": m.dt_rank, "time_step_min": m.dt_min, "time_step_max": m.dt_max,
                "time_step_floor": m.dt_init_floor, "layer_norm_epsilon": config.norm_eps,
                "residual_in_fp32": True}
    if model_type == "mamba2":
        return {**common, "state_size": m.d_state, "expand": m.expand, "num_heads": d_inner // m.head_dim,
                "head_dim": m.head_dim, "n_groups": m.n_groups, "conv_kernel": m.d_conv, "use_bias": False,
                "use_conv_bias": m.conv_bias, "hidden_act": "silu", "chunk_size": m.chunk_size,
                "time_step_min": m.dt_min, "time_step_max": m.dt_max, "time_step_floor": m.dt_init_floor,
                "layer_norm_epsilon": config.norm_eps,
                "residual_in_fp32": True}
    attention = {"num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
                 "head_dim": config.d_model // a.n_heads, "intermediate_size": config.d_mlp,
                 "hidden_act": "silu", "rms_norm_eps": config.norm_eps, "attention_bias": False, "mlp_bias": False,
                 "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_base,
                                     "partial_rotary_factor": 1.0}}
    if model_type == "llama":
        return {**common, **attention}
    return {**common, **attention, "attn_layer_indices": [i for i, k in enumerate(config.pattern) if k == ATTENTION],
            "mamba_n_heads": d_inner // m.head_dim, "mamba_d_head": m.head_dim, "mamba_n_groups": m.n_groups,
            "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand,
            "mamba_chunk_size": m.chunk_size, "mamba_conv_bias": m.conv_bias, "mamba_proj_bias": False}


def _refuse(condition: bool, source: str, message: str) -> None:
    if condition:
        raise ConversionError(f"{source}: {message}")


def _chunk(value: int) -> int:
    # Our SSD chunk must be 64, 128 or 256; the chunk length never changes the result.
    return value if value in (64, 128, 256) else 256


def _pattern_kind(pattern: str) -> dict:
    kind = "mamba" if set(pattern) == {MAMBA} else "transformer" if set(pattern) == {ATTENTION} else "hybrid"
    return {"kind": kind, "pattern": pattern if kind == "hybrid" else None}


def _rope(c: dict, source: str) -> float:
    rope = c.get("rope_parameters") or {"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)}
    _refuse(rope.get("rope_type", "default") != "default", source,
            f"RoPE scaling {rope.get('rope_type')!r} is not supported (plain RoPE only)")
    _refuse(rope.get("partial_rotary_factor", 1.0) != 1.0, source,
            f"partial_rotary_factor {rope.get('partial_rotary_factor')} is not supported: our attention rotates "
            f"whole heads (Bamba's published checkpoints rotate half)")
    return float(rope["rope_theta"])


def _number(value) -> float:
    # transformers writes non-finite floats as {"__float__": "Infinity"} (JSON has no infinity)
    return float(value["__float__"] if isinstance(value, dict) else value)


def config_from_hf(c: dict, source: str) -> ModelConfig:
    """A transformers config.json (mamba, mamba2, bamba, llama) -> our ModelConfig."""
    model_type = c.get("model_type")
    _refuse(model_type not in ("mamba", "mamba2", "bamba", "llama"), source,
            f"model_type {model_type!r} is not one we import (mamba, mamba2, bamba, llama, mamba_ssm, mambatrain)")
    _refuse(c.get("hidden_act", "silu") != "silu", source, f"hidden_act {c.get('hidden_act')!r}: we use silu")
    limit = [_number(v) for v in c.get("time_step_limit") or (0.0, math.inf)]
    _refuse(limit[0] != 0 or not math.isinf(limit[1]), source,
            f"time_step_limit {limit} clamps dt; our scan does not (use (0.0, inf))")
    common = {"d_model": c["hidden_size"], "n_layers": c["num_hidden_layers"], "vocab_size": c["vocab_size"],
              "tie_embeddings": bool(c.get("tie_word_embeddings", model_type == "mamba"))}
    if model_type in ("mamba", "mamba2"):
        _refuse(c.get("use_bias", False), source, "use_bias: in_proj / out_proj biases are not supported")
        mamba = MambaConfig(version=1 if model_type == "mamba" else 2, d_state=c["state_size"],
                            d_conv=c.get("conv_kernel", 4), expand=int(c.get("expand", 2)),
                            conv_bias=c.get("use_conv_bias", True), dt_min=c.get("time_step_min", 0.001),
                            dt_max=c.get("time_step_max", 0.1), dt_init_floor=c.get("time_step_floor", 1e-4))
        if model_type == "mamba":
            rank = c.get("time_step_rank", "auto")
            mamba.dt_rank = math.ceil(c["hidden_size"] / 16) if rank == "auto" else int(rank)
        else:
            mamba.head_dim, mamba.n_groups, mamba.chunk_size = c["head_dim"], c["n_groups"], _chunk(c["chunk_size"])
            _refuse(c["num_heads"] * c["head_dim"] != mamba.expand * c["hidden_size"], source,
                    "num_heads * head_dim must equal expand * hidden_size")
        return ModelConfig(kind="mamba", d_mlp=0, norm_eps=c.get("layer_norm_epsilon", 1e-5), mamba=mamba, **common)
    _refuse(c.get("attention_bias", False) or c.get("mlp_bias", False) or c.get("mamba_proj_bias", False), source,
            "biases in attention, MLP or Mamba projections are not supported")
    heads = c["num_attention_heads"]
    _refuse(c.get("head_dim") not in (None, c["hidden_size"] // heads), source,
            f"head_dim {c.get('head_dim')} differs from hidden_size / num_attention_heads")
    attention = AttentionConfig(n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads,
                                rope_base=_rope(c, source))
    if model_type == "llama":
        _refuse(c.get("sliding_window") is not None, source, "sliding_window models are not supported")
        return ModelConfig(kind="transformer", d_mlp=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
                           attention=attention, **common)
    attn = set(c.get("attn_layer_indices") or [])
    pattern = "".join(ATTENTION if i in attn else MAMBA for i in range(c["num_hidden_layers"]))
    expand = int(c.get("mamba_expand", 2))
    n_heads = c.get("mamba_n_heads", 128)
    head_dim = c.get("mamba_d_head", "auto")
    head_dim = expand * c["hidden_size"] // n_heads if head_dim == "auto" else head_dim
    mamba = MambaConfig(version=2, d_state=c.get("mamba_d_state", 256), d_conv=c.get("mamba_d_conv", 4),
                        expand=expand, head_dim=head_dim,
                        n_groups=c.get("mamba_n_groups", 1), chunk_size=_chunk(c.get("mamba_chunk_size", 256)),
                        conv_bias=c.get("mamba_conv_bias", True))
    return ModelConfig(d_mlp=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-5), mamba=mamba,
                       attention=attention, **_pattern_kind(pattern), **common)


def config_from_mamba_ssm(c: dict, tensors: dict[str, torch.Tensor], source: str) -> ModelConfig:
    """A state-spaces/mamba ``MambaLMHeadModel`` config.json -> our ModelConfig (sizes padded as in the weights)."""
    ssm = dict(c.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    _refuse(not c.get("rms_norm", True), source, "rms_norm: false (LayerNorm blocks) is not supported")
    _refuse(ssm.get("bias", False), source, "ssm_cfg.bias: in_proj / out_proj biases are not supported")
    _refuse(ssm.get("d_ssm") is not None or ssm.get("D_has_hdim", False) or not ssm.get("rmsnorm", True)
            or ssm.get("norm_before_gate", False), source,
            "ssm_cfg d_ssm, D_has_hdim, rmsnorm: false and norm_before_gate: true are not supported")
    version = 2 if layer == "Mamba2" else 1
    mamba = MambaConfig(version=version, d_state=ssm.get("d_state", 128 if version == 2 else 16),
                        d_conv=ssm.get("d_conv", 4), expand=ssm.get("expand", 2),
                        head_dim=ssm.get("headdim", 64), n_groups=ssm.get("ngroups", 1),
                        chunk_size=_chunk(ssm.get("chunk_size", 256)), conv_bias=ssm.get("conv_bias", True),
                        dt_min=ssm.get("dt_min", 0.001), dt_max=ssm.get("dt_max", 0.1),
                        dt_init_floor=ssm.get("dt_init_floor", 1e-4))
    if version == 1:
        rank = ssm.get("dt_rank", "auto")
        mamba.dt_rank = math.ceil(c["d_model"] / 16) if rank == "auto" else int(rank)
    attn_idx, attn = set(c.get("attn_layer_idx") or []), dict(c.get("attn_cfg") or {})
    attention = AttentionConfig()
    if attn_idx:
        heads = attn["num_heads"]
        head_dim = attn.get("head_dim") or c["d_model"] // heads
        _refuse(head_dim != c["d_model"] // heads, source, "attn_cfg.head_dim must be d_model / num_heads")
        _refuse(not attn.get("causal", False), source, "attn_cfg.causal is false: a language model needs causal")
        _refuse(attn.get("rotary_emb_dim", 0) != head_dim or attn.get("rotary_emb_interleaved", False), source,
                f"attn_cfg.rotary_emb_dim must be the head size {head_dim}, not interleaved (our RoPE)")
        _refuse(attn.get("d_conv", 0) or attn.get("mlp_dim", 0) or attn.get("softmax_scale") is not None, source,
                "attn_cfg d_conv, mlp_dim and softmax_scale are not supported")
        attention = AttentionConfig(n_heads=heads, n_kv_heads=attn.get("num_heads_kv") or heads,
                                    rope_base=attn.get("rotary_emb_base", 10000.0))
        for i in attn_idx:  # mamba_ssm's MHA has biases by default; all-zero ones are harmless
            for name in ("in_proj.bias", "out_proj.bias"):
                bias = tensors.pop(f"backbone.layers.{i}.mixer.{name}", None)
                _refuse(bias is not None and bool(bias.any()), source,
                        f"layer {i} attention has a non-zero {name}; biases are not supported")
    pattern = "".join(ATTENTION if i in attn_idx else MAMBA for i in range(c["n_layer"]))
    d_mlp = tensors["backbone.layers.0.mlp.fc2.weight"].shape[1] if c.get("d_intermediate", 0) else 0
    return ModelConfig(d_model=c["d_model"], n_layers=c["n_layer"], vocab_size=tensors[MAMBA_SSM.embedding].shape[0],
                       d_mlp=d_mlp, tie_embeddings=c.get("tie_embeddings", True), norm_eps=1e-5, mamba=mamba,
                       attention=attention, **_pattern_kind(pattern))


# ------------------------------------------------------------------------------------------------ reading

def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = []
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    elif (folder / f"{WEIGHTS}.index.json").is_file():
        index = json.loads((folder / f"{WEIGHTS}.index.json").read_text())
        files = [folder / name for name in sorted(set(index["weight_map"].values()))]
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    _refuse(not files, str(folder), f"no {WEIGHTS}, sharded {WEIGHTS}.index.json or pytorch_model.bin")
    tensors = {}
    for file in files:
        try:
            if file.suffix == ".bin":
                tensors.update(torch.load(file, map_location="cpu", weights_only=True))
            else:
                tensors.update(load_file(file))
        except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as error:
            raise ConversionError(f"{file}: cannot be read (truncated or corrupt? "
                                  f"{' '.join(str(error).split())[:160]})") from None
    return tensors


def _folder_tokenizer(folder: Path, meta: dict) -> tuple[Optional[str], str]:
    eod = meta.get("eod_token", EOD_TOKEN)
    if (folder / "tokenizer.json").is_file():
        return str(folder / "tokenizer.json"), eod
    return meta.get("tokenizer"), eod  # "byte" or None


def read_folder(folder: Path) -> LoadedWeights:
    """An exported, transformers or mamba_ssm folder -> weights in our names."""
    config_file = folder / "config.json"
    _refuse(not config_file.is_file(), str(folder), "no config.json: not a model folder")
    try:
        c = json.loads(config_file.read_text())
    except ValueError as error:
        raise ConversionError(f"{config_file}: not valid JSON ({error})") from None
    tensors = _load_tensors(folder)
    meta = c.get(FORMAT_KEY) or {}
    tokenizer, eod = _folder_tokenizer(folder, meta)
    source = str(folder)
    try:
        if "ssm_cfg" in c and "d_model" in c:
            config, layout, kind = config_from_mamba_ssm(c, tensors, source), MAMBA_SSM, "state-spaces/mamba"
        elif c.get("model_type") == FORMAT_KEY:
            config, layout, kind = config_from_dict(meta["model"], source), None, "mambatrain"
        else:
            hf = config_from_hf(c, source)
            config = config_from_dict(meta["model"], source) if "model" in meta else hf
            layout, kind = LAYOUTS[c["model_type"]], f"transformers {c.get('model_type')}"
    except KeyError as error:
        raise ConversionError(f"{config_file}: has no {error} (an incomplete config.json?)") from None
    state_dict = tensors if layout is None else from_layout(tensors, config, layout, source)
    return LoadedWeights(config, state_dict, f"{kind} folder {folder}", tokenizer, eod)


def run_tokenizer(recipe: dict) -> tuple[Optional[str], str]:
    """The tokenizer a training recipe used: "byte", a tokenizer.json path, or None for synthetic data."""
    data = recipe["data"]
    text = data["text"]
    source = data["source"]
    if source == "prepared":
        try:
            from ..data.shards import read_index
            return read_index(data["prepared"]["path"])["tokenizer"], text["eod_token"]
        except RecipeError:
            return text["tokenizer"], text["eod_token"]
    return (text["tokenizer"], text["eod_token"]) if source == "text" else (None, text["eod_token"])


def read_checkpoint(path: Path) -> LoadedWeights:
    """A mambatrain training checkpoint -> its model's weights and recipe."""
    if read_marker(path) is not None:
        verify(path)  # size and sha256 against the completion marker
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise ConversionError(f"{path}: cannot be read as a checkpoint (truncated or corrupt? "
                              f"{' '.join(str(error).split())[:160]})") from None
    check_contents(checkpoint, path)
    recipe = checkpoint["hyper_parameters"]["recipe"]
    config = config_from_dict(recipe["model"], str(path))
    state_dict = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    tokenizer, eod = run_tokenizer(recipe)
    return LoadedWeights(config, state_dict, f"checkpoint {path} (step {checkpoint['global_step']})", tokenizer,
                         eod, recipe)


def load_weights(path: str | Path) -> LoadedWeights:
    """Weights from a .ckpt file or a model folder (exported, transformers, or state-spaces/mamba)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return read_folder(path)
    _refuse(not path.is_file(), str(path), "no such checkpoint file or model folder")
    return read_checkpoint(path)


def build_model(weights: LoadedWeights) -> LanguageModel:
    """The model of ``weights``, loaded exactly (every tensor, no more, same shapes)."""
    model = LanguageModel(weights.config)
    try:
        model.load_state_dict(weights.state_dict, strict=True)
    except RuntimeError as error:
        raise ConversionError(f"{weights.source}: the weights do not fit the model its config describes "
                              f"({' '.join(str(error).split())[:240]})") from None
    return model.eval()


def load_model(path: str | Path) -> tuple[LanguageModel, LoadedWeights]:
    weights = load_weights(path)
    return build_model(weights), weights


# ------------------------------------------------------------------------------------------------ writing

def export(path: str | Path, out_dir: str | Path) -> Path:
    """Write ``path`` (a checkpoint or model folder) as config.json + model.safetensors (+ tokenizer files)."""
    from safetensors.torch import save_file

    weights = load_weights(path)
    config = weights.config
    tokenizer = load_tokenizer(weights.tokenizer, weights.eod_token) if weights.tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ConversionError(f"{weights.source}: its tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens "
                              f"but the model only {config.vocab_size} embedding rows: they do not belong together")
    model_type = hf_model_type(config)
    state_dict = {k: v.detach().float().contiguous() for k, v in weights.state_dict.items()}
    if config.tie_embeddings:
        state_dict.pop("lm_head.weight", None)
    meta = {"model": config_to_dict(config), "tokenizer": "byte" if weights.tokenizer == "byte" else
            "tokenizer.json" if tokenizer is not None else None, "eod_token": weights.eod_token}
    if model_type is None:
        hf, tensors = {"model_type": FORMAT_KEY}, state_dict
        log.info("no transformers class computes this model (%s, d_mlp %d): writing mambatrain's own layout",
                 config.pattern, config.d_mlp)
    else:
        eod_id = tokenizer.eod_id if tokenizer is not None else None
        hf, tensors = _hf_config(config, model_type, eod_id), to_layout(state_dict, config, LAYOUTS[model_type])
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**hf, FORMAT_KEY: meta}, indent=2) + "\n")
    if tokenizer is not None and weights.tokenizer != "byte":
        source = Path(weights.tokenizer)
        for name in TOKENIZER_FILES:
            if (source.parent / name).is_file() and (source.parent / name).resolve() != (out / name).resolve():
                shutil.copyfile(source.parent / name, out / name)
    return out

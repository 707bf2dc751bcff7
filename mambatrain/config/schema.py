"""The recipe schema: one small dataclass per concern.

Every field carries a docstring (jsonargparse shows them in ``--help``), and
``__post_init__`` rejects bad values with a message that names the recipe key.
Derived values (the hybrid layer pattern, Mamba's dt rank) are resolved here so
that ``--print-config`` shows exactly what will be built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional


class RecipeError(ValueError):
    """A recipe value that cannot work; the message names the key and the fix."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise RecipeError(f"{key}: {message}")


MAMBA, ATTENTION = "M", "A"


def pattern_from_ratio(n_layers: int, attention_ratio: float) -> str:
    """Place ``round(ratio * n_layers)`` attention layers evenly through the stack.

    The stack is cut into as many equal segments as there are attention layers,
    and the layer at the middle of each segment (index ``floor((k + 0.5) * n / a)``)
    is attention; the rest are Mamba. 10 layers at 0.3 give ``MAMMMAMMAM``.
    The rule keeps layer 0 a Mamba layer whenever there are at least two
    Mamba layers per attention layer, so position information comes from the
    recurrence before the first attention layer.
    """
    n_attention = round(attention_ratio * n_layers)
    slots = {math.floor((k + 0.5) * n_layers / n_attention) for k in range(n_attention)}
    return "".join(ATTENTION if i in slots else MAMBA for i in range(n_layers))


@dataclass
class MambaConfig:
    """Settings of every Mamba (M) block."""

    version: Literal[1, 2] = 2
    """1: Mamba-1, per-channel diagonal decay A (channels x d_state). 2: Mamba-2, one scalar decay per head."""
    d_state: int = 64
    """State size N per channel (Mamba-1) or per head (Mamba-2; at most 256 unless backend is reference)."""
    d_conv: int = 4
    """Width of the short causal depthwise convolution."""
    expand: int = 2
    """Inner width = expand * d_model."""
    head_dim: int = 64
    """Mamba-2 only: channels per head; expand * d_model must be divisible by it."""
    n_groups: int = 1
    """Mamba-2 only: groups of heads sharing B and C (like kv heads in GQA)."""
    chunk_size: int = 64
    """Mamba-2 only: chunk length of the SSD scan (64, 128 or 256); it changes only the order of sums. On an H100
    a 130M model trained at 195k / 220k / 173k tokens/s at 8k / 16k / 1M tokens with 64, 213k at 16k with 128,
    and 171k / 191k / 154k with 256 (fp32 chunk states then); 64 holds the most chunk states (1M in 45.3 GiB)
    (benchmarks/ssd_bf16_states_h100.json, ssd_chunk_states_h100.json)."""
    dt_rank: Optional[int] = None
    """Mamba-1 only: rank of the dt projection; null means ceil(d_model / 16)."""
    dt_min: float = 0.001
    """Smallest initial step size dt (sampled log-uniformly in [dt_min, dt_max])."""
    dt_max: float = 0.1
    """Largest initial step size dt."""
    dt_init_floor: float = 1e-4
    """Initial dt values are clamped to at least this."""
    a_init_min: float = 1.0
    """Mamba-2 only: the per-head decay rate -A starts uniform in [a_init_min, a_init_max]."""
    a_init_max: float = 16.0
    """Mamba-2 only: see a_init_min."""
    conv_bias: bool = True
    """Bias in the depthwise convolution."""
    backend: Literal["auto", "triton", "reference"] = "auto"
    """Scan (and Mamba-2 gated norm) implementation: triton kernels on CUDA tensors, the PyTorch reference
    otherwise (auto), or forced."""

    def validate(self, d_model: int, prefix: str = "model.mamba") -> None:
        for key in ("d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size"):
            _require(getattr(self, key) > 0, f"{prefix}.{key}", f"must be positive, got {getattr(self, key)}")
        # YAML's true equals 1 to Python, so the Literal check would take it for Mamba-1.
        _require(not isinstance(self.version, bool), f"{prefix}.version", f"must be 1 or 2, got {self.version}")
        _require(0 < self.dt_min <= self.dt_max, f"{prefix}.dt_min",
                 f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        _require(0 < self.a_init_min <= self.a_init_max, f"{prefix}.a_init_min",
                 f"need 0 < a_init_min <= a_init_max, got {self.a_init_min} and {self.a_init_max}")
        if self.version == 2:
            d_inner = self.expand * d_model
            _require(d_inner % self.head_dim == 0, f"{prefix}.head_dim",
                     f"expand * d_model = {d_inner} is not divisible by head_dim {self.head_dim}; "
                     f"pick a head_dim that divides {d_inner}")
            n_heads = d_inner // self.head_dim
            _require(n_heads % self.n_groups == 0, f"{prefix}.n_groups",
                     f"the {n_heads} heads are not divisible into {self.n_groups} groups")
            _require(64 <= self.chunk_size <= 256 and self.chunk_size & (self.chunk_size - 1) == 0,
                     f"{prefix}.chunk_size", f"must be 64, 128 or 256, got {self.chunk_size}")
            # The kernel keeps a head's whole state in registers (kernels/ssd/triton.py); auto takes it on a GPU.
            _require(self.d_state <= 256 or self.backend == "reference", f"{prefix}.d_state",
                     f"the Mamba-2 Triton kernel holds at most 256 state values per head, got {self.d_state}; "
                     f"use d_state <= 256 (or backend: reference, plain PyTorch and much slower)")
        if self.dt_rank is None:
            self.dt_rank = math.ceil(d_model / 16)
        _require(self.dt_rank > 0, f"{prefix}.dt_rank", f"must be positive, got {self.dt_rank}")


@dataclass
class AttentionConfig:
    """Settings of every attention (A) block: causal, RoPE, grouped-query."""

    n_heads: int = 8
    """Query heads; d_model must be divisible by it."""
    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; null means n_heads (plain multi-head)."""
    rope_base: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    sliding_window: Optional[int] = None
    """Attend only to the last this-many tokens; null means the whole causal prefix."""

    def validate(self, d_model: int, prefix: str = "model.attention") -> None:
        _require(self.n_heads > 0, f"{prefix}.n_heads", f"must be positive, got {self.n_heads}")
        _require(d_model % self.n_heads == 0, f"{prefix}.n_heads",
                 f"d_model {d_model} is not divisible by n_heads {self.n_heads}; "
                 f"pick n_heads among the divisors of {d_model}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _require(self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0, f"{prefix}.n_kv_heads",
                 f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        _require((d_model // self.n_heads) % 2 == 0, f"{prefix}.n_heads",
                 f"head size d_model / n_heads = {d_model // self.n_heads} must be even for RoPE")
        _require(self.rope_base > 0, f"{prefix}.rope_base", f"must be positive, got {self.rope_base}")
        _require(self.sliding_window is None or self.sliding_window > 0, f"{prefix}.sliding_window",
                 f"must be positive or null, got {self.sliding_window}")


@dataclass
class ModelConfig:
    """The language model: embedding -> blocks -> final RMSNorm -> LM head."""

    kind: Literal["mamba", "transformer", "hybrid"] = "hybrid"
    """mamba: every block is Mamba. transformer: every block is attention. hybrid: set pattern or attention_ratio."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of blocks (mixer + optional MLP each)."""
    vocab_size: int = 256
    """Rows of the embedding; token ids must be below it."""
    pattern: Optional[str] = None
    """Hybrid only: one letter per layer, M for Mamba and A for attention, e.g. MMMAMMMAMM."""
    attention_ratio: Optional[float] = None
    """Hybrid only: fraction of attention layers, placed evenly (see --print-config for the resolved pattern)."""
    d_mlp: int = 0
    """Hidden width of the SwiGLU MLP after each mixer; 0 for no MLP (pure Mamba stacks usually have none)."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    init_std: float = 0.02
    """Standard deviation of the initial linear and embedding weights."""
    mamba: MambaConfig = field(default_factory=MambaConfig)
    """Mamba block settings (used by M layers)."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention block settings (used by A layers)."""

    def __post_init__(self) -> None:
        for key in ("d_model", "n_layers", "vocab_size"):
            _require(getattr(self, key) > 0, f"model.{key}", f"must be positive, got {getattr(self, key)}")
        _require(self.d_mlp >= 0, "model.d_mlp", f"must be 0 (no MLP) or positive, got {self.d_mlp}")
        for key in ("norm_eps", "init_std"):
            _require(getattr(self, key) > 0, f"model.{key}", f"must be positive, got {getattr(self, key)}")
        self._resolve_pattern()
        if MAMBA in self.pattern:
            self.mamba.validate(self.d_model)
        if ATTENTION in self.pattern:
            self.attention.validate(self.d_model)

    def _resolve_pattern(self) -> None:
        if self.kind != "hybrid":
            _require(self.attention_ratio is None, "model.attention_ratio",
                     f"only used with kind: hybrid (kind is {self.kind})")
            letter = MAMBA if self.kind == "mamba" else ATTENTION
            _require(self.pattern in (None, letter * self.n_layers), "model.pattern",
                     f"kind: {self.kind} means every layer is {letter}; use kind: hybrid for a mixed pattern")
            self.pattern = letter * self.n_layers
            return
        if self.pattern is not None and self.attention_ratio is not None:
            resolved = pattern_from_ratio(self.n_layers, self.attention_ratio)
            _require(resolved == self.pattern, "model.attention_ratio",
                     "give either pattern or attention_ratio for a hybrid, not both")
        if self.pattern is None:
            _require(self.attention_ratio is not None, "model.pattern",
                     "kind: hybrid needs a pattern (e.g. MMAM) or an attention_ratio (e.g. 0.3)")
            _require(0 < self.attention_ratio < 1, "model.attention_ratio",
                     f"must be between 0 and 1 (exclusive), got {self.attention_ratio}")
            n_attention = round(self.attention_ratio * self.n_layers)
            _require(0 < n_attention < self.n_layers, "model.attention_ratio",
                     f"{self.attention_ratio} of {self.n_layers} layers rounds to {n_attention} attention "
                     f"layers; a hybrid needs at least one of each kind")
            self.pattern = pattern_from_ratio(self.n_layers, self.attention_ratio)
            self.attention_ratio = None
        _require(set(self.pattern) <= {MAMBA, ATTENTION}, "model.pattern",
                 f"use only the letters M (Mamba) and A (attention), got {self.pattern!r}")
        _require(len(self.pattern) == self.n_layers, "model.pattern",
                 f"has {len(self.pattern)} letters but model.n_layers is {self.n_layers}")


DATA_SOURCES = ("mqar", "passkey", "selective_copy", "markov", "text", "prepared")
SyntheticSource = Literal["mqar", "passkey", "selective_copy", "markov"]
DataSource = Literal["mqar", "passkey", "selective_copy", "markov", "text", "prepared"]
BYTE_TOKENIZER_VOCAB = 257  # 256 byte values + end-of-document


@dataclass
class MQARConfig:
    """Multi-query associative recall (Zoology): key-value pairs, then queries of the keys."""

    num_kv_pairs: int = 8
    """Key-value pairs at the start of each sequence; each is queried once later on."""
    train_samples_seed: int = 0
    """Seed of the training stream (sample i is a pure function of the seed and i)."""
    val_samples: int = 256
    """Size of the fixed validation set, drawn from a different seed."""


@dataclass
class PasskeyConfig:
    """Passkey retrieval: a random number hidden in noise at a chosen depth, asked for at the end."""

    digits: int = 5
    """Digits of the passkey; the model is scored on predicting them after the query marker."""
    depth: Optional[float] = None
    """Where the passkey sits in the noise, 0 (start) to 1 (just before the query); null draws it per sample."""
    train_samples_seed: int = 0
    """Seed of the training stream (sample i is a pure function of the seed and i)."""
    val_samples: int = 256
    """Size of the fixed validation set, drawn from a different seed."""


@dataclass
class MarkovConfig:
    """Walks on one fixed random graph: every token has a few successors; the model learns the graph."""

    branches: int = 4
    """Successors per token, drawn uniformly at each step: a model that has learnt the graph reaches ln(branches)."""
    graph_seed: int = 0
    """Seed of the graph (the same for training and validation)."""
    train_samples_seed: int = 0
    """Seed of the training walks (sample i is a pure function of the seed and i)."""
    val_samples: int = 256
    """Size of the fixed validation set, drawn from a different seed."""


@dataclass
class SelectiveCopyConfig:
    """Selective copying (Mamba paper): tokens scattered among blanks, to be repeated in order after a marker."""

    num_tokens: int = 16
    """Tokens to remember and copy per sequence."""
    train_samples_seed: int = 0
    """Seed of the training stream (sample i is a pure function of the seed and i)."""
    val_samples: int = 256
    """Size of the fixed validation set, drawn from a different seed."""


@dataclass
class TextSourceConfig:
    """One text source: local files or a Hugging Face hub dataset, read in streaming mode."""

    path: str = ""
    """A local file (.jsonl/.json, .parquet, .txt, .arrow, optionally .gz), a folder, a glob, or a hub dataset name."""
    weight: float = 1.0
    """Relative share of documents drawn from this source when several are mixed."""
    text_field: str = "text"
    """Column holding the document text (.txt files: each line is a document in the column text)."""
    split: str = "train"
    """Split to read (hub datasets; local files are all read as one split)."""
    name: Optional[str] = None
    """Hub datasets only: the configuration name (the second argument of load_dataset)."""


@dataclass
class TextConfig:
    """Raw text tokenized on the fly (data.source: text), also the input of `mambatrain data prepare`."""

    sources: list[TextSourceConfig] = field(default_factory=list)
    """Training sources; several are mixed by weight, each cycling through its own epochs."""
    val_sources: list[TextSourceConfig] = field(default_factory=list)
    """Held-out sources for validation; empty means validation reads the training sources (a warning says so)."""
    tokenizer: str = "byte"
    """byte: UTF-8 bytes as ids 0-255 and end-of-document 256 (no training). Or a tokenizer.json file or its folder."""
    eod_token: str = "<|endoftext|>"
    """Name of the end-of-document token in a tokenizer.json (the byte tokenizer always uses id 256)."""
    shuffle_files: bool = True
    """Read each source's files in a new seeded order every epoch (there is no example shuffle buffer)."""
    seed: int = 0
    """Seed of the file order and of the mixture draws."""


@dataclass
class PreparedConfig:
    """Token shards written once by `mambatrain data prepare` and memory-mapped in training."""

    path: str = ""
    """Folder of the prepared shards (index.json, train/, val/)."""
    shard_tokens: int = 1 << 30
    """`data prepare` only: tokens per shard file."""
    shuffle_documents: int = 10000
    """`data prepare` only: documents held in a seeded shuffle buffer while writing; 0 keeps the stream order."""


@dataclass
class DataConfig:
    """Where tokens come from and how they are batched."""

    source: DataSource = "mqar"
    """mqar, passkey, selective_copy, markov: synthetic streams generated on the fly. text: files or a hub dataset,
    tokenized on the fly (data.text). prepared: shards written by `mambatrain data prepare` (data.prepared)."""
    val_source: Optional[DataSource] = None
    """Source of the validation batches; null means the same as source (e.g. train on text, validate on passkey)."""
    seq_len: int = 128
    """Tokens per sequence."""
    batch_size: int = 16
    """Sequences per micro-batch and device."""
    num_workers: int = 0
    """DataLoader worker processes per device; each reads its own disjoint part of a text or prepared stream."""
    reset_at_document_boundaries: bool = True
    """text and prepared: give the model each position's document (batch key seq_idx) so Mamba state, convolution
    and attention do not cross documents, and never label a document's last token with the next document's first."""
    mqar: MQARConfig = field(default_factory=MQARConfig)
    """Settings of the mqar source."""
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    """Settings of the passkey source."""
    selective_copy: SelectiveCopyConfig = field(default_factory=SelectiveCopyConfig)
    """Settings of the selective_copy source."""
    markov: MarkovConfig = field(default_factory=MarkovConfig)
    """Settings of the markov source."""
    text: TextConfig = field(default_factory=TextConfig)
    """Settings of the text source (and the input of `mambatrain data prepare`)."""
    prepared: PreparedConfig = field(default_factory=PreparedConfig)
    """Settings of the prepared source (and the output of `mambatrain data prepare`)."""

    def sources_used(self) -> set[str]:
        return {self.source, self.val_source or self.source}

    def __post_init__(self) -> None:
        for key in ("seq_len", "batch_size"):
            _require(getattr(self, key) > 0, f"data.{key}", f"must be positive, got {getattr(self, key)}")
        _require(self.num_workers >= 0, "data.num_workers", f"must be 0 or more, got {self.num_workers}")
        _require(self.mqar.num_kv_pairs > 0, "data.mqar.num_kv_pairs",
                 f"must be positive, got {self.mqar.num_kv_pairs}")
        for name in ("mqar", "passkey", "selective_copy", "markov"):
            samples = getattr(self, name).val_samples
            _require(samples > 0, f"data.{name}.val_samples", f"must be positive, got {samples}")
        _require(self.passkey.digits > 0, "data.passkey.digits", f"must be positive, got {self.passkey.digits}")
        _require(self.passkey.depth is None or 0 <= self.passkey.depth <= 1, "data.passkey.depth",
                 f"must be between 0 and 1 or null (random), got {self.passkey.depth}")
        _require(self.selective_copy.num_tokens > 0, "data.selective_copy.num_tokens",
                 f"must be positive, got {self.selective_copy.num_tokens}")
        _require(self.markov.branches > 0, "data.markov.branches", f"must be positive, got {self.markov.branches}")
        _require(self.prepared.shard_tokens > 0, "data.prepared.shard_tokens",
                 f"must be positive, got {self.prepared.shard_tokens}")
        _require(self.prepared.shuffle_documents >= 0, "data.prepared.shuffle_documents",
                 f"must be 0 or more, got {self.prepared.shuffle_documents}")
        _require(bool(self.text.tokenizer), "data.text.tokenizer", "must be byte or a path to a tokenizer.json")
        for group in ("sources", "val_sources"):
            for i, source in enumerate(getattr(self.text, group)):
                key = f"data.text.{group}[{i}]"
                _require(bool(source.path), f"{key}.path", "must name a file, folder, glob or hub dataset")
                _require(source.weight > 0, f"{key}.weight", f"must be positive, got {source.weight}")
                _require(bool(source.text_field), f"{key}.text_field", "must name the column holding the text")
        if "text" in self.sources_used():
            _require(bool(self.text.sources), "data.text.sources",
                     "data.source: text needs at least one source, e.g. [{path: data/train.jsonl}]")
        if "prepared" in self.sources_used():
            _require(bool(self.prepared.path), "data.prepared.path",
                     "data.source: prepared needs the folder written by `mambatrain data prepare`")


@dataclass
class OptimizerConfig:
    """AdamW. Norm weights, biases and the SSM's A, D and dt bias get no weight decay."""

    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices and embeddings."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optimizer.lr", f"must be positive, got {self.lr}")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", f"must be 0 or more, got {self.weight_decay}")
        _require(self.eps > 0, "optimizer.eps", f"must be positive, got {self.eps}")
        for key in ("beta1", "beta2"):
            _require(0 <= getattr(self, key) < 1, f"optimizer.{key}", f"must be in [0, 1), got {getattr(self, key)}")


@dataclass
class SchedulerConfig:
    """Learning rate: linear warmup, then cosine decay to min_lr_ratio * lr at trainer.max_steps."""

    kind: Literal["cosine", "constant"] = "cosine"
    """cosine: warmup then cosine decay. constant: warmup then flat."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine only)."""

    def __post_init__(self) -> None:
        _require(self.warmup_steps >= 0, "scheduler.warmup_steps", f"must be 0 or more, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, "scheduler.min_lr_ratio",
                 f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainerConfig:
    """The training loop (Lightning Trainer)."""

    max_steps: int = 1000
    """Optimizer steps to train for."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """auto picks the GPU when there is one."""
    devices: int = 1
    """Devices per node (data-parallel ranks per node when strategy is ddp or fsdp)."""
    num_nodes: int = 1
    """Nodes of the job (set by the SLURM / torchrun launchers in scripts/)."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """auto: one device. ddp: replicate the model on every device. fsdp: shard parameters, gradients and
    optimizer state, one unit per block."""
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    """auto: bf16-mixed on GPU (fp32 weights, bf16 compute), 32-true on CPU."""
    gradient_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step."""
    val_every_n_steps: int = 100
    """Run validation every this many optimizer steps (and at the end)."""
    limit_val_batches: int = 8
    """Validation batches per validation run."""
    log_every_n_steps: int = 10
    """Write metrics every this many steps."""
    checkpoint_every_n_steps: int = 100
    """Save a checkpoint every this many steps (and at the end)."""
    keep_last_checkpoints: int = 3
    """Step checkpoints kept in checkpoints/ (the newest ones; older ones are deleted); last.ckpt is kept besides."""
    max_consecutive_nonfinite: int = 5
    """Optimizer steps in a row whose loss or gradient is NaN/Inf (each one skipped) before the run stops; 1 stops
    at the first."""
    seed: int = 1234
    """Seed of model initialisation and every random number generator."""
    loss_chunk_size: int = 8192
    """Tokens per chunk of the fused output projection + cross-entropy (logits are never built whole)."""
    activation_checkpointing: str = ""
    """Block kinds whose activations are recomputed in the backward pass: "" none, "M" Mamba, "A" attention, "MA" all."""
    sequence_window: Optional[int] = None
    """Tokens per window when a batch is longer: the whole model runs one window at a time inside one activation
    checkpoint, carrying Mamba state and attention keys/values (with their gradients) to the next window. Loss
    and gradients equal one pass over the whole length (exact backprop, not truncated); memory holds one window's
    activations plus the carried state (attention keys/values grow with length); one extra forward. null: one pass.
    Any positive size is exact; a multiple of model.mamba.chunk_size keeps the scan's chunks full (faster)."""
    context_parallel: int = 1
    """Ranks that split each sequence along its length (context parallelism; Mamba state passed from rank to rank,
    attention keys gathered). Groups are consecutive ranks; the devices x num_nodes / context_parallel groups are
    the data-parallel replicas. 1: off."""
    carry_state: bool = False
    """Truncated backpropagation through time: each batch row is its own contiguous token stream (row i of step k+1
    continues row i of step k, packing runs on across steps), and every Mamba layer's SSM and conv state is carried,
    detached, from one micro-batch into the next, so the model sees unbounded context at a fixed step size while
    gradients stop at the step edge. Needs data.source text or prepared and data.num_workers 0 or 1 (one process
    must hold all rows); attention layers see only the current step's tokens. The carried state is saved in
    checkpoints (resume is exact); validation runs from zero state. false: every sequence starts from zero."""
    cuda_graph: bool = False
    """Replay each training step's forward and backward from CUDA graphs captured at the first step, instead of
    issuing thousands of kernel launches from Python: the step then costs the GPU's time only (a 130M Mamba-2
    at 16k tokens on an H100: 1.5x the tokens/s). Batches must keep one shape (packed data does); one GPU
    (strategy auto), not with carry_state or context_parallel. The graphs hold one step's activations for the
    run (about the eager peak); with accumulate_grad_batches > 1 the gradients take 4 more bytes a parameter (the
    graph's gradient buffers are overwritten by each replay, so the running sum lives apart). Ignored on the CPU."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "devices", "num_nodes", "accumulate_grad_batches", "val_every_n_steps",
                    "limit_val_batches", "log_every_n_steps", "checkpoint_every_n_steps", "loss_chunk_size",
                    "keep_last_checkpoints", "max_consecutive_nonfinite"):
            _require(getattr(self, key) > 0, f"trainer.{key}", f"must be positive, got {getattr(self, key)}")
        _require(self.gradient_clip >= 0, "trainer.gradient_clip", f"must be 0 or more, got {self.gradient_clip}")
        _require(self.seed >= 0, "trainer.seed", f"must be 0 or more, got {self.seed}")
        _require(self.strategy != "auto" or self.devices * self.num_nodes == 1, "trainer.strategy",
                 f"{self.devices * self.num_nodes} devices need strategy: ddp or fsdp")
        _require(set(self.activation_checkpointing) <= {"M", "A"}, "trainer.activation_checkpointing",
                 f"use the block letters M and/or A (or \"\" for none), got {self.activation_checkpointing!r}")
        _require(self.sequence_window is None or self.sequence_window > 0, "trainer.sequence_window",
                 f"must be positive or null, got {self.sequence_window}")
        self._check_context_parallel()
        # Lightning refuses FSDPStrategy without CUDA, and torch's FSDP itself needs an accelerator device.
        _require(self.strategy != "fsdp" or self.accelerator != "cpu", "trainer.strategy",
                 "fsdp needs GPUs (torch FSDP does not run on the CPU); use ddp with accelerator: cpu")
        if self.cuda_graph:
            _require(self.devices * self.num_nodes == 1, "trainer.cuda_graph",
                     "needs one GPU for now (DDP/FSDP would have to be captured with the graphs); set it to false "
                     "for multi-GPU runs")
            _require(not self.carry_state and self.context_parallel == 1, "trainer.cuda_graph",
                     "does not work with trainer.carry_state or trainer.context_parallel (state passed between "
                     "steps or ranks outside the graph); set it to false")
        if self.carry_state:
            _require(self.context_parallel == 1, "trainer.carry_state",
                     "does not work with trainer.context_parallel > 1 yet (the carried state would need passing "
                     "from the last rank of a group to the first)")
            _require(self.sequence_window is None, "trainer.carry_state",
                     "does not work with trainer.sequence_window (exact backprop over one long sequence); set one")

    def _check_context_parallel(self) -> None:
        cp, world = self.context_parallel, self.devices * self.num_nodes
        _require(cp > 0, "trainer.context_parallel", f"must be positive, got {cp}")
        if cp == 1:
            return
        _require(world % cp == 0, "trainer.context_parallel",
                 f"{cp} does not divide the {world} ranks (devices x num_nodes); pick a divisor of {world}")
        # Not wired or not tested yet: refuse rather than train wrongly.
        _require(self.strategy == "ddp", "trainer.context_parallel",
                 f"needs strategy: ddp (got {self.strategy}; fsdp with context parallelism is not supported yet)")
        _require(not self.activation_checkpointing, "trainer.context_parallel",
                 "does not work with trainer.activation_checkpointing yet (recomputation would repeat the exchanges)")
        _require(self.sequence_window is None, "trainer.context_parallel",
                 "does not work with trainer.sequence_window yet (set one of them)")


@dataclass
class LoggingConfig:
    """Where the run directory goes and which logger writes metrics."""

    root_dir: str = "runs"
    """Runs go to root_dir/run_name/version_N."""
    run_name: str = "run"
    """Name of the run folder."""
    logger: Literal["csv", "tensorboard", "wandb"] = "csv"
    """csv and tensorboard write locally; wandb runs offline when no API key is configured."""
    wandb_project: str = "mambatrain"
    """Project name for the wandb logger."""

    def __post_init__(self) -> None:
        _require(bool(self.run_name) and "/" not in self.run_name, "logging.run_name",
                 f"must be a non-empty folder name without '/', got {self.run_name!r}")


@dataclass
class FinetuneConfig:
    """Start a new run from trained weights: a fresh optimizer and schedule, any data, length or learning rate."""

    init_from: Optional[str] = None
    """A mambatrain checkpoint (.ckpt) or a model folder (from `mambatrain export`, transformers, state-spaces/mamba)
    whose weights start this run; null trains from scratch. Unlike --resume, nothing but the weights is taken."""
    freeze: list[str] = field(default_factory=list)
    """Parameters kept fixed, as name patterns (fnmatch), e.g. ["embedding*", "blocks.0.*"]; each must match one."""

    def __post_init__(self) -> None:
        if self.init_from is not None:
            _require(Path(self.init_from).expanduser().exists(), "finetune.init_from",
                     f"{self.init_from}: no such checkpoint file or model folder")
        for i, pattern in enumerate(self.freeze):
            _require(bool(pattern), f"finetune.freeze[{i}]", "an empty pattern matches nothing")


@dataclass
class EvalConfig:
    """Long-context evaluation: loss by token position, passkey retrieval by length and depth."""

    every_n_steps: int = 0
    """Also run it during training every this many optimizer steps (results in the run's eval/ folder); 0: never."""
    seq_len: Optional[int] = None
    """Tokens per document for the loss by position; null means data.seq_len."""
    documents: int = 8
    """Documents whose losses are averaged at each position."""
    window: Optional[int] = None
    """Tokens per forward pass, with the Mamba state and attention KV cache carried between passes (bounded
    activation memory on long documents; the result does not change); null: one pass per document."""
    passkey_lengths: list[int] = field(default_factory=lambda: [256, 1024])
    """Prompt lengths (tokens) of the passkey test; an empty list skips it."""
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Where the passkey sits in the filler, 0 (start) to 1 (just before the question)."""
    passkey_samples: int = 4
    """Passkeys drawn per (length, depth) cell."""
    seed: int = 0
    """Seed of the passkeys and of the synthetic documents."""

    def __post_init__(self) -> None:
        _require(self.every_n_steps >= 0, "eval.every_n_steps", f"must be 0 or more, got {self.every_n_steps}")
        for key in ("seq_len", "window"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"eval.{key}", f"must be positive or null, got {value}")
        for key in ("documents", "passkey_samples"):
            _require(getattr(self, key) > 0, f"eval.{key}", f"must be positive, got {getattr(self, key)}")
        _require(all(n > 0 for n in self.passkey_lengths), "eval.passkey_lengths",
                 f"must be positive, got {self.passkey_lengths}")
        _require(bool(self.passkey_depths) and all(0 <= d <= 1 for d in self.passkey_depths), "eval.passkey_depths",
                 f"need at least one depth, each between 0 and 1, got {self.passkey_depths}")


@dataclass
class Recipe:
    """A whole training run."""

    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        data, vocab = self.data, self.model.vocab_size
        cp = self.trainer.context_parallel
        _require(data.seq_len % cp == 0, "trainer.context_parallel",
                 f"data.seq_len {data.seq_len} does not split evenly over {cp} ranks")
        used = data.sources_used()
        if self.trainer.carry_state:
            _require(data.source in ("text", "prepared"), "trainer.carry_state",
                     f"needs a token stream (data.source text or prepared); {data.source} samples are independent")
            _require(data.num_workers <= 1, "trainer.carry_state",
                     f"needs data.num_workers 0 or 1 (consecutive batches from different workers would break each "
                     f"row's stream), got {data.num_workers}")
            _require(self.model.kind != "transformer", "trainer.carry_state",
                     "model.kind: transformer has no Mamba layer whose state could be carried")
        if "mqar" in used:
            needed = 2 * data.mqar.num_kv_pairs + 2 * data.mqar.num_kv_pairs
            _require(data.seq_len >= needed, "data.seq_len",
                     f"mqar with {data.mqar.num_kv_pairs} pairs needs seq_len >= {needed}, got {data.seq_len}")
            needed_vocab = 1 + 2 * data.mqar.num_kv_pairs
            _require(vocab >= needed_vocab, "model.vocab_size",
                     f"mqar with {data.mqar.num_kv_pairs} pairs needs vocab_size >= {needed_vocab}")
        if "passkey" in used:
            needed = 2 * data.passkey.digits + 4
            _require(data.seq_len >= needed, "data.seq_len",
                     f"passkey with {data.passkey.digits} digits needs seq_len >= {needed}, got {data.seq_len}")
            _require(vocab >= 14, "model.vocab_size", "passkey needs vocab_size >= 14 (markers, digits, noise)")
        if "selective_copy" in used:
            needed = 2 * data.selective_copy.num_tokens + 1
            _require(data.seq_len >= needed, "data.seq_len",
                     f"selective_copy of {data.selective_copy.num_tokens} tokens needs seq_len >= {needed}, "
                     f"got {data.seq_len}")
            _require(vocab >= 3, "model.vocab_size", "selective_copy needs vocab_size >= 3 (blank, marker, data)")
        if "markov" in used:
            _require(data.markov.branches < vocab, "data.markov.branches",
                     f"must be below model.vocab_size ({vocab}) for the walk to have a graph to learn (its loss "
                     f"floor is ln(branches)), got {data.markov.branches}")
        if "text" in used and data.text.tokenizer == "byte":
            _require(vocab >= BYTE_TOKENIZER_VOCAB, "model.vocab_size",
                     f"data.text.tokenizer: byte has {BYTE_TOKENIZER_VOCAB} ids (256 bytes + end-of-document), "
                     f"so vocab_size must be at least {BYTE_TOKENIZER_VOCAB}, got {vocab}")

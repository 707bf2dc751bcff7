"""What a recipe costs, from the recipe alone: parameters, FLOPs per token, training memory.

FLOPs are analytic (Lightning's counter cannot see Triton kernels): multiply-adds count 2,
training = forward + backward = 3 x forward; they feed model FLOPs utilisation (MFU).
Nothing here allocates on a GPU: the model is built on the meta device.
"""

from __future__ import annotations

import torch

from .config.schema import ATTENTION, MAMBA, ModelConfig

# Dense bf16 peak FLOP/s by GPU name fragment (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device_name: str) -> float | None:
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if fragment in device_name:
            return flops
    return None


def _mamba_forward_flops(config: ModelConfig) -> float:
    m, d = config.mamba, config.d_model
    d_inner = m.expand * d
    if m.version == 1:
        projections = d * 2 * d_inner + d_inner * (m.dt_rank + 2 * m.d_state) + m.dt_rank * d_inner + d_inner * d
        scan = 9 * d_inner * m.d_state  # decay, update, readout: a few FLOPs per state element
        return 2 * projections + 2 * d_inner * m.d_conv + scan
    n_heads = d_inner // m.head_dim
    conv_dim = d_inner + 2 * m.n_groups * m.d_state
    projections = d * (d_inner + conv_dim + n_heads) + d_inner * d
    # SSD per token and head: causal intra-chunk C.B^T and its product with x (half a chunk on average),
    # chunk-state accumulation and the state readout.
    q = m.chunk_size
    ssd = n_heads * (q * (m.d_state + m.head_dim) + 4 * m.head_dim * m.d_state)
    return 2 * projections + 2 * conv_dim * m.d_conv + ssd


def _attention_forward_flops(config: ModelConfig, seq_len: int) -> float:
    a, d = config.attention, config.d_model
    head_dim = d // a.n_heads
    projections = d * (a.n_heads + 2 * a.n_kv_heads) * head_dim + a.n_heads * head_dim * d
    context = seq_len if a.sliding_window is None else min(seq_len, a.sliding_window)
    # Causal QK^T and PV: each token attends to (on average) half the context.
    return 2 * projections + 2 * 2 * a.n_heads * head_dim * (context / 2)


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    total = 0.0
    for letter in config.pattern:
        total += _mamba_forward_flops(config) if letter == MAMBA else 0.0
        total += _attention_forward_flops(config, seq_len) if letter == ATTENTION else 0.0
        total += 2 * 3 * config.d_model * config.d_mlp
    return total + 2 * config.d_model * config.vocab_size


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    return 3 * forward_flops_per_token(config, seq_len)


# ------------------------------------------------------------------------------------------------ memory
# Bytes each block keeps per token for its backward pass under bf16 autocast (fp32 residual stream and norms,
# bf16 matmul outputs), counted tensor by tensor from what autograd saves (one storage counted once: a view
# saved by an op keeps its whole base alive). The Mamba-2 and attention counts were checked on CPU against
# ``torch.autograd.graph.saved_tensors_hooks`` (the SSD op through the Triton interpreter), and the resulting
# peaks against the H100/H200 measurements in benchmarks/ (tests/test_plan_calibration.py). Mamba-1 is not
# yet measured.

BF16, FP32 = 2, 4


def _norm_bytes(d: int, fused: bool) -> int:
    # The fp32 input and the (token,) fp32 inverse RMS; the PyTorch path also keeps the normalised copy.
    return (1 if fused else 2) * FP32 * d + FP32


def _mamba_activation_bytes(config: ModelConfig, fused: bool, bf16_ssd_states: bool) -> float:
    m, d = config.mamba, config.d_model
    di = m.expand * d
    if m.version == 1:
        # in_proj's input and output (x, z); the PyTorch conv path's padded input and conv output (the fused
        # kernel keeps neither); x_proj's output, dt, the scan's fp32 segment states and the other bf16
        # activations of the mixer. A count, not yet held against a GPU measurement.
        conv = 0 if fused else 2 * BF16 * di
        return (BF16 * d + BF16 * 2 * di + conv + BF16 * (m.dt_rank + 2 * m.d_state) + BF16 * di
                + FP32 * di * m.d_state / 512 + 2 * BF16 * di + BF16 * di)
    heads, gn = di // m.head_dim, m.n_groups * m.d_state
    conv = di + 2 * gn
    # in_proj: its bf16 input, and its whole bf16 output (z, xBC, dt): dt, a view of it, is saved by the scan.
    projections = BF16 * d + BF16 * (di + conv + heads)
    # The SiLU output (x, B, C of the scan are views of it); the PyTorch path also keeps the zero-padded conv
    # input (conv1d saves it) and the conv output (SiLU saves it). The fused kernel reads in_proj's output.
    conv_and_silu = (1 if fused else 3) * BF16 * conv
    # The SSD op's own outputs, saved for its backward (kernels/ssd/triton.py): chunk states
    # (B, H, n_chunks, P, N), bf16 from the kernels since 2026-11-27 (fp32 before, and on the PyTorch path),
    # S = C B^T (B, G, n_chunks, L, L) bf16 (a full L x L square per chunk), softplus(dt) and the in-chunk
    # cumsum of dt A, (B, H, T) fp32 each. (ypre only with z inside, never here.)
    state_bytes = BF16 if bf16_ssd_states else FP32
    scan = (state_bytes * heads * m.head_dim * m.d_state / m.chunk_size + BF16 * m.n_groups * m.chunk_size
            + 2 * FP32 * heads)
    # GatedRMSNorm: the fused kernel keeps y (bf16; z is a view of in_proj's output) and the per-group inverse
    # RMS; the PyTorch path computes in fp32 and keeps y and z upcast, silu(z), the gated product and its
    # normalised copy (5 x di).
    gated_norm = (BF16 if fused else 5 * FP32) * di + FP32 * m.n_groups
    return projections + conv_and_silu + scan + gated_norm + BF16 * di  # + out_proj's bf16 input


def _attention_activation_bytes(config: ModelConfig) -> float:
    a = config.attention
    head_dim = config.d_model // a.n_heads
    q, kv = a.n_heads * head_dim, a.n_kv_heads * head_dim
    # qkv's bf16 input and its whole bf16 output (v, a view of it, goes to SDPA as is); the fp32 rotary
    # tables (T, head_dim / 2) x 2; rotated q and k in bf16 (the fp32 rotation itself is not saved: its other
    # factor, cos/sin, needs no gradient); the attention output (out_proj's input: a view of it) and the fp32
    # log-sum-exp per head that flash attention keeps.
    return (BF16 * config.d_model + BF16 * (q + 2 * kv) + 2 * FP32 * head_dim / 2 + BF16 * (q + kv)
            + BF16 * q + FP32 * a.n_heads)


def _mlp_activation_bytes(config: ModelConfig) -> float:
    # gate_up's bf16 input and output (SiLU saves the gate, a view of it), silu(gate), and the product (down's input)
    return 0 if config.d_mlp == 0 else BF16 * config.d_model + 2 * BF16 * config.d_mlp + 2 * BF16 * config.d_mlp


def block_activation_bytes(config: ModelConfig, letter: str, fused: bool = True,
                           bf16_ssd_states: bool | None = None) -> float:
    """Per-token bytes one block saves for backward (no recomputation); the flags as in ``training_memory``."""
    bf16_states = fused if bf16_ssd_states is None else bf16_ssd_states
    mixer = (_mamba_activation_bytes(config, fused, bf16_states) if letter == MAMBA
             else _attention_activation_bytes(config))
    norms = _norm_bytes(config.d_model, fused) * (2 if config.d_mlp else 1)
    return mixer + _mlp_activation_bytes(config) + norms


def _carried_bytes(config: ModelConfig, tokens: int, batch_size: int, window: int, checkpoint_kinds: str) -> float:
    """Bytes that windows (``models.windowed``) hold beyond one window's activations, at the worst window.

    Mamba: every window's carried state (conv tail + fp32 SSM state) is an input of the next window's
    checkpoint, so all of them stay until the backward reaches that window: n_windows x state.
    Attention: every earlier window's rotated keys and values stay; in backward, their gradients accumulate
    beside them; and each attention layer of the window being rebuilt saves its concatenation of all keys and
    values so far (one layer at a time when attention blocks are checkpointed: ``checkpoint_kinds`` has A). At
    window j (j windows before it) that is j.W (keys + values + grads) + (j + 1).W (concatenation) tokens'
    worth, largest at j = n - 2 (the last window, j = n - 1, holds no gradients of earlier keys yet at its
    peak), or n - 1.
    """
    n_windows = -(-tokens // (window * batch_size)) if window else 1
    kept, attention = 0.0, None
    for letter in config.pattern:
        if letter == MAMBA:
            m = config.mamba
            di = m.expand * config.d_model
            conv = di if m.version == 1 else di + 2 * m.n_groups * m.d_state
            kept += n_windows * batch_size * (BF16 * (m.d_conv - 1) * conv + FP32 * di * m.d_state)
        else:
            attention = config.attention
    if attention is not None and n_windows > 1:
        a, layers = attention, config.pattern.count(ATTENTION)
        head_dim = config.d_model // a.n_heads
        stored = grads = 2 * BF16 * a.n_kv_heads * head_dim  # keys and values
        concat = 2 * BF16 * a.n_heads * head_dim  # keys and values (GQA widens them to n_heads first)
        W = window * batch_size
        reach = tokens if a.sliding_window is None else min(tokens, (a.sliding_window + window) * batch_size)

        concat_layers = 1 if ATTENTION in checkpoint_kinds else layers

        def at(j: int) -> float:
            past = j * W
            held_grads = grads if j < n_windows - 1 else 0
            return layers * past * (stored + held_grads) + concat_layers * min(past + W, reach) * concat
        kept += max(at(n_windows - 1), at(n_windows - 2))
    return kept


def params_head(config: ModelConfig) -> int:
    """Entries of the output head (vocab x d_model), tied to the embedding or not."""
    return config.vocab_size * config.d_model


def training_memory(config: ModelConfig, seq_len: int, batch_size: int, checkpoint_kinds: str = "",
                    loss_chunk_size: int = 8192, shards: int = 1,
                    sequence_window: int | None = None, fused_kernels: bool = True,
                    fused_loss: bool = True, bf16_ssd_states: bool | None = None,
                    accumulate_grad_batches: int = 1) -> dict[str, float]:
    """Predicted peak bytes on one device for a training step: weights, gradients, AdamW, activations.

    ``fused_kernels``: the GPU path, with the Triton causal conv1d + SiLU and RMSNorm kernels (the default);
    False counts the PyTorch conv1d and fp32 norms (the CPU path, and GPU runs before those kernels existed).
    ``fused_loss``: the GPU's fused linear + cross-entropy (kernels/cross_entropy, the default); False counts
    the checkpointed PyTorch loss (the CPU path, and GPU runs before the kernel existed).
    ``bf16_ssd_states``: the SSD kernels keep their per-chunk states in bf16 (bf16 inputs); None follows
    ``fused_kernels``; False counts fp32 (the PyTorch path, and GPU runs before 2026-11-27's change).

    With ``sequence_window`` shorter than ``seq_len`` the activations are one window's (``models.windowed``),
    plus what windows carry: small for Mamba, every position's keys and values for attention.

    trainer.cuda_graph adds nothing: the capture's peak was measured 0.8-1.6 bytes a parameter above the eager one
    (130M Mamba-2 at 4k and 16k tokens, H200, benchmarks/scaling_h100_graphs.json). ``accumulate_grad_batches``
    > 1: the gradients of the earlier micro-batches exist at every later one's peak.
    """
    with torch.device("meta"):
        from .models.lm import LanguageModel
        params = sum(p.numel() for p in LanguageModel(config).parameters())
    windowed = sequence_window is not None and seq_len > sequence_window
    tokens = seq_len * batch_size
    active = (sequence_window if windowed else seq_len) * batch_size  # tokens whose activations are held at once
    # fp32 weights + fp32 gradients + two fp32 AdamW moments. In one pass the gradients do not exist yet at the
    # peak (the start of backward), but autocast's bf16 weight copies and the tied head's gradient do: 16 bytes
    # overstates that moment by less than 2 bytes a parameter. Windows accumulate gradients: 16 is exact there.
    # With checkpointed blocks in one pass the peak comes later, at the backward's first recomputation, with only
    # the last blocks' gradients made: measured 12-13 bytes a parameter there (~370M models, H100, with CUDA graphs
    # whose warm-up still held 4 bytes a parameter of gradients), so the gradients are not counted.
    checkpointed = any(letter in checkpoint_kinds for letter in config.pattern)
    gradients_at_peak = windowed or not checkpointed or accumulate_grad_batches > 1
    states = (16 if gradients_at_peak else 12) * params / shards
    # The final norm's saved tensors and its output, which the loss's checkpoint keeps.
    kept, recompute = _norm_bytes(config.d_model, fused_kernels) + FP32 * config.d_model, 0.0
    for letter in config.pattern:
        full = block_activation_bytes(config, letter, fused_kernels, bf16_ssd_states)
        if letter in checkpoint_kinds:
            kept += FP32 * config.d_model  # only the block's input stays; its insides are rebuilt in backward
            recompute = max(recompute, full)
        else:
            kept += full
    carried = _carried_bytes(config, tokens, batch_size, sequence_window, checkpoint_kinds) if windowed else 0.0
    chunk = min(loss_chunk_size, active)
    if fused_loss:
        # The fused loss's forward (kernels/cross_entropy) also computes its gradients: one chunk of bf16 logits
        # (overwritten by their gradient), the head cast to bf16, its fp32 gradient, and the gradient of every
        # active token's hidden state (bf16), the last two held until the backward.
        logits = BF16 * (chunk * config.vocab_size + active * config.d_model) + (FP32 + BF16) * params_head(config)
    else:
        # One loss chunk's backward (models/loss.py's PyTorch path): the fp32 log-softmax rebuilt by the
        # checkpoint, the gradient that arrives for it and the gradient it passes on, all (chunk, vocab) fp32.
        logits = 3 * FP32 * chunk * config.vocab_size
    # Either way the peak of a step is here, at the end of forward / start of backward, with every block's
    # activations held.
    return {"parameters": params, "mode": "windowed" if windowed else "one pass",
            "weights_grads_optimizer": states, "activations": kept * active,
            "recomputed_block": recompute * active, "carried_state": carried,
            "loss_chunk": logits, "peak": states + (kept + recompute) * active + carried + logits}


def describe_plan(recipe, gpu_memory_gib: float) -> tuple[str, bool]:
    """A readable plan of the recipe's training step, and whether it fits ``gpu_memory_gib``."""
    from .models.lm import LanguageModel
    model_config, data, trainer = recipe.model, recipe.data, recipe.trainer
    with torch.device("meta"):
        counts = LanguageModel(model_config).parameter_counts()
    shards = trainer.devices * trainer.num_nodes if trainer.strategy == "fsdp" else 1
    memory = training_memory(model_config, data.seq_len, data.batch_size, trainer.activation_checkpointing,
                             trainer.loss_chunk_size, shards, trainer.sequence_window,
                             accumulate_grad_batches=trainer.accumulate_grad_batches)
    gib = lambda b: f"{b / 2**30:8.2f} GiB"
    lines = [f"model {model_config.kind}, pattern {model_config.pattern}, "
             f"length {data.seq_len:,} x batch {data.batch_size} per device"]
    lines += [f"  {name:<24}{count:>16,}" for name, count in counts.items()]
    flops = training_flops_per_token(model_config, data.seq_len)
    lines.append(f"  training FLOPs per token  {flops:>15.4g}  ({flops * data.seq_len * data.batch_size:.3g} per step)")
    lines.append("predicted peak memory per device (estimate, bf16 compute):")
    if memory["mode"] == "windowed":
        lines.append(f"  mode: windowed, {trainer.sequence_window:,} tokens per window (exact; one extra forward)")
    else:
        lines.append("  mode: one pass over the whole length" + ("" if trainer.sequence_window is None else
                     f" (shorter than trainer.sequence_window {trainer.sequence_window:,})"))
    lines.append(f"  weights + grads + AdamW   {gib(memory['weights_grads_optimizer'])}"
                 + (f"  (sharded over {shards})" if shards > 1 else ""))
    lines.append(f"  saved activations         {gib(memory['activations'])}"
                 f"  (recomputed: {trainer.activation_checkpointing or 'none'})")
    lines.append(f"  block being recomputed    {gib(memory['recomputed_block'])}")
    if memory["mode"] == "windowed":
        lines.append(f"  carried between windows   {gib(memory['carried_state'])}  "
                     "(Mamba states; attention keys/values, their grads)")
    lines.append(f"  one loss chunk            {gib(memory['loss_chunk'])}")
    lines.append(f"  peak                      {gib(memory['peak'])}")
    fits = memory["peak"] <= gpu_memory_gib * 2**30
    verdict = "fits" if fits else "does NOT fit"
    lines.append(f"{verdict} a {gpu_memory_gib:g} GiB GPU" + ("" if fits else
                 "; try trainer.sequence_window, trainer.activation_checkpointing: MA, a smaller data.batch_size "
                 "or trainer.strategy: fsdp"))
    return "\n".join(lines), fits

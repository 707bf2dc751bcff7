"""Training step time, throughput, MFU and peak memory of ~130M (or ~370M) models from 4k to 1M tokens on one GPU.

    python scripts/bench_scaling.py                                  # the sweep: 3 models x 4k..1M (H100: <~9 min)
    python scripts/bench_scaling.py --loss-steps mamba2=20,hybrid=3  # loss per step at 1,048,576 tokens
    python scripts/bench_scaling.py --models mamba2 --cuda-graph     # loss fwd+bwd replayed from CUDA graphs
    python scripts/bench_scaling.py --plot-only benchmarks/scaling-*.json   # PNG plots (CPU, needs matplotlib)
    python scripts/bench_scaling.py --device cpu --tiny              # dry run of everything at toy sizes

Models (--size 130m: d_model 768, vocab 50,280 tied; ``plan`` counts their parameters, printed at the start):
  mamba2       24 Mamba-2 blocks (expand 2, d_state 128, head_dim 64), no MLP: the mamba-130m layout;
  hybrid       24 blocks, model.attention_ratio 0.3 (7 attention, 17 Mamba-2), no MLP;
  transformer  12 blocks of attention (12 heads, RoPE) + SwiGLU MLP 2048: the Transformer++ of the Mamba paper
               at the same size (one attention + MLP block has the parameters of two Mamba blocks);
  mamba1       (only when named) 24 Mamba-1 blocks (expand 2, d_state 16, dt rank 48), no MLP: the original
               mamba-130m.
--size 370m: d_model 1024, 48 Mamba-2 blocks (the mamba-370m layout), 48 hybrid blocks (14 attention),
  24 Transformer blocks (16 heads, SwiGLU MLP 2816).
A step is forward + backward + AdamW, bf16 autocast over fp32 weights (Lightning's "bf16-mixed"), batch 1, our model
and chunked loss. A length runs in one pass, with the fewest block kinds checkpointed that make plan's peak fit (80%
of the GPU, 75% with --cuda-graph), else with ``trainer.sequence_window`` (``models.windowed``: exact, one extra
forward), checkpointing inside each window the fewest block kinds that fit, in the longest windows that fit. Each
configuration: 1 warm-up step, then timed steps (CUDA events, median); a model stops at the first length that runs
out of memory or whose step exceeds --max-step-s. MFU counts model FLOPs (``plan.training_flops_per_token``, without
the recomputation). The JSON (--out, default $OUT or benchmarks/) is rewritten after every configuration, so a
killed run keeps what it measured; it holds the GPU, commit, date, versions, and plan's predicted peak beside the
measured one.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from mambatrain.config.schema import AttentionConfig, MambaConfig, ModelConfig
from mambatrain.data.mqar import mqar_sample
from mambatrain.data.synthetic import markov_sample, markov_successors
from mambatrain.models.graphed import GraphedLoss
from mambatrain.models.lm import LanguageModel
from mambatrain.models.loss import IGNORE_INDEX
from mambatrain.models.windowed import windowed_loss
from mambatrain.plan import peak_flops, training_flops_per_token, training_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings, also when tests load this file by path
from provenance import commit  # noqa: E402

LENGTHS = [4096, 8192, 16384, 65536, 131072, 262144, 1048576]
TINY_LENGTHS = [256, 512, 2048]
MODELS = ["mamba2", "hybrid", "transformer"]  # the default sweep
CHOICES = MODELS + ["mamba1"]
LOSS_CHUNK = 8192


# (d_model, Mamba layers, attention heads, Transformer MLP width): the layouts of mamba-130m / mamba-370m, and the
# Transformer++ of the Mamba paper at each size (half the layers, SwiGLU of about 8/3 d_model).
SIZES = {"130m": (768, 24, 12, 2048), "370m": (1024, 48, 16, 2816)}


def model_config(name: str, tiny: bool, ssm_chunk: int | None = None, size: str = "130m") -> ModelConfig:
    d_model, layers, heads, d_mlp = SIZES[size]
    vocab = 50280
    if tiny:
        d_model, layers, heads, d_mlp, vocab = 64, 4, 4, 128, 256
    mamba = MambaConfig(version=2, expand=2, d_state=16 if tiny else 128, head_dim=16 if tiny else 64,
                        chunk_size=ssm_chunk or (64 if tiny else MambaConfig().chunk_size))
    attention = AttentionConfig(n_heads=heads)
    if name == "mamba2":
        return ModelConfig(kind="mamba", d_model=d_model, n_layers=layers, vocab_size=vocab, mamba=mamba)
    if name == "mamba1":
        return ModelConfig(kind="mamba", d_model=d_model, n_layers=layers, vocab_size=vocab,
                           mamba=MambaConfig(version=1, expand=2, d_state=16))
    if name == "hybrid":
        return ModelConfig(kind="hybrid", d_model=d_model, n_layers=layers, vocab_size=vocab, attention_ratio=0.3,
                           mamba=mamba, attention=attention)
    if name == "transformer":
        return ModelConfig(kind="transformer", d_model=d_model, n_layers=layers // 2, vocab_size=vocab,
                           d_mlp=d_mlp, attention=attention)
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(CHOICES)}")


def ssd_chunk(config: ModelConfig) -> int | None:
    """The Mamba-2 (SSD) scan's chunk size; None for models without one (Transformer, Mamba-1)."""
    return config.mamba.chunk_size if config.kind != "transformer" and config.mamba.version == 2 else None


def parse_length(text: str) -> int:
    """4k -> 4096, 1M -> 1048576, 1000 -> 1000."""
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1].lower(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return {"gpu": gpu, "gpu_memory_bytes": memory, "commit": commit(short=False),
            "date": datetime.datetime.now().isoformat(),
            "torch": torch.__version__, "triton": triton_version, "python": sys.version.split()[0]}


def write_json(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


class Trainer:
    """One model with its AdamW, stepping on (1, T) batches: fp32 weights, bf16 autocast on CUDA.

    ``graphed``: the loss's forward and backward replayed from CUDA graphs (``models.graphed``, what
    ``trainer.cuda_graph`` does in ``mambatrain fit``), captured anew for each length by ``use_graphs``.
    """

    def __init__(self, config: ModelConfig, device: torch.device, lr: float = 1e-3):
        torch.manual_seed(0)
        self.config, self.device = config, device
        self.model = LanguageModel(config).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.1,
                                           fused=device.type == "cuda")
        self.graphed: GraphedLoss | None = None

    def use_graphs(self, window: int | None) -> None:
        """Capture the loss (with this window) at the next step; the previous length's graphs are freed."""
        self.graphed = GraphedLoss(self.model, lambda model, ids, labels, seq_idx: self.loss(ids, labels, window))

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, window: int | None) -> torch.Tensor:
        if window is not None and input_ids.shape[1] > window:
            return windowed_loss(self.model, input_ids, labels, None, window, LOSS_CHUNK)
        return self.model.loss(self.model(input_ids), labels, LOSS_CHUNK)

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor, window: int | None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self.graphed is not None:
                loss = self.graphed(input_ids, labels)
            else:
                loss = self.loss(input_ids, labels, window)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def timed_step(trainer: Trainer, ids, labels, window) -> tuple[float, float, float]:
    """(seconds, loss, host seconds) of one step, timed with CUDA events on a GPU.

    Host seconds: the host's own time to issue the step (until ``step`` returns, before waiting for the GPU).
    Close to the step time means the step is bound by Python and kernel launches, not by the GPU (an upper
    bound: a synchronising op inside the step counts the GPU's time up to it). On a CPU it is the step time.
    """
    step = trainer.step
    if trainer.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        loss = step(ids, labels, window)
        end.record()
        host = time.perf_counter() - t0
        end.synchronize()
        return start.elapsed_time(end) / 1e3, loss.item(), host
    t0 = time.perf_counter()
    loss = step(ids, labels, window).item()
    seconds = time.perf_counter() - t0
    return seconds, loss, seconds


def choose_mode(config: ModelConfig, length: int, window: int, budget: float | None) -> tuple[int | None, str]:
    """(sequence window or None for one pass, block kinds to checkpoint).

    Each checkpointed kind costs one more forward of those blocks, and windows one more forward of every block
    (``models.windowed``). So: one pass with the fewest checkpointed kinds that plan says fit ``budget`` bytes
    (none, Mamba, attention, both); else windows with the fewest kinds checkpointed inside them (none,
    attention, both) and, for those, the longest window that fits, ``window`` times a power of two below the
    length (fewer, longer windows: fewer launches, fuller kernels). Attention checkpointed inside windows holds
    its concatenation of all earlier keys one layer at a time. Lengths up to ``window`` run in one pass; without
    a budget (CPU), longer ones in windows of ``window``, nothing checkpointed.
    """
    if length <= window:
        return None, ""
    if budget is None:
        return window, ""

    def present(kinds: str) -> str:
        return "".join(kind for kind in kinds if kind in config.pattern)

    for kinds in dict.fromkeys(map(present, ("", "M", "A", "MA"))):  # Mamba first: its recomputation is linear
        if training_memory(config, length, 1, kinds, LOSS_CHUNK)["peak"] <= budget:
            return None, kinds
    windows = [window << k for k in range(32) if window << k < length]
    for kinds in dict.fromkeys(map(present, ("", "A", "MA"))):
        fitting = [w for w in windows
                   if training_memory(config, length, 1, kinds, LOSS_CHUNK, sequence_window=w)["peak"] <= budget]
        if fitting:
            return max(fitting), kinds
    return window, present("MA")


def memory_budget(args, results: dict) -> float | None:
    """Bytes plan's peak may take: 80% of the GPU, 75% with CUDA graphs, whose private pools cache apart from the
    rest (the ~370M Mamba-2 at 256k reserved 80.1 GB for a 67.0 GB peak)."""
    memory = results["environment"]["gpu_memory_bytes"]
    return None if memory is None else (0.75 if args.cuda_graph else 0.8) * memory


def sweep(args, device: torch.device, results: dict, out: Path) -> None:
    budget = memory_budget(args, results)
    peak = peak_flops(results["environment"]["gpu"])
    for name in args.models:
        config = model_config(name, args.tiny, args.ssm_chunk, args.size)
        trainer = Trainer(config, device)
        # One short eager step first, so that AdamW's moments exist before any length's peak is measured. With
        # --cuda-graph the peak is the capture's (replays allocate nothing), and the first length's capture would
        # otherwise run before the first optimizer step: 8 bytes a parameter below what later lengths count,
        # and below what training holds once the moments exist.
        short = torch.randint(0, config.vocab_size, (1, 256), device=device)
        trainer.step(short, short, None)
        for length in args.lengths:
            window, kinds = choose_mode(config, length, args.window, budget)
            trainer.model.checkpoint_kinds = set(kinds)
            predicted = training_memory(config, length, 1, kinds, LOSS_CHUNK, sequence_window=window)
            row = {"model": name, "size": args.size, "length": length, "sequence_window": window,
                   "activation_checkpointing": kinds,
                   "ssm_chunk": ssd_chunk(config),
                   "fused_kernels": device.type == "cuda",  # Triton conv1d + SiLU and norms (plan.training_memory)
                   "fused_loss": device.type == "cuda",  # Triton linear + cross-entropy
                   # the SSD kernels' chunk states
                   "ssd_states": None if ssd_chunk(config) is None else "bf16" if device.type == "cuda" else "fp32",
                   "mode": predicted["mode"], "parameters": predicted["parameters"],
                   "predicted_peak_bytes": predicted["peak"]}
            ids = torch.randint(0, config.vocab_size, (1, length), device=device)
            stop = False
            row["cuda_graph"] = args.cuda_graph
            if args.cuda_graph:
                trainer.use_graphs(window)
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                # warm-up: compiles and autotunes the kernels (a minute, once), captures the graphs
                timed_step(trainer, ids, ids, window)
                timings = [timed_step(trainer, ids, ids, window)]
                if timings[0][0] <= args.max_step_s:
                    timings += [timed_step(trainer, ids, ids, window) for _ in range(args.steps - 1)]
                else:
                    row["note"] = f"step {timings[0][0]:.1f} s > --max-step-s: timed once; longer lengths skipped"
                    stop = True
                times = [t[0] for t in timings]
                seconds = statistics.median(times)
                flops = training_flops_per_token(config, length)
                if device.type == "cuda":
                    row["host_issue_s"] = statistics.median(t[2] for t in timings)
                row.update(step_s=seconds, step_times_s=times, tokens_per_s=length / seconds,
                           flops_per_token=flops, mfu=None if peak is None else flops * length / seconds / peak)
                if device.type == "cuda":
                    row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
                    row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)  # the allocator's cache too
                    row["predicted_over_measured"] = predicted["peak"] / row["peak_bytes"]
            except torch.OutOfMemoryError:
                row["note"] = "out of memory"
                stop = True
            except RuntimeError as error:  # a capture that fails: say why, keep what was measured
                if not args.cuda_graph:
                    raise
                row["note"] = f"cuda graph: {str(error).splitlines()[0][:300]}"
                stop = True
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.graphed = None
            del ids
            gc.collect()  # the graphs of this length sit in a reference cycle (module <-> its graphed forward)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results["runs"].append(row)
            write_json(out, results)
            print_row(row)
            if stop:
                break
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profile(args, device: torch.device, results: dict) -> None:
    """Where a training step's time goes (after a warm-up step): the 25 ops with the most CUDA time, the 50
    GPU kernels with the most self time and their total, and the host's 25 costliest ops."""
    results["profiles"] = []
    for name in args.models:
        config = model_config(name, args.tiny, args.ssm_chunk, args.size)
        trainer = Trainer(config, device)
        ids = torch.randint(0, config.vocab_size, (1, args.profile_length), device=device)
        window = None if args.profile_length <= args.window else args.window
        timed_step(trainer, ids, ids, window)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            seconds, _, _ = timed_step(trainer, ids, ids, window)
        table = prof.key_averages()
        key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
        top = sorted(table, key=lambda e: -getattr(e, key))[:25]
        # The host's side: where the step's Python and launches spend their time (self time, so nested ops do
        # not count twice). A step whose host time nears its GPU time is launch-bound.
        host = sorted(table, key=lambda e: -e.self_cpu_time_total)[:25]
        # the GPU kernels alone (the rows above nest: an op's time includes its kernels')
        kernels = [e for e in table if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3
        results["profiles"].append({
            "model": name, "length": args.profile_length, "step_s": seconds, "ssm_chunk": ssd_chunk(config),
            "gpu_kernels_total_ms": round(gpu_ms, 3),
            "gpu_kernels": [{"name": e.key[:160], "ms": round(e.self_device_time_total / 1e3, 3), "calls": e.count}
                            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:50]],
            "host_total_ms": round(sum(e.self_cpu_time_total for e in table) / 1e3, 3),
            "kernels": [{"name": e.key[:160], "ms": round(getattr(e, key) / 1e3, 3), "calls": e.count} for e in top],
            "host": [{"name": e.key[:160], "self_ms": round(e.self_cpu_time_total / 1e3, 3), "calls": e.count}
                     for e in host]})
        print(name, f"step {seconds:.3f} s, host {results['profiles'][-1]['host_total_ms']:.1f} ms, "
              f"GPU kernels {gpu_ms:.1f} ms (profiled)")
        for row in results["profiles"][-1]["gpu_kernels"][:30]:
            print(f"  {row['ms']:9.2f} ms  {row['calls']:5d}  {row['name'][:100]}")
        del trainer, ids
        if device.type == "cuda":
            torch.cuda.empty_cache()


def print_row(row: dict) -> None:
    gib = lambda b: f"{b / 2**30:7.2f}" if b is not None else "      -"
    if "step_s" not in row:
        print(f"{row['model']:<12}{row['length']:>9,}  {row['mode']:<9}  {row.get('note', '')}", flush=True)
        return
    mfu = f"{100 * row['mfu']:5.1f}%" if row["mfu"] is not None else "    -"
    print(f"{row['model']:<12}{row['length']:>9,}  {row['mode']:<9}  {row['step_s']:8.3f} s  "
          f"{row['tokens_per_s']:>10,.0f} tok/s  MFU {mfu}  peak {gib(row.get('peak_bytes'))} GiB  "
          f"predicted {gib(row['predicted_peak_bytes'])} GiB  "
          f"{'host %.3f s  ' % row['host_issue_s'] if 'host_issue_s' in row else ''}{row.get('note', '')}", flush=True)


def loss_curves(args, device: torch.device, results: dict, out: Path) -> None:
    """Train each named model for its step count at --loss-length on --task (markov or MQAR), one new sequence a step."""
    for spec in args.loss_steps.split(","):
        name, _, steps = spec.partition("=")
        config = model_config(name, args.tiny, args.ssm_chunk, args.size)
        trainer = Trainer(config, device, lr=args.lr)
        length = args.loss_length
        budget = memory_budget(args, results)
        window, kinds = choose_mode(config, length, args.window, budget)
        trainer.model.checkpoint_kinds = set(kinds)
        run = {"model": name, "length": length, "sequence_window": window, "activation_checkpointing": kinds,
               "ssm_chunk": ssd_chunk(config),
               "fused_kernels": device.type == "cuda", "fused_loss": device.type == "cuda",
               "lr": args.lr,
               "warmup_steps": args.warmup_steps, "task": args.task, "losses": [], "step_s": []}
        if args.task == "mqar":
            run.update(labels=args.labels, num_kv_pairs=args.kv_pairs)
        results["loss_runs"].append(run)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        successors = markov_successors(0, config.vocab_size, 4)
        for step in range(int(steps or 20)):
            for group in trainer.optimizer.param_groups:  # linear warm-up: AdamW's first steps are the largest
                group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps)
            if args.task == "markov":  # the recipes' data.source: markov (4 successors per token)
                sample = markov_sample(step, 0, length, successors)
            else:
                sample = mqar_sample(step, 0, length, config.vocab_size, args.kv_pairs)
            ids, labels = sample["input_ids"][None].to(device), sample["labels"][None].to(device)
            if args.task == "mqar" and args.labels == "all":  # language modelling: every next token is a label
                labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
            try:
                seconds, loss, _ = timed_step(trainer, ids, labels, window)
            except torch.OutOfMemoryError:
                run["note"] = f"out of memory at step {step}"
                break
            run["losses"].append(loss)
            run["step_s"].append(seconds)
            if device.type == "cuda":
                run["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            write_json(out, results)
            print(f"{name:<12}{length:>9,}  step {step:3d}  loss {loss:.4f}  {seconds:7.2f} s", flush=True)
            if not math.isfinite(loss):
                run["note"] = "non-finite loss"
                break
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()


def plot(path: Path) -> None:
    """memory_vs_length.png, tokens_per_s_vs_length.png (and loss_at_length.png) beside the JSON."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = json.loads(path.read_text())
    title = f"{results['environment']['gpu']}, commit {results['environment']['commit'][:8]}"
    runs = [r for r in results["runs"] if "step_s" in r]
    for key, ylabel, name in [("peak_bytes", "peak memory (GiB)", "memory_vs_length"),
                              ("tokens_per_s", "tokens / s", "tokens_per_s_vs_length")] if runs else []:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for model in dict.fromkeys(r["model"] for r in runs):
            mine = [r for r in runs if r["model"] == model]
            measured = [r for r in mine if r.get(key) is not None]  # CPU dry runs measure no memory
            scale = 2**30 if key == "peak_bytes" else 1
            line, = ax.plot([r["length"] for r in measured], [r[key] / scale for r in measured], "o-", label=model)
            if key == "peak_bytes":
                ax.plot([r["length"] for r in mine], [r["predicted_peak_bytes"] / scale for r in mine], "x--",
                        color=line.get_color(), alpha=0.6, label=f"{model} (plan)")
            for r in results["runs"]:
                if r["model"] == model and r.get("note") == "out of memory":
                    ax.axvline(r["length"], color=line.get_color(), linestyle=":", alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens, batch 1)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path.parent / f"{path.stem}_{name}.png", dpi=120)
        plt.close(fig)
    if results.get("loss_runs"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run in results["loss_runs"]:
            ax.plot(range(len(run["losses"])), run["losses"], "o-", label=f"{run['model']} at {run['length']:,}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (nats)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path.parent / f"{path.stem}_loss.png", dpi=120)
        plt.close(fig)
    print(f"plots written beside {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {', '.join(CHOICES)} (default: {','.join(MODELS)})")
    parser.add_argument("--lengths", default=None, help="comma-separated, e.g. 4k,64k,1M (default: 4k..1M)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--window", type=parse_length, default=None,
                        help="the shortest trainer.sequence_window where one pass would not fit; longer ones (this times a power "
                             "of two) when they fit (default 16k; tiny: 512)")
    parser.add_argument("--max-step-s", type=float, default=60.0, help="stop a model's sweep past this step time")
    parser.add_argument("--loss-steps", default=None, help="e.g. mamba2=20,hybrid=3: loss curves, no sweep")
    parser.add_argument("--loss-length", type=parse_length, default=None, help="default 1M (tiny: 2048)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of the loss curves")
    parser.add_argument("--warmup-steps", type=int, default=5, help="loss curves: linear learning-rate warm-up")
    parser.add_argument("--task", choices=["markov", "mqar"], default="markov",
                        help="loss curves: a fixed random Markov chain (learnable in steps) or MQAR (in-context recall)")
    parser.add_argument("--labels", choices=["all", "queries"], default="all",
                        help="loss curves: next token at every position of the MQAR stream, or the answers only")
    parser.add_argument("--kv-pairs", type=int, default=64, help="MQAR key-value pairs of the loss curves")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="sweep: the loss's forward and backward replayed from CUDA graphs, as trainer.cuda_graph does")
    parser.add_argument("--ssm-chunk", type=int, choices=[64, 128, 256], default=None,
                        help="chunk size of the Mamba-2 scan (default: the recipes' default; 64 with --tiny)")
    parser.add_argument("--size", choices=sorted(SIZES), default="130m",
                        help="parameter budget of the three models (see above)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU dry run")
    parser.add_argument("--out", default=None, help="JSON file or folder (default $OUT, else benchmarks/)")
    parser.add_argument("--profile-length", type=parse_length, default=None,
                        help="instead of the sweep: CUDA time per kernel of one step of each model at this length")
    parser.add_argument("--plot-only", type=Path, default=None, help="plot an earlier JSON and exit")
    args = parser.parse_args(argv)
    if args.plot_only is not None:
        plot(args.plot_only)
        return
    args.models = [m for m in args.models.split(",") if m]
    args.lengths = ([parse_length(x) for x in args.lengths.split(",")] if args.lengths
                    else TINY_LENGTHS if args.tiny else LENGTHS)
    args.window = args.window or (512 if args.tiny else 16384)
    args.loss_length = args.loss_length or (2048 if args.tiny else 1 << 20)
    device = torch.device(args.device)
    if args.cuda_graph and (device.type != "cuda" or args.loss_steps or args.profile_length):
        parser.error("--cuda-graph times the sweep on a CUDA device (not --loss-steps or --profile-length)")
    out = Path(args.out or os.environ.get("OUT") or "benchmarks")
    results = {"environment": environment(device), "runs": [], "loss_runs": [],
               "settings": {"batch": 1, "precision": "bf16 autocast, fp32 weights, AdamW" if device.type == "cuda"
                            else "fp32", "loss_chunk_size": LOSS_CHUNK, "window": args.window,
                            "steps": args.steps, "max_step_s": args.max_step_s, "tiny": args.tiny}}
    if out.suffix != ".json":
        gpu = results["environment"]["gpu"].replace(" ", "_").replace("/", "_")
        kind = "loss" if args.loss_steps else "scaling"
        out = out / f"{kind}-{gpu}-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{results['environment']}\nwriting {out}")
    for name in dict.fromkeys(args.models + [s.partition("=")[0] for s in (args.loss_steps or "").split(",") if s]):
        config = model_config(name, args.tiny, args.ssm_chunk, args.size)
        print(f"{name:<12}{config.pattern}  {training_memory(config, 1, 1)['parameters'] / 1e6:.1f}M parameters")
    if args.loss_steps:
        loss_curves(args, device, results, out)
    elif args.profile_length:
        profile(args, device, results)
    else:
        sweep(args, device, results, out)
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Multi-GPU training benchmark: DDP scaling at 8k tokens, and context parallelism past one GPU's memory.

    python scripts/bench_multi_gpu.py --out $OUT                          # 2 GPUs (NCCL), about 5-7 minutes
    python scripts/bench_multi_gpu.py --device cpu --tiny --out /tmp/b    # dry run: 2 CPU processes (gloo)

Every measurement is a fresh process (this script with --phase), training through the real path: a Recipe built
in Python (no YAML loader, so no jsonargparse) -> RecipeDataModule (mqar, synthetic) + LanguageModelModule +
build_strategy -> Lightning Trainer, bf16-mixed on GPU. Lightning's own launcher starts the second rank.

(a) DDP scaling: the ~130M Mamba-2 (d_model 768, 24 layers, d_state 128) at 8192 tokens, the same micro batch
    per GPU on 1 GPU (no DDP) and on 2 GPUs (DDP); efficiency = tok/s(2) / (2 x tok/s(1)), target >= 0.9.
(b) Context parallelism: one sequence per step. Starting from the shortest power-of-two length that plan.py
    predicts will not fit one GPU, one GPU trains at that length, doubling until it runs out of memory (at most
    --max-tries lengths); then `trainer.context_parallel: 2` trains the length that did not fit, over 2 GPUs.

Step time: from the batch's arrival to the end of the optimizer step (data generation excluded), with the device
synchronised at both ends; medians over the steps after --warmup. Peak memory: torch.cuda.max_memory_allocated
per rank. Writes bench_multi_gpu.json (GPU names, commit, date, versions, NCCL settings) and prints a table.
NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 (NVLink multicast off) are recorded, never changed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mambatrain.config.schema import (DataConfig, MambaConfig, ModelConfig, MQARConfig, Recipe,  # noqa: E402
                                      SchedulerConfig, TrainerConfig)
from mambatrain.plan import peak_flops, training_flops_per_token, training_memory  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings, also when tests load this file by path
from provenance import commit  # noqa: E402

MULTICAST_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")


def model_config(tiny: bool) -> ModelConfig:
    if tiny:
        return ModelConfig(kind="mamba", d_model=32, n_layers=2, vocab_size=64,
                           mamba=MambaConfig(d_state=8, head_dim=8, chunk_size=64))
    # Mamba-2 130M: 24 layers of width 768, 24 heads of 64, state 128, tied GPT-NeoX-sized vocabulary.
    return ModelConfig(kind="mamba", d_model=768, n_layers=24, vocab_size=50288,
                       mamba=MambaConfig(d_state=128, head_dim=64, chunk_size=256))


def make_recipe(args, length: int, batch: int, devices: int, context_parallel: int) -> Recipe:
    steps = args.warmup + args.steps
    return Recipe(
        model=model_config(args.tiny),
        data=DataConfig(source="mqar", seq_len=length, batch_size=batch, mqar=MQARConfig(num_kv_pairs=8)),
        scheduler=SchedulerConfig(warmup_steps=1),
        trainer=TrainerConfig(max_steps=steps, accelerator="cpu" if args.device == "cpu" else "gpu",
                              devices=devices, strategy="ddp" if devices > 1 else "auto",
                              context_parallel=context_parallel,
                              precision="32-true" if args.device == "cpu" else "bf16-mixed"))


# ------------------------------------------------------------------------------------------------ one phase

def run_phase(args) -> None:
    """Trains one configuration; every rank writes <out>/phases/<phase>.rank<r>.json."""
    import lightning as L

    from mambatrain.data.datamodule import RecipeDataModule
    from mambatrain.distributed.strategy import build_strategy
    from mambatrain.lit.module import LanguageModelModule

    class StepTimer(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def _sync(self, module):
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)

        def on_train_start(self, trainer, module):
            if module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(module.device)

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._sync(module)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self._sync(module)
            self.times.append(time.perf_counter() - self.start)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*on_after_batch_transfer.*")  # ours slices context-parallel batches
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    recipe = make_recipe(args, args.length, args.batch, args.devices, args.context_parallel)
    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=recipe.trainer.accelerator, devices=args.devices, strategy=build_strategy(recipe),
        precision=recipe.trainer.precision, max_steps=recipe.trainer.max_steps, gradient_clip_val=1.0,
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    result: dict = {"oom": False}
    try:
        trainer.fit(LanguageModelModule(recipe), datamodule=RecipeDataModule(recipe, check=False))
    except torch.OutOfMemoryError as error:
        result = {"oom": True, "error": str(error).splitlines()[0][:300]}
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda", trainer.local_rank) if cuda else None
    result.update(rank=trainer.global_rank, step_times_s=timer.times,
                  device=torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                  device_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
                  peak_allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                  peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None)
    folder = Path(args.out) / "phases"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{args.phase}.rank{trainer.global_rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(result))
    path.with_suffix(".tmp").replace(path)  # whole or absent: the driver polls these files


# ------------------------------------------------------------------------------------------------ the driver

def phase(args, name: str, length: int, batch: int, devices: int, context_parallel: int = 1) -> dict:
    """Runs one phase in a fresh process group and summarises its ranks' files."""
    folder = Path(args.out) / "phases"
    for old in folder.glob(f"{name}.rank*.json"):
        old.unlink()
    command = [sys.executable, __file__, "--phase", name, "--length", str(length), "--batch", str(batch),
               "--devices", str(devices), "--context-parallel", str(context_parallel), "--out", str(args.out),
               "--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.tiny:
        command.append("--tiny")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    print(f"[{name}] length {length:,} x batch {batch} per replica, {devices} device(s), context_parallel "
          f"{context_parallel} ...", flush=True)
    process = subprocess.Popen(command, env=env, start_new_session=True)
    code, oom_seen = None, None
    while code is None:
        code = process.poll()
        now = time.perf_counter()
        if code is None and oom_seen is None and any(json.loads(p.read_text())["oom"]
                                                     for p in folder.glob(f"{name}.rank*.json")):
            oom_seen = now
        # A rank that ran out of memory leaves its peer waiting on it forever: end the phase 15 s later.
        if code is None and (now - started > args.phase_timeout or (oom_seen and now - oom_seen > 15)):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = "killed after an out-of-memory rank" if oom_seen else "timeout"
        time.sleep(1)
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{name}.rank*.json"))]
    row = {"phase": name, "length": length, "batch_per_replica": batch, "devices": devices,
           "context_parallel": context_parallel, "exit": code, "wall_s": round(time.perf_counter() - started, 1),
           "oom": any(r["oom"] for r in ranks), "fused_kernels": True, "fused_loss": True,  # the GPU path
           "predicted_peak_gib": training_memory(model_config(args.tiny), length // context_parallel,
                                                 batch)["peak"] / 2**30}
    row["failed"] = code != 0 and not row["oom"]  # a crash, not memory: see the phase's output above
    if ranks:
        row["devices_used"] = sorted({r["device"] for r in ranks})
        row["device_memory_gib"] = ranks[0]["device_memory_gib"]
        row["peak_allocated_gib"] = [r["peak_allocated_gib"] for r in ranks]
        row["peak_reserved_gib"] = [r["peak_reserved_gib"] for r in ranks]
        errors = [r["error"] for r in ranks if r.get("error")]
        if errors:
            row["error"] = errors[0]
    times = [r["step_times_s"] for r in ranks if not r["oom"] and len(r["step_times_s"]) > args.warmup]
    if times and len(times) == len(ranks) and not row["oom"]:
        # Ranks step together (all-reduce, state passing): the slowest rank's median is the step time.
        step = max(statistics.median(t[args.warmup:]) for t in times)
        tokens = length * batch * devices // context_parallel  # every token counted once
        row.update(step_s=step, tokens_per_step=tokens, tokens_per_s=tokens / step,
                   tokens_per_s_per_gpu=tokens / step / devices)
        peak = peak_flops(row["devices_used"][0]) if args.device != "cpu" else None
        if peak:
            row["mfu"] = row["tokens_per_s"] * training_flops_per_token(model_config(args.tiny), length) / (
                peak * devices)
    print(f"[{name}] {json.dumps({k: v for k, v in row.items() if k != 'peak_reserved_gib'})}", flush=True)
    return row


def first_length_past_one_gpu(args, memory_gib: float | None) -> int:
    """The shortest power-of-two length (one sequence) that plan.py predicts will not fit one GPU."""
    if args.cp_length:
        return args.cp_length
    if memory_gib is None:  # CPU dry run: nothing runs out of memory
        return 1024
    length = 16384
    while training_memory(model_config(args.tiny), length, 1)["peak"] / 2**30 <= memory_gib:
        length *= 2
    return length


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.version.cuda, "nccl": None}
    for package in ("lightning", "triton", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    if torch.cuda.is_available():
        found["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return found


def print_table(rows: list[dict]) -> None:
    columns = ["phase", "length", "devices", "context_parallel", "oom", "step_s", "tokens_per_s",
               "tokens_per_s_per_gpu", "mfu", "peak_allocated_gib", "predicted_peak_gib"]
    width = max(16, *(len(row["phase"]) for row in rows))
    print("\n" + " | ".join(f"{c[:16]:>16}" if c != "phase" else f"{c:>{width}}" for c in columns))
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            if isinstance(value, list):
                value = "/".join(f"{v:.1f}" for v in value if v is not None) or "-"
            elif isinstance(value, float):
                value = f"{value:.3g}" if value < 1000 else f"{value:,.0f}"
            cells.append(f"{'-' if value is None else value!s:>{width if c == 'phase' else 16}}")
        print(" | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and lengths (CPU dry run)")
    parser.add_argument("--ddp-length", type=int, default=8192)
    parser.add_argument("--ddp-batch", type=int, default=4, help="micro batch per GPU in the DDP comparison")
    parser.add_argument("--cp-length", type=int, default=0, help="context-parallel length; 0: from plan.py")
    parser.add_argument("--max-tries", type=int, default=3, help="one-GPU lengths tried before giving up on an OOM")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--phase-timeout", type=int, default=240, help="seconds before a phase is killed")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ddp", "cp"])
    # Used by the driver for its phase processes:
    parser.add_argument("--phase")
    parser.add_argument("--length", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--devices", type=int)
    parser.add_argument("--context-parallel", type=int, default=1)
    args = parser.parse_args()
    if args.phase:
        return run_phase(args)

    if args.tiny:
        args.ddp_length = min(args.ddp_length, 256)
    for name in MULTICAST_ENV:
        if os.environ.get(name) is None and args.device == "cuda":
            print(f"warning: {name} is not set; NVLink multicast should stay off on the lent machines", flush=True)
    report = {"commit": commit(short=False),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "env": {name: os.environ.get(name) for name in MULTICAST_ENV},
              "host_gpus": torch.cuda.device_count(), "model": "mamba2 tiny" if args.tiny else "mamba2 130M",
              "warmup_steps": args.warmup, "measured_steps": args.steps, "rows": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        (out / "bench_multi_gpu.json").write_text(json.dumps(report, indent=1))

    memory_gib = None
    if "ddp" not in args.skip:
        one = phase(args, "ddp_1gpu", args.ddp_length, args.ddp_batch, 1)
        two = phase(args, "ddp_2gpu", args.ddp_length, args.ddp_batch, 2)
        report["rows"] += [one, two]
        memory_gib = one.get("device_memory_gib")
        report["gpus"] = two.get("devices_used") or one.get("devices_used")
        if one.get("tokens_per_s") and two.get("tokens_per_s"):
            report["ddp_scaling_efficiency"] = two["tokens_per_s"] / (2 * one["tokens_per_s"])
        save()
    if "cp" not in args.skip:
        length = first_length_past_one_gpu(args, memory_gib)
        fitted = None
        for _ in range(1 if args.device == "cpu" else args.max_tries):
            row = phase(args, f"one_gpu_{length}", length, 1, 1)
            report["rows"].append(row)
            save()
            if row["oom"] or row["failed"]:
                break
            fitted, length = length, 2 * length
        report["longest_one_gpu_length_run"] = fitted
        report["one_gpu_oom_length"] = length if report["rows"][-1]["oom"] else None
        if report["rows"][-1]["failed"]:
            print(f"one GPU failed (not out of memory) at length {length:,}; context parallelism runs there anyway")
        cp = phase(args, f"context_parallel_2gpu_{length}", length, 1, 2, context_parallel=2)
        report["rows"].append(cp)
        report["context_parallel"] = {"length": length, "tokens_per_s": cp.get("tokens_per_s"),
                                      "peak_allocated_gib_per_gpu": cp.get("peak_allocated_gib"),
                                      "oom": cp["oom"], "failed": cp["failed"],
                                      "one_gpu_oom_at_this_length": report["one_gpu_oom_length"]}
        save()
    print_table(report["rows"])
    if "ddp_scaling_efficiency" in report:
        print(f"\nDDP scaling efficiency at {args.ddp_length}: {report['ddp_scaling_efficiency']:.3f} (target >= 0.9)")
    print(f"wrote {out / 'bench_multi_gpu.json'}")


if __name__ == "__main__":
    main()

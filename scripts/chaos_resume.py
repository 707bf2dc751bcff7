"""Kill a real training run with SIGKILL five times, resume it with --resume auto each time, and check that it
ends with exactly the weights of an uninterrupted run.

    python scripts/chaos_resume.py --out benchmarks/            # writes benchmarks/chaos_resume.json
    python scripts/chaos_resume.py --seed 3 --keep /tmp/chaos   # other kill moments; keep the run folders

A tiny hybrid (Mamba-2 + attention, d_model 32, 2 layers) trains on MQAR on the CPU for 300 optimizer steps of
2 micro-batches, checkpointing every 10 steps, with validation every 100. The reference run goes uninterrupted.
The chaos run is started with `mambatrain fit --resume auto` and killed:

- 3 times at random moments: once a random step is passed (seen from its checkpoint marker), after a random
  fraction of the time between two checkpoints;
- twice during a checkpoint write: MAMBATRAIN_CHECKPOINT_WRITE_DELAY holds each written file in its temporary
  name for a moment, and the kill lands as soon as a temporary file appears (once for a checkpoint's bytes, once
  for its completion marker); the temporary file is still there after the kill, as proof.

After each kill the run is restarted with --resume auto; the last start trains to the end. Pass: the final
weights equal the reference's bitwise (or within 1e-6). One thread per process (OMP_NUM_THREADS=1): on a shared
CPU a tiny model runs faster so, and the two runs do the same arithmetic in the same order.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mambatrain.checkpoint.folder import candidates, newest_good  # noqa: E402
from mambatrain.checkpoint.io import WRITE_DELAY_ENV, read_marker  # noqa: E402
from provenance import commit  # noqa: E402

STEPS, EVERY = 300, 10
RECIPE = {
    "model": {"kind": "hybrid", "d_model": 32, "n_layers": 2, "vocab_size": 32, "pattern": "MA", "d_mlp": 32,
              "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 64}, "attention": {"n_heads": 4}},
    "data": {"seq_len": 32, "batch_size": 2, "mqar": {"num_kv_pairs": 4, "val_samples": 8}},
    "scheduler": {"warmup_steps": 20},
    "trainer": {"max_steps": STEPS, "accelerator": "cpu", "accumulate_grad_batches": 2,
                "checkpoint_every_n_steps": EVERY, "keep_last_checkpoints": 3, "val_every_n_steps": 100,
                "limit_val_batches": 1, "log_every_n_steps": 10},
}
PLAN = ["random", "write:checkpoint", "random", "write:marker", "random"]


def start(recipe: Path, name: str, log_file: Path, write_delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", WRITE_DELAY_ENV: str(write_delay)}
    with open(log_file, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "mambatrain", "fit", str(recipe), "--resume", "auto",
                                 "--logging.run_name", name], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=recipe.parent)


def newest_marked_step(run_root: Path) -> int:
    steps = [c.step for folder in run_root.glob("version_*/checkpoints") for c in candidates(folder)
             if read_marker(c.path) is not None]
    return max(steps, default=-1)


def temporaries(run_root: Path, kind: str) -> list[Path]:
    found = run_root.glob("version_*/checkpoints/.step*.tmp")
    return [p for p in found if (".done." in p.name) == (kind == "marker")]


def wait(process: subprocess.Popen, condition, timeout: float = 180.0, poll: float = 0.005) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(poll)
    return False


def resumed_from(run_root: Path) -> str | None:
    """The checkpoint the newest start resumed from, as its run directory's environment.json records it."""
    versions = sorted(run_root.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    record = versions[-1] / "environment.json" if versions else None
    if record is None or not record.is_file():
        return None
    resumed = json.loads(record.read_text()).get("resumed_from")
    return f"{Path(resumed).parent.parent.name}/{Path(resumed).name}" if resumed else "fresh start"


def final_weights(run_root: Path) -> dict[str, torch.Tensor]:
    last = newest_good(sorted(run_root.glob("version_*"))[-1] / "checkpoints")
    return torch.load(last, map_location="cpu", weights_only=False)["state_dict"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--out", help="folder to write chaos_resume.json into")
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary folder, removed)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.keep or tempfile.mkdtemp(prefix="chaos_resume-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "logging": {"root_dir": str(work / "runs")}}))
    began = time.time()

    print(f"reference: {STEPS} steps uninterrupted ...", flush=True)
    t0 = time.time()
    reference = start(recipe, "reference", work / "reference.log")
    assert reference.wait(timeout=600) == 0, (work / "reference.log").read_text()[-3000:]
    reference_seconds = time.time() - t0
    # Time between two checkpoints, from the reference run (its start-up is the first ~third of its time).
    interval = reference_seconds * 0.65 / (STEPS / EVERY)

    chaos_root = work / "runs" / "chaos"
    targets = iter(sorted(rng.sample(range(EVERY, STEPS - 3 * EVERY, EVERY), PLAN.count("random"))))
    attempts = []
    for i, kind in enumerate(PLAN):
        before = newest_marked_step(chaos_root)
        process = start(recipe, "chaos", work / f"chaos{i}.log", write_delay=0.3 if kind.startswith("write") else 0)
        attempt = {"attempt": i, "kill": kind}
        if kind == "random":
            target = max(next(targets), before + EVERY)
            fraction = rng.random()
            reached = wait(process, lambda: newest_marked_step(chaos_root) >= target)
            time.sleep(fraction * interval)
            attempt.update(target_step=target, after_fraction_of_interval=round(fraction, 3), reached=reached)
        else:
            what = kind.split(":")[1]
            reached = wait(process, lambda: temporaries(chaos_root, what) and newest_marked_step(chaos_root) > before)
            attempt.update(reached=reached)
        process.send_signal(signal.SIGKILL)
        process.wait()
        attempt["exit_status"] = process.returncode
        attempt["resumed_from"] = resumed_from(chaos_root)
        attempt["newest_complete_checkpoint_at_kill"] = newest_marked_step(chaos_root)
        if kind.startswith("write"):
            left = temporaries(chaos_root, kind.split(":")[1])
            attempt["temporary_file_left_by_the_kill"] = left[0].name if left else None
        attempts.append(attempt)
        print(f"  kill {i + 1}: {kind:<17} newest complete checkpoint: step "
              f"{attempt['newest_complete_checkpoint_at_kill']:>3}"
              f"; this start resumed from {attempt['resumed_from']}"
              + (f"; left {attempt['temporary_file_left_by_the_kill']}" if kind.startswith("write") else ""),
              flush=True)

    print("chaos: final --resume auto to the end ...", flush=True)
    final = start(recipe, "chaos", work / "chaos_final.log")
    final_status = final.wait(timeout=600)
    final_log = (work / "chaos_final.log").read_text()
    assert final_status == 0 and "Traceback" not in final_log, final_log[-3000:]

    a, b = final_weights(work / "runs" / "reference"), final_weights(chaos_root)
    assert a.keys() == b.keys()
    max_diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    bitwise = all(torch.equal(a[k], b[k]) for k in a)
    kills_during_write = sum(bool(x.get("temporary_file_left_by_the_kill")) for x in attempts)
    passed = (bitwise or max_diff <= 1e-6) and len(attempts) == 5 and kills_during_write >= 1
    result = {
        "benchmark": "chaos_resume",
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "lightning": __import__("lightning").__version__},
        "setup": {"steps": STEPS, "micro_batches_per_step": RECIPE["trainer"]["accumulate_grad_batches"],
                  "checkpoint_every_n_steps": EVERY, "kill_signal": "SIGKILL", "seed": args.seed,
                  "write_delay_s_in_write_kills": 0.3, "threads_per_process": 1},
        "attempts": attempts,
        "final_start_resumed_from": resumed_from(chaos_root),
        "final": {"bitwise_equal": bitwise, "max_abs_diff": max_diff, "tensors": len(a)},
        "seconds": {"reference_run": round(reference_seconds, 1), "total": round(time.time() - began, 1)},
        "passed": passed,
    }
    print(f"final weights vs uninterrupted run: bitwise equal {bitwise}, max |diff| {max_diff:.3g} over "
          f"{len(a)} tensors; {kills_during_write} kills during a write; {'PASS' if passed else 'FAIL'} "
          f"({result['seconds']['total']:.0f} s)")
    if args.out:
        out = Path(args.out)
        out = out / "chaos_resume.json" if out.suffix != ".json" else out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""How long the first forward+backward takes on a fresh machine, where every autotuned kernel compiles its whole
config space: Triton's way (config by config, ``MAMBATRAIN_PARALLEL_COMPILE=0``) against ours (a key's configs
compiled concurrently, ``mambatrain_kernels.settings.autotune``, the default).

    python scripts/bench_compile.py --out $OUT

Each (scan, mode) runs in a fresh process with an empty Triton cache folder, so nothing compiled earlier is
reused; the first call's wall time (compiles + autotune timings + the call itself) is the measurement, and a
second call's time shows what the first cost beyond compiling. The outputs and gradients of both modes are
compared with each other: the autotuner may pick other configs in the two processes, so within the kernels'
bf16 tolerance, not bitwise. Writes bench_compile_<gpu>.json.

    python scripts/bench_compile.py --offline --out $OUT

needs no GPU: it compiles the SSD backward's dx and dcb configs for sm_90 (``scripts/sass_report.py``'s offline
compile) one after another and on a pool of threads, each time into an empty cache folder, to see whether Triton's
compiler leaves the GIL free enough for threads to help. Writes bench_compile_offline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SCANS = ("ssd64", "ssd256", "selective")


def child(scan: str, length: int, save: str) -> None:
    """One fresh process: time the first and second forward+backward of ``scan``; save outputs and gradients."""
    import torch
    from bench_scan import ssd_inputs, sel_inputs

    from mambatrain_kernels.selective_scan.triton import selective_scan
    from mambatrain_kernels.ssd.triton import ssd_scan

    if scan.startswith("ssd"):
        x, dt, A, B, C, D, dt_bias = inputs = ssd_inputs(length, requires_grad=True)

        def forward():
            return ssd_scan(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, chunk_size=int(scan[3:]))
    else:
        x, dt, A, B, C, D, z, dt_bias = inputs = sel_inputs(length, requires_grad=True)

        def forward():
            return selective_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    params = [t for t in inputs if t is not None and t.requires_grad]
    grad_out = torch.randn(x.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(x.dtype)
    seconds = []
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        y = forward()
        grads = torch.autograd.grad(y, params, grad_out)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    torch.save([y.float().cpu()] + [g.float().cpu() for g in grads], save)
    print(json.dumps({"first_s": seconds[0], "second_s": seconds[1]}))


def offline(out: Path, workers: int, repeats: int) -> None:
    """Compile SSD backward configs for sm_90 without a GPU, serially and on ``workers`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    import sass_report as sr
    from provenance import commit

    todo = [(launch, cfg) for launch in sr.ssd_launches(64, 1 << 20, dtype=sr.torch.bfloat16,
                                                        switches={"ONE_BLOCK_BWD": True, "ONE_BLOCK_FWD": True})
            if launch["name"] in ("ssd_dx_one_block_bwd_kernel", "ssd_dcb_bwd_kernel")
            for cfg in sr.configs_for(launch)[:3]]

    def compile_one(item):
        launch, cfg = item
        sr.compile_sm90(sr._jit(launch["kernel"]), launch["args"], dict(launch["kwargs"], **cfg.kwargs),
                        cfg.num_warps, cfg.num_stages, cfg.maxnreg)

    timings = {"serial": [], f"threads_{workers}": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for mode in timings:
                os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=tmp)  # read at each compile
                start = time.perf_counter()
                if mode == "serial":
                    for item in todo:
                        compile_one(item)
                else:
                    with ThreadPoolExecutor(workers) as pool:
                        list(pool.map(compile_one, todo))
                timings[mode].append(round(time.perf_counter() - start, 2))
    record = {"machine": f"CPU only, {len(os.sched_getaffinity(0))} cores", "commit": commit(),
              "date": time.strftime("%Y-%m-%d"), "compiles": len(todo),
              "what": "sm_90 compiles of the SSD dx one-block and dcb backward kernels (3 configs each), seconds",
              "seconds": timings}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_compile_offline.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--scans", nargs="*", default=list(SCANS), choices=SCANS)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--offline", action="store_true", help="compile for sm_90 without a GPU (threads vs serial)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=SCANS, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.length, args.save)
    if args.offline:
        return offline(Path(args.out), args.workers, args.repeats)

    import torch
    from provenance import write_record

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scan in args.scans:
            row = {"scan": scan, "length": args.length}
            for mode in ("0", "1"):
                env = dict(os.environ, MAMBATRAIN_PARALLEL_COMPILE=mode, MAMBATRAIN_AUTOTUNE="1",
                           TRITON_CACHE_DIR=tempfile.mkdtemp(dir=tmp))
                save = f"{tmp}/{scan}_{mode}.pt"
                done = subprocess.run([sys.executable, __file__, "--child", scan, "--length", str(args.length),
                                       "--save", save], env=env, capture_output=True, text=True)
                name = "parallel" if mode == "1" else "serial"
                if done.returncode != 0:
                    row[name] = {"error": done.stderr[-2000:]}
                    continue
                row[name] = json.loads(done.stdout.strip().splitlines()[-1])
            if all("first_s" in row.get(m, {}) for m in ("serial", "parallel")):
                serial, parallel = (torch.load(f"{tmp}/{scan}_{m}.pt") for m in ("0", "1"))
                row["max_rel_diff"] = max(rel_err(p, s) for p, s in zip(parallel, serial))
                row["speedup_first_call"] = row["serial"]["first_s"] / row["parallel"]["first_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    path = write_record(Path(args.out), "bench_compile", torch.cuda.get_device_name(), cpus=len(os.sched_getaffinity(0)),
                        what=__doc__.split("\n\n")[0], rows=rows)
    print("wrote", path)


if __name__ == "__main__":
    main()

"""Where the scan kernels spend their time on a GPU: per-kernel CUDA time of one forward+backward, and a sweep
of the launch-shape knobs that set how many programs the sequential parts get.

    python scripts/profile_scan.py --length 1048576 --out $OUT

Writes profile_scan.json: for SSD (24 heads x 64, d_state 128, chunk --ssd-chunk) and the selective scan (1536
channels, d_state 16), bf16, batch 1: the kernels of one forward+backward with their summed CUDA time, and
fwd+bwd wall and GPU-kernel milliseconds for each value of ssd.triton.STATE_PROGRAMS, ONE_BLOCK_BWD, ONE_BLOCK_FWD,
FUSED_OUTPUT, DCB_ROW_SCAN and selective_scan.triton.BWD_PROGRAMS, BWD_ROUND_BYTES (in one process, on the
same inputs; each knob is left at the value with the least GPU time), and the CPU side of one call: the milliseconds it takes to issue, and
the Python functions that take them (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
from collections import defaultdict
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import SSD_SHAPE, fwd_bwd_runner, host_ms, sel_inputs, ssd_inputs, timed  # noqa: E402
from provenance import commit  # noqa: E402

from mambatrain_kernels.selective_scan import triton as sel_triton  # noqa: E402
from mambatrain_kernels.ssd import triton as ssd_triton  # noqa: E402
from mambatrain_kernels.ssd import triton_bwd as ssd_triton_bwd  # noqa: E402
from mambatrain_kernels.ssd import triton_fwd as ssd_triton_fwd  # noqa: E402


def kernel_times(run) -> list[dict]:
    """CUDA time per kernel name over one call of ``run`` (after a warm-up call)."""
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total / 1e3  # ms
    return [{"kernel": k, "ms": round(v, 3)} for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]


def host_side(run, top: int = 30) -> dict:
    """Milliseconds ``run`` takes to issue, and the functions (cProfile, by own time) that take them."""
    run()
    result = {"host_ms": host_ms(run)}
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(10):
        run()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    result["cprofile_10_calls"] = text.getvalue().splitlines()
    return result


def best_configs(*modules) -> dict:
    """The config each autotuned kernel of ``modules`` ran last (its pick for the last shape): what the
    MAMBATRAIN_AUTOTUNE=0 defaults should be."""
    return {name: str(kernel.best_config) for module in modules for name, kernel in vars(module).items()
            if isinstance(kernel, triton.runtime.autotuner.Autotuner) and getattr(kernel, "best_config", None)}


def sweep(module, knob: str, values: list[int], run) -> dict:
    """For each value of ``module.knob``: fwd+bwd wall ms of ``run`` and its kernels' summed GPU ms (at short
    lengths the wall time is the host's: the GPU time still tells the kernels apart). The knob is left at the
    value with the least GPU time."""
    times = {}
    for value in values:
        setattr(module, knob, value)
        wall = timed(run, 800)
        times[value] = {"wall_ms": wall, "gpu_ms": round(sum(k["ms"] for k in kernel_times(run)), 3)}
        print(knob, value, times[value], flush=True)
    setattr(module, knob, min(times, key=lambda v: times[v]["gpu_ms"]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1048576)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks"))
    parser.add_argument("--state-programs", type=int, nargs="*", default=[0, 264, 528],
                        help="ssd.triton.STATE_PROGRAMS values to time (walks at once; 0: two per SM)")
    parser.add_argument("--bwd-programs", type=int, nargs="*", default=[3072, 6144, 12288],
                        help="selective_scan.triton.BWD_PROGRAMS values to time (pass C's programs a round at most)")
    parser.add_argument("--bwd-round-bytes", type=float, nargs="*", default=[2**29, 2**30, 2**31],
                        help="selective_scan.triton.BWD_ROUND_BYTES values to time (pass C's dB, dC partial sums a "
                             "round at most), at the best --bwd-programs")
    parser.add_argument("--one-block-bwd", type=int, nargs="*", default=[0, 1], choices=[0, 1],
                        help="ssd.triton.ONE_BLOCK_BWD values to time (the one-block dx kernel at chunk 64)")
    parser.add_argument("--one-block-fwd", type=int, nargs="*", default=[0, 1], choices=[0, 1],
                        help="ssd.triton.ONE_BLOCK_FWD values to time (the one-block output kernel at chunk 64)")
    parser.add_argument("--fused-output", type=int, nargs="*", default=[0, 1], choices=[0, 1],
                        help="ssd.triton.FUSED_OUTPUT values to time (the state walk writing y at chunk 64)")
    parser.add_argument("--dcb-row-scan", type=int, nargs="*", default=[0, 1], choices=[0, 1],
                        help="ssd.triton.DCB_ROW_SCAN values to time")
    parser.add_argument("--scans", nargs="+", choices=["ssd", "selective"], default=["ssd", "selective"])
    parser.add_argument("--ssd-chunk", type=int, default=SSD_SHAPE["chunk"], choices=[64, 128, 256])
    args = parser.parse_args()
    report = {"gpu": torch.cuda.get_device_name(), "commit": commit(short=False), "length": args.length,
              "ssd_chunk": args.ssd_chunk}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        (out / "profile_scan.json").write_text(json.dumps(report, indent=1))

    if "ssd" in args.scans:
        profile_ssd(args, report)
        save()
        torch.cuda.empty_cache()  # the SSD's inputs went with profile_ssd's frame
    if "selective" in args.scans:
        profile_selective(args, report)
        save()
    print(json.dumps(report, indent=1))


def profile_ssd(args, report: dict) -> None:
    x, dt, A, B, C, D, dt_bias = inputs = ssd_inputs(args.length, requires_grad=True)
    ssd = fwd_bwd_runner(lambda: ssd_triton.ssd_scan(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True,
                                                     chunk_size=args.ssd_chunk), inputs)
    report["ssd_sweep"] = sweep(ssd_triton, "STATE_PROGRAMS", [v or None for v in args.state_programs], ssd)
    report["ssd_one_block_bwd_sweep"] = sweep(ssd_triton, "ONE_BLOCK_BWD", [bool(v) for v in args.one_block_bwd], ssd)
    report["ssd_one_block_fwd_sweep"] = sweep(ssd_triton, "ONE_BLOCK_FWD", [bool(v) for v in args.one_block_fwd], ssd)
    report["ssd_fused_output_sweep"] = sweep(ssd_triton, "FUSED_OUTPUT", [bool(v) for v in args.fused_output], ssd)
    report["ssd_dcb_row_scan_sweep"] = sweep(ssd_triton, "DCB_ROW_SCAN", [bool(v) for v in args.dcb_row_scan], ssd)
    report["ssd_kernels"] = kernel_times(ssd)
    report["ssd_configs"] = best_configs(ssd_triton_fwd, ssd_triton_bwd)
    for eager in (False, True):  # the custom op's dispatch, or the plain autograd.Function (EAGER_FUNCTION)
        ssd_triton.EAGER_FUNCTION = eager
        report["ssd_host_eager_function" if eager else "ssd_host"] = host_side(ssd)
    ssd_triton.EAGER_FUNCTION = False


def profile_selective(args, report: dict) -> None:
    x, dt, A, B, C, D, z, dt_bias = inputs = sel_inputs(args.length, requires_grad=True)
    sel = fwd_bwd_runner(lambda: sel_triton.selective_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                                           dt_softplus=True), inputs)
    report["selective_sweep"] = sweep(sel_triton, "BWD_PROGRAMS", args.bwd_programs, sel)
    report["selective_round_bytes_sweep"] = sweep(sel_triton, "BWD_ROUND_BYTES",
                                                  [int(v) for v in args.bwd_round_bytes], sel)
    report["selective_kernels"] = kernel_times(sel)
    report["selective_host"] = host_side(sel)
    report["selective_configs"] = best_configs(sel_triton)


if __name__ == "__main__":
    main()

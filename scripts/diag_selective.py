"""Where the Mamba-1 backward's time goes: the selective scan at 1M tokens with parts of its work or traffic removed.

    python scripts/diag_selective.py --out $OUT            # every variant below, one process each
    python scripts/diag_selective.py --variants base=DIAG_CAP=128 no_scratch=DIAG_CAP=128,DIAG_NOSCR=1

A copy of ``kernels/`` goes to a temporary folder with switches patched into ``selective_scan/triton.py`` (each
patch must match the source exactly, else this stops), and each variant runs in its own process on that copy,
its switches in the environment (they are read at import):

- DIAG_NOSCR=1: pass C's phase 1 still recomputes every tile's starting state but keeps only the last, in one slot;
  phase 2 reads that slot for every tile: the scratch's HBM traffic (~50 GB at 1M) is gone, its work is not.
- DIAG_NOPART=1: pass C's stores of its dB, dC partial sums all land in one tile's worth of addresses: their HBM
  traffic is gone (at 6ba4180 and before, when programs added several channel blocks into one partial, this also
  removed their read-modify-write).
- DIAG_NOPH1=1: phase 1 recomputes one tile only (use with DIAG_NOSCR).
- DIAG_NOEXP=1: the per-element exp2 of the decays becomes 1 + x (every kernel).
- DIAG_CAP=N: pass C takes one config (BT 4, NI 4, 1 warp) with a register cap of N (0: none);
  DIAG_FWD=BT,BD,NI,warps,cap and DIAG_CARRY=cap pin the forward and pass A the same way.
- DIAG_STEPS=N: CHECKPOINT_STEPS.

Outputs are wrong in every variant but the unpatched one; only the times mean something. Each row: the forward +
backward in ms (median of 3, CUDA events) and the CUDA time of each kernel (torch profiler), on the benchmark's
shape (1536 channels, d_state 16, bf16, batch 1, dt softplus + bias, D, z). Writes diag_selective_<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

VARIANTS = {
    "base": "DIAG_CAP=128",  # the autotuner's pick on an H100
    "no_scratch": "DIAG_CAP=128,DIAG_NOSCR=1",
    "no_partials": "DIAG_CAP=128,DIAG_NOPART=1",
    "no_scratch_no_partials": "DIAG_CAP=128,DIAG_NOSCR=1,DIAG_NOPART=1",
    "no_exp": "DIAG_CAP=128,DIAG_NOEXP=1",
    "no_phase1_no_scratch": "DIAG_CAP=128,DIAG_NOPH1=1,DIAG_NOSCR=1",
    "uncapped": "DIAG_CAP=0",
    "caps_168_80_112": "DIAG_FWD=16,16,8,1,168,DIAG_CARRY=80,DIAG_CAP=112",
    "caps_128_64_96": "DIAG_FWD=16,16,8,1,128,DIAG_CARRY=64,DIAG_CAP=96",
    "caps_168n4_none_80": "DIAG_FWD=16,16,4,1,168,DIAG_CARRY=0,DIAG_CAP=80",
    "fwd_bt32_168": "DIAG_FWD=32,8,4,1,168,DIAG_CARRY=0,DIAG_CAP=128",
    "steps_256": "DIAG_CAP=128,DIAG_STEPS=256",
}

# (what the source says, what the copy says instead)
PATCHES = [
    ('CHECKPOINT_STEPS = 512\n',
     'CHECKPOINT_STEPS = int(os.environ.get("DIAG_STEPS", "512"))\n'
     'DIAG_NOSCR = tl.constexpr(os.environ.get("DIAG_NOSCR", "0") == "1")\n'
     'DIAG_NOPART = tl.constexpr(os.environ.get("DIAG_NOPART", "0") == "1")\n'
     'DIAG_NOPH1 = tl.constexpr(os.environ.get("DIAG_NOPH1", "0") == "1")\n'
     'DIAG_NOEXP = tl.constexpr(os.environ.get("DIAG_NOEXP", "0") == "1")\n'),
    ('    b_a = _exp2(b_dt[None, :, :, None] * b_A2[:, None, :, :], FAST_MATH)  # [NI, BT, BD, NL]\n',
     '    if DIAG_NOEXP:\n        b_a = 1.0 + b_dt[None, :, :, None] * b_A2[:, None, :, :]\n'
     '    else:\n        b_a = _exp2(b_dt[None, :, :, None] * b_A2[:, None, :, :], FAST_MATH)\n'),
    ('        for k in range(0, n_tiles - 1):\n            tl.store(p_scr + k * s_sck + o_scr, b_h)',
     '        for k in range(0, 1 if DIAG_NOPH1 else n_tiles - 1):\n'
     '            if not DIAG_NOSCR:\n                tl.store(p_scr + k * s_sck + o_scr, b_h)'),
    ('        tl.store(p_scr + (n_tiles - 1) * s_sck + o_scr, b_h)',
     '        tl.store(p_scr + (0 if DIAG_NOSCR else n_tiles - 1) * s_sck + o_scr, b_h)'),
    ('            b_h0 = tl.load(p_scr + k * s_sck + o_scr)',
     '            b_h0 = tl.load(p_scr + (0 if DIAG_NOSCR else k) * s_sck + o_scr)'),
    ('            m_part = m_t[None, :, None] & m_n3\n',
     '            m_part = m_t[None, :, None] & m_n3\n'
     '            if DIAG_NOPART:\n'
     '                o_part = (i_grp * NSB + i_sb0) * N + o_tl[None, :, None] * (NSB * N) + o_n3\n'),
    ('_BWD_C_CONFIGS = _BWD_CONFIGS\n',
     '_BWD_C_CONFIGS = _BWD_CONFIGS\n'
     'if os.environ.get("DIAG_FWD"):\n'
     '    _bt, _bd, _ni, _nw, _cap = (int(v) for v in os.environ["DIAG_FWD"].split(","))\n'
     '    _FWD_CONFIGS = [triton.Config({"BT": _bt, "BD": _bd, "NI": _ni}, num_warps=_nw, num_stages=1,'
     ' maxnreg=_cap or None)]\n'
     'if os.environ.get("DIAG_CARRY"):\n'
     '    _BWD_CONFIGS = [triton.Config({"BT": 4, "NI": 8}, num_warps=1, num_stages=1,'
     ' maxnreg=int(os.environ["DIAG_CARRY"]) or None)]\n'
     'if os.environ.get("DIAG_CAP"):\n'
     '    _BWD_C_CONFIGS = [triton.Config({"BT": 4, "NI": 4}, num_warps=1, num_stages=1,'
     ' maxnreg=int(os.environ["DIAG_CAP"]) or None)]\n'),
    ('if AUTOTUNE and not INTERPRET:\n    _BWD_C_CONFIGS',
     'if AUTOTUNE and not INTERPRET and not os.environ.get("DIAG_CAP"):\n    _BWD_C_CONFIGS'),
]


def patched_kernels(root: Path) -> Path:
    """A copy of kernels/ with the switches, importable as mambatrain_kernels from the returned folder."""
    shutil.copytree(REPO / "kernels", root / "mambatrain_kernels")
    path = root / "mambatrain_kernels" / "selective_scan" / "triton.py"
    src = path.read_text()
    for old, new in PATCHES:
        if src.count(old) != 1:
            sys.exit(f"diag_selective: the kernel source changed, this patch no longer applies:\n{old}")
        src = src.replace(old, new)
    path.write_text(src)
    return root


def worker(length: int) -> None:
    import torch
    from bench_scan import fwd_bwd_runner, sel_inputs
    from profile_scan import kernel_times

    from mambatrain_kernels.selective_scan import triton as sel

    inputs = sel_inputs(length, requires_grad=True)
    x, dt, A, B, C, D, z, dt_bias = inputs
    run = fwd_bwd_runner(lambda: sel.selective_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True),
                         inputs)
    start = time.time()
    run()
    torch.cuda.synchronize()
    first_s = time.time() - start
    kernels = kernel_times(run)
    times = []
    for _ in range(3):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    print(json.dumps({"fwdbwd_ms": sorted(times)[1], "first_call_s": round(first_s, 1),
                      "kernels_ms": {k["kernel"][:40]: k["ms"] for k in kernels[:6]},
                      "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks"))
    parser.add_argument("--length", type=int, default=1 << 20)
    parser.add_argument("--variants", nargs="*", default=[f"{k}={v}" for k, v in VARIANTS.items()],
                        help="NAME=KEY=VALUE,KEY=VALUE... (default: every variant above)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.length)

    import torch
    from provenance import write_record
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        shim = patched_kernels(Path(tmp))
        for spec in args.variants:
            name, _, switches = spec.partition("=")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(REPO)]))
            env.update(kv.split("=", 1) for kv in _split(switches))
            done = subprocess.run([sys.executable, __file__, "--worker", "--length", str(args.length)],
                                  env=env, capture_output=True, text=True)
            row = {"switches": switches}
            row.update(json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                       else {"error": done.stderr.strip().splitlines()[-1:]})
            rows[name] = row
            print(name, json.dumps(row), flush=True)
    path = write_record(Path(args.out), "diag_selective", torch.cuda.get_device_name(), length=args.length,
                        rows=rows)
    print("wrote", path)


def _split(switches: str) -> list[str]:
    # "DIAG_FWD=16,16,8,1,168,DIAG_CAP=112": a comma starts a new switch only before KEY=
    parts = []
    for piece in switches.split(","):
        if "=" in piece or not parts:
            parts.append(piece)
        else:
            parts[-1] += "," + piece
    return [p for p in parts if p]


if __name__ == "__main__":
    main()

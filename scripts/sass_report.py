"""What a Triton kernel turns into on sm_90, without a GPU: registers, spills, occupancy, SASS of its hot loop.

    python scripts/sass_report.py                           # selective scan pass C, every config the prune keeps
    python scripts/sass_report.py --kernel fwd carry bwd    # the three selective scan kernels
    python scripts/sass_report.py --kernel bwd --config BT=8,NI=4,num_warps=2 --hist
    python scripts/sass_report.py --json out.json           # the rows as JSON too
    python scripts/sass_report.py --op ssd                  # every SSD kernel, chunks 64 128 256, its autotune space
    python scripts/sass_report.py --op ssd --chunk 64 --kernel dcb dx --config num_warps=8,maxnreg=128 --hist
    python scripts/sass_report.py --op conv1d --hist        # conv1d + SiLU forward and backward, 16k and 1M tokens

For the selective scan it runs the real host launcher (``_fwd`` / ``_bwd``) on meta tensors of the benchmark
shape (batch 1, 1M steps, 1536 channels, 1 group, d_state 16, bf16, dt_softplus, dt_bias, D, z), with the
kernels swapped for recorders: the arguments, strides and constexprs (BD, BN...) are the ones a GPU run
would pass. Each recorded launch is then compiled for sm_90a by Triton itself (the same specialization as a
launch: pointer and integer divisibility, ints equal to 1 as constants) for every config of the kernel's
autotune space that its prune keeps (or the ``--config`` given), and ptxas' report and the SASS are read.

Per config: registers per thread, spill bytes, local-memory instructions, the warps per SM the registers and
shared memory allow, and for the hot loop (the largest innermost loop of the SASS: pass C's phase 2 tile
loop, the forward's tile loop) its instruction count, thread-instructions per element (loop instructions x
32 x num_warps / elements of one tile) and counts of the opcodes that matter (SHFL, BAR, LDG/STG, LDL/STL,
MUFU, FFMA/FMUL/FADD); ``--hist`` prints its full opcode histogram.

For the SSD (``--op ssd``) it runs ``ssd_fwd`` / ``ssd_bwd`` the same way at its benchmark shape (batch 1, 1M
tokens, 24 heads x head_dim 64, 1 group, d_state 128, bf16, dt_softplus, dt_bias, D, no z) for each ``--chunk``,
with the head split an H100 (132 SMs) would get. For tensor-core kernels the row also says whether the dots
became Hopper wgmma (HGMMA) or mma.sync (HMMA), how many per hot-loop iteration and the FLOPs they do, and the
loop's thread-instructions per tensor-core FLOP (an H100 issues ~3e13 thread-instr/s and does ~7e14 bf16
FLOP/s: above ~0.05 the loop is bound by issue, not by its matmuls); ``--hist`` adds every innermost loop's
tensor-core, shared-memory (LDS/LDSM/STS), barrier, MUFU and shuffle counts.

For the causal conv1d + SiLU (``--op conv1d``) it runs ``conv1d_silu_fwd`` / ``conv1d_silu_bwd`` at the shape of
``scripts/bench_conv1d.py`` (batch 1, x a slice of 1792 channels of a 3352-wide bf16 in-projection, weight
(1792, 4) and bias in fp32, no documents unless ``--docs``) for each ``--length`` (16k and 1M by default); the
elements of an iteration are BT x BC (the backward's hot loop is its walk over a chunk, the forward has none:
its whole body counts).

Other kernels: import this file and call ``capture`` around their host launcher, then ``report`` on each
launch (see ``selective_scan_launches``); ``compile_sm90`` and ``analyse`` take any JITFunction and arguments.
Environment: MAMBATRAIN_AUTOTUNE=1 (the full space) and no TRITON_INTERPRET, set here before the import.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("MAMBATRAIN_AUTOTUNE", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NV_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# sm_90: registers per SM and per thread, warps and blocks per SM, shared memory per SM (bytes)
SM90 = dict(regs=65536, max_regs=255, warps=64, blocks=32, smem=233472)


def _import_kernels(op: str = "selective_scan"):
    """This checkout's ``mambatrain_kernels.<op>.triton`` (the editable install may map the package to another)."""
    if "mambatrain_kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mambatrain_kernels", REPO / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "kernels")])
        sys.modules["mambatrain_kernels"] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    assert Path(sys.modules["mambatrain_kernels"].__file__).resolve().parent == REPO / "kernels"
    return importlib.import_module(f"mambatrain_kernels.{op}.triton")


# ------------------------------------------------------------------------------------------------- capture

class _Recorder:
    """Stands in for a kernel (JITFunction or Autotuner): ``k[grid](*args, **kwargs)`` is recorded, not run."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    @property
    def fn(self):  # launchers that bypass the autotuner index kernel.fn
        return self

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(dict(name=self.name, kernel=self.kernel,
                                                                 grid=grid, args=args, kwargs=kwargs))


@contextlib.contextmanager
def capture(module, names):
    """Within the block, launches of ``module.<name>`` for each name are appended to the yielded list."""
    launches, saved = [], {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, _Recorder(n, saved[n], launches))
        yield launches
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


# ------------------------------------------------------------------------------------------------- compile

def compile_sm90(fn, args, kwargs, num_warps=4, num_stages=1, maxnreg=None, arch=90):
    """Compile JITFunction ``fn`` as a launch with these arguments would, for sm_``arch``, without a GPU.

    Tensors may live on the meta device (only dtype and data_ptr alignment matter).
    """
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs, num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _ptxas_resources(ptx: str, arch: str = "sm_90a") -> dict:
    # the flags Triton's make_cubin passes (-lineinfo, --regAllocOptLevel=2), plus -v for the report
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(NV_BIN / "ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                              str(src), "-o", str(Path(d) / "k.o")], capture_output=True, text=True, check=True)
    log = out.stderr + out.stdout
    grab = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else 0  # noqa: E731
    return dict(regs=grab(r"Used (\d+) registers"), spill_st=grab(r"(\d+) bytes spill stores"),
                spill_ld=grab(r"(\d+) bytes spill loads"), stack=grab(r"(\d+) bytes stack frame"))


def _sass(cubin: bytes) -> list[tuple[int, str | None, str]]:
    """(address, label defined here or None, instruction text) for each instruction."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(NV_BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    rows, label = [], None
    for line in text.splitlines():
        if m := re.match(r"^\s*(\.L_x_\d+):", line):
            label = m.group(1)
        elif m := re.match(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line):
            rows.append((int(m.group(1), 16), label, m.group(2)))
            label = None
    return rows


def opcode(instr: str) -> str:
    """Full opcode of a SASS instruction (``LDG.E.128``), predicate dropped."""
    return re.sub(r"^@!?U?P\w+\s+", "", instr).split()[0]


def innermost_loops(rows) -> list[tuple[int, int]]:
    """Index ranges [first, last] of loops (a backward branch to a label) that contain no other loop."""
    at = {lab: i for i, (_, lab, _) in enumerate(rows) if lab}
    loops = []
    for i, (_, _, ins) in enumerate(rows):
        if opcode(ins).startswith("BRA") and (m := re.search(r"`\((\.L_x_\d+)\)", ins)) and at.get(m.group(1), i + 1) <= i:
            loops.append((at[m.group(1)], i))
    # a one-instruction loop is the trap after EXIT (`BRA` to itself), not a loop of the kernel
    loops = [lo for lo in loops if lo[1] > lo[0]]
    return [lo for lo in loops if not any(o != lo and lo[0] <= o[0] and o[1] <= lo[1] for o in loops)]


def occupancy(regs: int, num_warps: int, smem: int) -> int:
    """Warps per SM that registers (allocated per warp in units of 256) and shared memory allow."""
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    blocks = min(SM90["regs"] // (per_warp * num_warps), SM90["blocks"], SM90["warps"] // num_warps)
    if smem:
        blocks = min(blocks, SM90["smem"] // smem)
    return blocks * num_warps


KEY_OPS = ("SHFL", "BAR", "LDG", "STG", "LDL", "STL", "LDS", "STS", "LDSM", "MUFU", "FFMA", "FMUL", "FADD", "FSEL",
           "F2F", "F2FP", "PRMT", "IMAD", "BRA", "HMMA", "HGMMA")
# tensor-core instructions: HMMA (mma.sync, one warp, registers in and out) and HGMMA (Hopper wgmma, a warpgroup
# of 4 warps, B and maybe A read from shared memory by descriptor, asynchronous)
_MMA = re.compile(r"^(HMMA\.(\d+)|HGMMA\.(\d+)x(\d+)x(\d+))")
_HMMA_MNK = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}


def mma_flops(instr: str) -> int:
    """FLOPs one warp's issue of a tensor-core instruction does (0 for anything else).

    HMMA.16816 is m16n8k16 per warp; HGMMA.64xNx16 is m64nNk16 per warpgroup, a quarter of it per warp.
    """
    m = _MMA.match(opcode(instr))
    if not m:
        return 0
    if m.group(2):
        mnk = _HMMA_MNK.get(m.group(2), (0, 0, 0))
        return 2 * mnk[0] * mnk[1] * mnk[2]
    return 2 * int(m.group(3)) * int(m.group(4)) * int(m.group(5)) // 4


def _loop_counts(ops, lo, hi) -> dict:
    c = Counter(op.split(".")[0] for op in ops[lo:hi + 1])
    return {k: c.get(k, 0) for k in ("HMMA", "HGMMA", "LDS", "LDSM", "STS", "BAR", "MUFU", "SHFL", "LDG", "STG")}


def analyse(kernel, num_warps: int, elems_per_iter: int | None, pick_hot=None) -> dict:
    """Registers, spills, occupancy, and the hot loop's opcode counts of a compiled kernel.

    The hot loop is the largest innermost loop, or ``pick_hot(loops)`` of the innermost loops in code order.
    ``tc_flops`` is the tensor-core work one iteration of it does for the whole program (all warps), ``issue``
    its thread-instructions (instructions x 32 x warps, as if no lane were predicated off), so
    ``issue / tc_flops`` compares the rest of the loop with its matmuls.
    """
    res = _ptxas_resources(kernel.asm["ptx"])
    rows = _sass(kernel.asm["cubin"])
    ops = [opcode(ins) for _, _, ins in rows]
    loops = innermost_loops(rows)
    if not loops:
        lo, hi = 0, len(rows) - 1
    else:
        lo, hi = pick_hot(loops) if pick_hot else max(loops, key=lambda r: r[1] - r[0])
    hot = Counter(op.split(".")[0] for op in ops[lo:hi + 1])
    mma = Counter(ops[i] for i in range(lo, hi + 1) if mma_flops(rows[i][2]))
    out = dict(res, smem=kernel.metadata.shared, warps_per_sm=occupancy(res["regs"], num_warps, kernel.metadata.shared),
               sass=len(rows), local_ops=sum(op.startswith(("LDL", "STL")) for op in ops),
               mma_all=dict(Counter(op for op in ops if _MMA.match(op))),
               loop=hi - lo + 1, loop_sizes=sorted((b - a + 1 for a, b in loops), reverse=True),
               hot={k: hot.get(k, 0) for k in KEY_OPS}, hist=dict(hot.most_common()), hot_mma=dict(mma),
               tc_flops=sum(mma_flops(rows[i][2]) for i in range(lo, hi + 1)) * num_warps,
               issue=(hi - lo + 1) * 32 * num_warps,
               loops=[dict(size=b - a + 1, **_loop_counts(ops, a, b)) for a, b in sorted(loops, key=lambda r: r[0] - r[1])],
               loops_in_order=[dict(size=b - a + 1, **_loop_counts(ops, a, b))
                               for a, b in sorted(loops)],
               hot_mem=dict(Counter(op for op in ops[lo:hi + 1] if op.startswith(("LDG", "STG", "LDL", "STL",
                                                                                  "LDS", "STS")))))
    if elems_per_iter:
        out["per_elem"] = out["loop"] * 32 * num_warps / elems_per_iter
    return out


# ------------------------------------------------------------------------------------------------- selective scan

def selective_scan_launches(length=1 << 20, channels=1536, d_state=16):
    """The launches of one forward and one backward at the benchmark shape, recorded from the real launchers."""
    sst = _import_kernels()
    meta = dict(device="meta")
    x, dt, z, dout = (torch.empty(1, length, channels, dtype=torch.bfloat16, **meta) for _ in range(4))
    B, C = (torch.empty(1, length, 1, d_state, dtype=torch.bfloat16, **meta) for _ in range(2))
    A = torch.empty(channels, d_state, **meta)
    D, bias = torch.empty(channels, **meta), torch.empty(channels, **meta)
    names = ["_fwd_kernel", "_bwd_carry_kernel", "_bwd_kernel", "_chain_kernel"]
    with capture(sst, names) as launches:
        _, _, ckpt = sst._fwd(x, dt, A, B, C, D, z, bias, True, None, None)
        sst._bwd(dout, None, x, dt, A, B, C, D, z, bias, True, None, None, ckpt)
    return launches


def _jit(kernel):
    # an Autotuner wraps the JITFunction in .fn; a JITFunction's .fn is the Python function
    return kernel.fn if hasattr(kernel, "configs") else kernel


def configs_for(launch, only=None):
    """The configs the autotuner would try for this launch (after its prune), or ``only``."""
    tuner = launch["kernel"]
    if only is not None:
        return [only]
    if not hasattr(tuner, "configs"):  # a plain @triton.jit kernel: its launch gives num_warps
        kw = launch["kwargs"]
        return [triton.Config({}, num_warps=kw.get("num_warps", 4), num_stages=kw.get("num_stages", 3))]
    named = dict(zip(tuner.fn.arg_names, launch["args"]))
    cfgs = tuner.configs
    prune = getattr(tuner, "early_config_prune", None)
    return prune(cfgs, named, **launch["kwargs"]) if prune else cfgs


def report(launch, cfg) -> dict:
    kw = dict(launch["kwargs"], **cfg.kwargs)
    fn = _jit(launch["kernel"])
    k = compile_sm90(fn, launch["args"], kw, cfg.num_warps, cfg.num_stages, cfg.maxnreg)
    elems = kw["BT"] * kw["BD"] * kw["BN"] if {"BT", "BD", "BN"} <= kw.keys() else None
    return dict(kernel=launch["name"], **{k_: kw[k_] for k_ in ("LOCAL",) if k_ in kw},
                **cfg.kwargs, num_warps=cfg.num_warps, maxnreg=cfg.maxnreg, **analyse(k, cfg.num_warps, elems))


# ------------------------------------------------------------------------------------------------- SSD

SSD_KERNELS = dict(cumsum="ssd_chunk_cumsum_fwd_kernel", bmm="ssd_bmm_fwd_kernel", state_fwd="ssd_state_fwd_kernel",
                   chain="ssd_chain_kernel", output="ssd_output_fwd_kernel",
                   output1="ssd_output_one_block_fwd_kernel", state_output="ssd_state_output_fwd_kernel",
                   state_bwd="ssd_state_bwd_kernel",
                   dcb="ssd_dcb_bwd_kernel", dx="ssd_dx_bwd_kernel", dx1="ssd_dx_one_block_bwd_kernel",
                   ddt="ssd_ddt_bwd_kernel")
H100_SMS = 132


def ssd_launches(chunk: int, length=1 << 20, heads=24, head_dim=64, d_state=128, groups=1, switches=None,
                 dtype=torch.bfloat16):
    """One forward and one backward of ``ssd_scan`` at the benchmark shape (``dtype``, dt_softplus, dt_bias, D, no
    z), recorded from the real launchers; the head split is the one an H100's 132 SMs would get. ``switches``: the
    launchers' kernel switches to set meanwhile, e.g. {"ONE_BLOCK_FWD": False}."""
    sdt = _import_kernels("ssd")
    meta = dict(device="meta")
    x, dout = (torch.empty(1, length, heads, head_dim, dtype=dtype, **meta) for _ in range(2))
    dt = torch.empty(1, length, heads, dtype=dtype, **meta)
    B, C = (torch.empty(1, length, groups, d_state, dtype=dtype, **meta) for _ in range(2))
    A, D, bias = (torch.empty(heads, **meta) for _ in range(3))
    switches = dict(switches or {}, _sm_count=lambda device: H100_SMS)
    saved = {name: getattr(sdt, name) for name in switches}
    for name, value in switches.items():
        setattr(sdt, name, value)
    try:
        with capture(sdt, list(SSD_KERNELS.values())) as launches:
            out, final, ypre, states, dtp, dA_cs, S = sdt.ssd_fwd(x, dt, A, B, C, D, None, bias, True, None, None,
                                                                chunk)
            sdt.ssd_bwd(dout, None, x, dt, A, B, C, D, None, bias, True, None, None, chunk, x, states, dtp, dA_cs, S)
    finally:
        for name, value in saved.items():
            setattr(sdt, name, value)
    return launches


def _ssd_tile(kw: dict) -> int | None:
    # elements of one hot-loop iteration: a [BT, BT] tile of one head (dcb: a (row, column) block pair;
    # dx: a row block of W^T), a [BV, L] x [L, BK] chunk step of the state walks, an [BT, BT] S block of bmm
    if {"BK", "BV"} <= kw.keys() and "BT" not in kw:
        return kw["BV"] * kw["BK"]
    return kw["BT"] * kw["BT"] if "BT" in kw else None


def ssd_report(launch, cfg) -> dict:
    kw = dict(launch["kwargs"], **cfg.kwargs)
    fn = _jit(launch["kernel"])
    k = compile_sm90(fn, launch["args"], kw, cfg.num_warps, cfg.num_stages, cfg.maxnreg)
    keep = ("L", "BT", "BV", "BK", "HPS", "LOCAL")
    return dict(kernel=launch["name"], **{k_: kw[k_] for k_ in keep if k_ in kw}, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, **analyse(k, cfg.num_warps, _ssd_tile(kw)))


def _print_ssd_row(r, hist):
    head = " ".join(f"{k}={r[k]}" for k in ("kernel", "L", "LOCAL", "BT", "BK", "BV", "HPS", "num_warps",
                                             "num_stages", "maxnreg") if r.get(k) is not None)
    h = r["hot"]
    tc = ""
    if r["tc_flops"]:
        tc = (f"; mma {r['hot_mma']} = {r['tc_flops'] / 1e6:.2f} MFLOP/iter, "
              f"{r['issue'] / r['tc_flops']:.2f} thread-instr/FLOP")
    print(f"{head}: regs {r['regs']} spill st/ld {r['spill_st']}/{r['spill_ld']} B, local ops {r['local_ops']}, "
          f"smem {r['smem']}, warps/SM {r['warps_per_sm']}, mma in kernel {r['mma_all']}; hot loop {r['loop']} "
          f"instr ({r.get('per_elem', 0):.1f}/elem){tc}: "
          + " ".join(f"{k} {v}" for k, v in h.items() if v), flush=True)
    if hist:
        print("    loops:", " | ".join(" ".join(f"{k} {v}" for k, v in lo.items() if v) for lo in r["loops"]))
        print("   ", r["hot_mem"])
        print("   ", " ".join(f"{k}:{v}" for k, v in r["hist"].items()))


def _report_each(launches, only, tag, report_fn, print_fn, hist) -> list[dict]:
    """Report every config of each launch, once per ``tag(launch)`` (launches repeat across shapes and passes)."""
    rows, seen = [], set()
    for launch in launches:
        key = tag(launch)
        if key is None or key in seen:
            continue
        seen.add(key)
        for cfg in configs_for(launch, only):
            rows.append(report_fn(launch, cfg))
            print_fn(rows[-1], hist)
    return rows


def ssd_main(a, only) -> list[dict]:
    wanted = {SSD_KERNELS[k] for k in (a.kernel or SSD_KERNELS)}
    launches = (dict(launch, chunk=chunk) for chunk in a.chunk
                for launch in ssd_launches(chunk, a.length, dtype=getattr(torch, a.dtype), switches={
                    "ONE_BLOCK_BWD": SSD_KERNELS["dx1"] in wanted,
                    "ONE_BLOCK_FWD": bool({SSD_KERNELS["output1"], SSD_KERNELS["state_output"]} & wanted),
                    "FUSED_OUTPUT": SSD_KERNELS["state_output"] in wanted}))
    return _report_each(
        launches, only,
        lambda launch: ((launch["chunk"], launch["name"], launch["kwargs"].get("LOCAL"))
                        if launch["name"] in wanted else None),
        ssd_report, _print_ssd_row, a.hist)


# ------------------------------------------------------------------------------------------------- conv1d

CONV1D_KERNELS = dict(fwd="conv1d_silu_fwd_kernel", bwd="conv1d_silu_bwd_kernel", walk="conv1d_silu_bwd_walk_kernel")


def conv1d_launches(length: int, docs: bool = False, prefix: bool = False, channels=1792, proj_width=3352, width=4,
                    walk: bool = False):
    """One forward and one backward at the benchmark shape, recorded from the real launchers (``walk``: the
    launchers' WALK_BWD, the backward walking time row by row)."""
    ct = _import_kernels("conv1d")
    ct.WALK_BWD = walk
    meta = dict(device="meta")
    proj = torch.empty(1, length, proj_width, dtype=torch.bfloat16, **meta)
    x = proj[..., 1536:1536 + channels]  # the xBC slice of the 130M Mamba-2's in-projection
    dout = torch.empty(1, length, channels, dtype=torch.bfloat16, **meta)
    weight, bias = torch.empty(channels, width, **meta), torch.empty(channels, **meta)
    rows = length + (width - 1 if prefix else 0)
    seq_idx = torch.empty(1, rows, dtype=torch.int32, **meta) if docs else None
    pre = torch.empty(1, width - 1, channels, dtype=torch.bfloat16, **meta) if prefix else None
    with capture(ct, list(CONV1D_KERNELS.values())) as launches:
        ct.conv1d_silu_fwd(x, weight, bias, seq_idx, pre)
        ct.conv1d_silu_bwd(dout, x, weight, bias, seq_idx, pre)
    return launches


def conv1d_report(launch, cfg) -> dict:
    kw = dict(launch["kwargs"], **cfg.kwargs)
    fn = _jit(launch["kernel"])
    k = compile_sm90(fn, launch["args"], kw, cfg.num_warps, cfg.num_stages, cfg.maxnreg)
    names = fn.arg_names
    named = dict(zip(names, launch["args"]))
    extra = {k_: named[k_] for k_ in ("CHUNK", "NCH") if k_ in named}
    return dict(kernel=launch["name"], length=launch["length"], **extra, **cfg.kwargs, num_warps=cfg.num_warps,
                maxnreg=cfg.maxnreg, **analyse(k, cfg.num_warps, kw.get("BT", 1) * kw["BC"], _conv1d_walk))


def _conv1d_walk(loops):
    # The backward walks its chunk in steps compiled up to three times: masked steps while the prefix's rows
    # come out (with a prefix), unmasked steps, masked steps at the end of the sequence, in this code order.
    # The unmasked ones run nearly always: the last loop but one. (One loop: the old backward's block loop.)
    return loops[-2] if len(loops) > 1 else loops[0]


def _print_conv1d_row(r, hist):
    head = " ".join(f"{k}={r[k]}" for k in ("kernel", "length", "CHUNK", "NCH", "BT", "BC", "num_warps", "maxnreg")
                    if r.get(k) is not None)
    print(f"{head}: regs {r['regs']} spill st/ld {r['spill_st']}/{r['spill_ld']} B, local ops {r['local_ops']}, "
          f"smem {r['smem']}, warps/SM {r['warps_per_sm']}, sass {r['sass']}; hot loop {r['loop']} instr "
          f"({r.get('per_elem', 0):.1f}/elem; loops in code order {[lo['size'] for lo in r['loops_in_order']]}): "
          + " ".join(f"{k} {v}" for k, v in r["hot"].items() if v), flush=True)
    if hist:
        print("   ", r["hot_mem"])
        print("   ", " ".join(f"{k}:{v}" for k, v in r["hist"].items()))


def conv1d_main(a, only) -> list[dict]:
    wanted = {CONV1D_KERNELS[k] for k in (a.kernel or CONV1D_KERNELS)}
    # the launchers take one backward or the other: record them once per backward wanted
    walks = [walk for walk, name in ((False, "bwd"), (True, "walk")) if CONV1D_KERNELS[name] in wanted] or [False]
    launches = (dict(launch, length=length) for length in a.lengths for walk in walks
                for launch in conv1d_launches(length, a.docs, a.prefix, walk=walk))
    # the kernels do not depend on the length (it is a runtime argument): one report per flag set
    return _report_each(
        launches, only,
        lambda launch: (launch["length"], launch["name"]) if launch["name"] in wanted else None,
        conv1d_report, _print_conv1d_row, a.hist)


def _parse_config(text: str) -> triton.Config:
    kv = dict(item.split("=") for item in text.split(","))
    kv = {k: int(v) for k, v in kv.items()}
    return triton.Config(kv, num_warps=kv.pop("num_warps", 4), num_stages=kv.pop("num_stages", 1),
                         maxnreg=kv.pop("maxnreg", None))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--op", default="selective", choices=["selective", "ssd", "conv1d"])
    p.add_argument("--kernel", nargs="+", help="selective: fwd carry bwd (default bwd); ssd: "
                   + " ".join(SSD_KERNELS) + " (default all); conv1d: fwd bwd walk (default all)")
    p.add_argument("--chunk", type=int, nargs="+", default=[64, 128, 256], help="ssd chunk sizes")
    p.add_argument("--length", type=int, default=1 << 20, help="ssd tokens (batch 1)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="ssd inputs")
    p.add_argument("--lengths", type=int, nargs="+", default=[1 << 14, 1 << 20], help="conv1d tokens (batch 1)")
    p.add_argument("--docs", action="store_true", help="conv1d: with seq_idx (document boundaries)")
    p.add_argument("--prefix", action="store_true", help="conv1d: with a prefix (the windowed trainer's)")
    p.add_argument("--config", help="one config instead of the pruned space, e.g. BT=8,NI=4,num_warps=2")
    p.add_argument("--hist", action="store_true", help="full opcode histogram of each hot loop")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    only = _parse_config(a.config) if a.config else None
    if a.op == "ssd":
        if set(a.kernel or ()) - SSD_KERNELS.keys():
            p.error(f"ssd kernels: {' '.join(SSD_KERNELS)}")
        rows = ssd_main(a, only)
    elif a.op == "conv1d":
        if set(a.kernel or ()) - CONV1D_KERNELS.keys():
            p.error(f"conv1d kernels: {' '.join(CONV1D_KERNELS)}")
        rows = conv1d_main(a, only)
    elif set(a.kernel or ()) - {"fwd", "carry", "bwd"}:
        p.error("selective scan kernels: fwd carry bwd")
    else:
        rows = selective_main(a, only)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


def selective_main(a, only) -> list[dict]:
    names = {"fwd": "_fwd_kernel", "carry": "_bwd_carry_kernel", "bwd": "_bwd_kernel"}
    wanted = {names[k] for k in (a.kernel or ["bwd"])}
    # pass C runs in rounds: one report for its launches
    return _report_each(
        selective_scan_launches(), only,
        lambda launch: ((launch["name"], launch["kwargs"].get("LOCAL"))
                        if launch["name"] in wanted else None),
        report, _print_row, a.hist)


def _print_row(r, hist):
    head = " ".join(f"{k}={r[k]}" for k in ("kernel", "LOCAL", "BT", "BD", "NI", "num_warps", "maxnreg")
                    if r.get(k) is not None)
    h = r["hot"]
    print(f"{head}: regs {r['regs']} spill st/ld {r['spill_st']}/{r['spill_ld']} B, local ops {r['local_ops']}, "
          f"smem {r['smem']}, warps/SM {r['warps_per_sm']}; loop {r['loop']} instr "
          f"({r.get('per_elem', 0):.1f}/elem; loops {r['loop_sizes'][:4]}): "
          + " ".join(f"{k} {v}" for k, v in h.items() if v), flush=True)
    if hist:
        print("   ", r["hot_mem"])
        print("   ", " ".join(f"{k}:{v}" for k, v in r["hist"].items()))


if __name__ == "__main__":
    main()

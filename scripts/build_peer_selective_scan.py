"""Build mamba_ssm's CUDA selective scan (`selective_scan_cuda`, its Mamba-1 kernel) to benchmark ours against it.

    python scripts/build_peer_selective_scan.py --src path/to/mamba_ssm-2.3.2.post1 --build /tmp/peer_build

The source is the `mamba-ssm` sdist from PyPI (unpacked; it holds `csrc/selective_scan`). Its setup.py builds
every input type (fp32, fp16, bf16) with real and complex weights for up to nine GPU architectures, which takes
long; this builds the same kernels for the local GPU's architecture only, and for the two cases the benchmark
calls: fp32 and bf16 inputs with real (fp32) weights. The kernel sources are compiled as shipped with the
package's own nvcc flags; only the dispatch table in its binding (selective_scan.cpp) is cut to those cases, in a
copy under --build, so that the fp16 and complex kernels need not be compiled. Needs nvcc and ninja.

`scripts/bench_scan.py` times the result when MAMBA_SSM_CUDA_BUILD names the --build folder.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

# mamba_ssm 2.3.2's nvcc flags (setup.py), less the architecture list, which TORCH_CUDA_ARCH_LIST sets here
NVCC_FLAGS = [
    "-O3", "-std=c++17",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo",
]
KERNEL_FILES = ["selective_scan_fwd_fp32.cu", "selective_scan_fwd_bf16.cu",
                "selective_scan_bwd_fp32_real.cu", "selective_scan_bwd_bf16_real.cu"]


def cut_dispatch(binding: str) -> str:
    """The binding with its fp16-input and complex-weight branches removed (each must be found exactly once)."""
    cuts = [
        (r"if \(ITYPE == at::ScalarType::Half\) \{.*?\} else if \(ITYPE == at::ScalarType::BFloat16\) \{",
         "if (ITYPE == at::ScalarType::BFloat16) {"),
        (r"\} else if \(WTYPE == at::ScalarType::ComplexFloat\) \{.*?\} else \{", "} else {"),
    ]
    for pattern, replacement in cuts:
        binding, found = re.subn(pattern, replacement, binding, count=1, flags=re.DOTALL)
        if found != 1:
            raise SystemExit(f"selective_scan.cpp no longer has the dispatch branch {pattern!r}: update this script")
    return binding


def build(src: Path, build_dir: Path, verbose: bool = True):
    csrc = src / "csrc" / "selective_scan"
    if not (csrc / "selective_scan.cpp").is_file():
        raise SystemExit(f"{csrc} has no selective_scan.cpp: pass --src the unpacked mamba-ssm sdist")
    build_dir.mkdir(parents=True, exist_ok=True)
    binding = build_dir / "selective_scan_binding.cpp"
    binding.write_text(cut_dispatch((csrc / "selective_scan.cpp").read_text()))
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    return load(name="selective_scan_cuda", sources=[str(binding)] + [str(csrc / f) for f in KERNEL_FILES],
                extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=NVCC_FLAGS, extra_include_paths=[str(csrc)],
                build_directory=str(build_dir), verbose=verbose)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, type=Path, help="unpacked mamba-ssm sdist (holds csrc/)")
    parser.add_argument("--build", required=True, type=Path, help="folder for the build and the extension")
    args = parser.parse_args()
    start = time.perf_counter()
    module = build(args.src, args.build)
    print(f"built {module.__file__} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

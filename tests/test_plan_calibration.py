"""`plan`'s predicted peak memory against the peaks measured on GPUs (benchmarks/*.json): within ±15%.

Rows measured before the fused conv1d + SiLU and norm kernels (no ``fused_kernels`` field), or before the fused
linear + cross-entropy (no ``fused_loss`` field), are predicted for the PyTorch path they ran
(``training_memory(..., fused_kernels=False, fused_loss=False)``); rows without ``ssd_states: bf16`` ran the
SSD kernels with fp32 chunk states.

Each configuration is rebuilt from the JSON fields with the benchmark's own model builder (imported from
scripts/ by path), so a change to plan.py, the benchmark or the model shows up here.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from mambatrain.plan import training_memory

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.15


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCALING = json.loads((ROOT / "benchmarks" / "scaling_h100.json").read_text())
# Later sweeps (CUDA graphs, fused loss, longer windows): every row names its commit and code path.
SWEEPS = json.loads((ROOT / "benchmarks" / "scaling_h100_graphs.json").read_text())["runs"]
MULTI_GPU = json.loads((ROOT / "benchmarks" / "bench_multi_gpu_2xh200.json").read_text())
LOSS_CHUNK = SCALING["settings"]["loss_chunk_size"]
MEASURED = [r for r in SCALING["runs"] if "peak_bytes" in r]


def _leaked(row: dict) -> bool:
    """Windowed sweep rows with Mamba layers ran at commit 7ae1467, whose carried conv tail kept its whole window
    alive (fixed in d749dc6; see the JSON's notes): their peaks are not those of the code plan describes. The
    1M row comes from a loss run after the fix (it has a note saying so). The Transformer has no Mamba layer."""
    return row["mode"] == "windowed" and row["model"] != "transformer" and "note" not in row


def _config(row: dict):
    """The row's model as bench_scaling built it; rows from before the chunk (size) was recorded ran at 256 (130m)."""
    return _script("bench_scaling").model_config(row["model"], tiny=False, ssm_chunk=row.get("ssm_chunk") or 256,
                                                 size=row.get("size", "130m"))


def _scaling_prediction(row: dict) -> float:
    config = _config(row)
    return training_memory(config, row["length"], 1, row.get("activation_checkpointing", ""), LOSS_CHUNK,
                           sequence_window=row["sequence_window"],
                           fused_kernels=row.get("fused_kernels", False), fused_loss=row.get("fused_loss", False),
                           bf16_ssd_states=row.get("ssd_states") == "bf16")["peak"]


@pytest.mark.parametrize("row", MEASURED, ids=lambda r: f"{r['model']}-{r['length']}-{r['mode'].replace(' ', '_')}")
def test_scaling_sweep_peak_within_15_percent(row):
    if _leaked(row):
        pytest.skip("measured with the conv-tail leak (commit 7ae1467): see test_leaked_rows_match_once_the_leak_is_added")
    if row["mode"] == "windowed" and row["model"] == "transformer":
        pytest.skip("measured while carried values were views of the whole qkv output (commit 7ae1467, fixed in "
                    "8c06ce7): rerun the sweep")
    assert abs(_scaling_prediction(row) / row["peak_bytes"] - 1) <= TOLERANCE


def _without_moments(row: dict) -> float:
    """A first_capture row's peak is its graph capture's, taken before any optimizer step (bench_scaling before
    4ebd04b): AdamW's two fp32 moments did not exist yet."""
    return 8 * row["parameters"] if row.get("first_capture") else 0.0


def _held_warmup_gradients(row: dict) -> float:
    """A warmup_gradients_held row's capture ran while torch's make_graphed_callables still referenced its warm-up
    pass's gradients (before 9267945): 4 bytes a parameter more wherever gradients exist at the peak, i.e. unless
    checkpointed blocks in one pass put the peak before them (plan.training_memory)."""
    checkpointed = any(kind in _config(row).pattern for kind in row["activation_checkpointing"])
    gradients_at_peak = row["mode"] == "windowed" or not checkpointed
    return 4 * row["parameters"] if row.get("warmup_gradients_held") and gradients_at_peak else 0.0


@pytest.mark.parametrize("row", [r for r in SWEEPS if "peak_bytes" in r],
                         ids=lambda r: f"{r['commit']}-{r['model']}-{r['length']}-{'graph' if r['cuda_graph'] else 'eager'}")
def test_later_sweeps_peak_within_15_percent(row):
    predicted = _scaling_prediction(row) - _without_moments(row) + _held_warmup_gradients(row)
    assert abs(predicted / row["peak_bytes"] - 1) <= TOLERANCE


def test_leaked_rows_match_once_the_leak_is_added():
    """The leak, modelled explicitly: every window but the last kept its conv input alive (bf16, conv channels,
    one window's tokens) in each Mamba layer until the backward reached it. With it the rows fit too."""
    for row in filter(_leaked, MEASURED):
        config = _config(row)
        m = config.mamba
        conv = m.expand * config.d_model + 2 * m.n_groups * m.d_state
        windows = -(-row["length"] // row["sequence_window"])
        leak = (windows - 1) * row["sequence_window"] * config.pattern.count("M") * 2 * conv
        assert abs((_scaling_prediction(row) + leak) / row["peak_bytes"] - 1) <= TOLERANCE, row


MAMBA1 = json.loads((ROOT / "benchmarks" / "scaling_mamba1_h100.json").read_text())["runs"]


@pytest.mark.parametrize("row", MAMBA1, ids=lambda r: f"mamba1-{r['length']}-{r['mode'].replace(' ', '_')}")
def test_mamba1_peak_within_15_percent(row):
    """The 130M Mamba-1 model (its selective-scan kernels' checkpoints and transient backward buffers), one pass
    and in windows at 1M."""
    assert abs(_scaling_prediction(row) / row["peak_bytes"] - 1) <= TOLERANCE


LOSS_RUNS = [run for path in sorted((ROOT / "benchmarks").glob("loss_1m_*.json"))
             for run in json.loads(path.read_text())["loss_runs"] if "peak_bytes" in run]


@pytest.mark.parametrize("run", LOSS_RUNS, ids=lambda r: f"{r['model']}-{r['length']}")
def test_loss_runs_at_1m_peak_within_15_percent(run):
    """The 1M-token loss runs (windowed; the hybrid's with whatever checkpointing fitted its GPU)."""
    assert abs(_scaling_prediction(run) / run["peak_bytes"] - 1) <= TOLERANCE


@pytest.mark.parametrize("row", MULTI_GPU["rows"], ids=lambda r: r["phase"])
def test_lightning_runs_peak_within_15_percent(row):
    """The 130M Mamba-2 through the Lightning trainer (bf16-mixed): DDP, one GPU, context parallelism (each rank
    holds length / context_parallel tokens); predicted as scripts/bench_multi_gpu.py does."""
    config = _script("bench_multi_gpu").model_config(tiny=False)
    predicted = training_memory(config, row["length"] // row["context_parallel"], row["batch_per_replica"],
                                fused_kernels=row.get("fused_kernels", False),
                                fused_loss=row.get("fused_loss", False),
                                bf16_ssd_states=row.get("ssd_states") == "bf16")["peak"]
    if row["oom"]:  # ran out of memory: plan must say it does not fit
        assert predicted > row["device_memory_gib"] * 2**30
        return
    measured = max(row["peak_allocated_gib"]) * 2**30
    assert abs(predicted / measured - 1) <= TOLERANCE

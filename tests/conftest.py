import importlib.util
import os
import sys
from pathlib import Path

import torch

# Triton reads TRITON_INTERPRET when it is first imported, and any test may import it first:
# without a GPU the kernels run in the interpreter, so set it before anything else loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny test models gain nothing from a second thread, and on a 2-core machine it mostly waits for a core
# (about 10x slower); subprocesses (CLI tests) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# datasets and huggingface_hub read these when imported: tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402


def _triton_interpreter_too_old() -> str | None:
    """Why the kernel tests cannot run in this environment's Triton interpreter, or None. They need triton 3.7's
    (checked 2026-11-27): 3.2 and 3.3 cannot even import ``@triton.autotune`` kernels without a GPU driver, 3.4's
    and 3.6's interpreters fail on them ("only 0-dimensional arrays can be converted to Python scalars")."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import triton
    except ImportError:
        return None  # the kernel tests say so themselves
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if version < (3, 7):
        return (f"tests/kernels not collected: they run in Triton's interpreter here (no GPU), which needs triton "
                f">= 3.7, and triton {triton.__version__} is installed; pip install 'triton>=3.7,<3.8'")
    return None


TRITON_INTERPRETER_TOO_OLD = _triton_interpreter_too_old()
collect_ignore_glob = ["kernels/*"] if TRITON_INTERPRETER_TOO_OLD else []

REPO = Path(__file__).resolve().parent.parent

# The editable install maps mambatrain_kernels to the checkout that installed it (main), not necessarily this
# one (a git worktree): test this checkout's kernels, before anything imports them.
_spec = importlib.util.spec_from_file_location("mambatrain_kernels", REPO / "kernels" / "__init__.py",
                                               submodule_search_locations=[str(REPO / "kernels")])
sys.modules["mambatrain_kernels"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sys.modules["mambatrain_kernels"])
RECIPES = REPO / "recipes"

# A two-layer Mamba-2 on the Markov source: a few steps take a second on the CPU.
TINY_MAMBA = {
    "model": {"kind": "mamba", "d_model": 32, "n_layers": 2, "vocab_size": 32,
              "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 64}},
    "data": {"source": "markov", "seq_len": 32, "batch_size": 2},
    "scheduler": {"warmup_steps": 1},
    "trainer": {"max_steps": 3, "checkpoint_every_n_steps": 100, "val_every_n_steps": 100, "log_every_n_steps": 1,
                "limit_val_batches": 1},
}


@pytest.fixture
def quickstart_recipe() -> Path:
    return RECIPES / "quickstart.yaml"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never reach a hub or a wandb server.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices on a shared CPU: a second OpenMP thread only waits for a free core (10x slower, not faster).
    Training tests take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit_with_callback(recipe, callback, monkeypatch) -> None:
    """``mambatrain.run.fit(recipe)`` with ``callback`` first among the trainer's callbacks (so that it sees the
    gradients before the module's own hooks change them)."""
    from mambatrain import run

    build = run.build_trainer

    def with_callback(*args, **kwargs):
        built = build(*args, **kwargs)
        built.callbacks.insert(0, callback)
        return built

    monkeypatch.setattr(run, "build_trainer", with_callback)
    try:
        run.fit(recipe)
    finally:
        monkeypatch.setattr(run, "build_trainer", build)


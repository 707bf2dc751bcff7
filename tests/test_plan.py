"""`mambatrain plan`: numbers from the recipe alone, consistent with the model that training builds."""

import subprocess
import sys

from mambatrain.config.schema import MambaConfig, ModelConfig
from mambatrain.models.lm import LanguageModel
from mambatrain.plan import training_flops_per_token, training_memory

from conftest import RECIPES

MAMBA = ModelConfig(kind="mamba", d_model=128, n_layers=4, vocab_size=1000, mamba=MambaConfig(d_state=32, head_dim=32))


def test_parameters_match_the_built_model():
    assert training_memory(MAMBA, 1024, 1)["parameters"] == sum(p.numel() for p in LanguageModel(MAMBA).parameters())


def test_mamba_memory_and_flops_are_linear_in_length():
    short, long = training_memory(MAMBA, 2**16, 1, "M"), training_memory(MAMBA, 2**20, 1, "M")
    assert long["activations"] == 16 * short["activations"]
    assert training_flops_per_token(MAMBA, 2**20) == training_flops_per_token(MAMBA, 2**16)


def test_attention_flops_grow_with_length():
    transformer = ModelConfig(kind="transformer", d_model=128, n_layers=2, vocab_size=100)
    assert training_flops_per_token(transformer, 2**16) > 2 * training_flops_per_token(transformer, 2**12)


def test_checkpointing_reduces_saved_activations():
    assert training_memory(MAMBA, 4096, 1, "M")["activations"] < training_memory(MAMBA, 4096, 1)["activations"]


def test_cli_says_whether_it_fits():
    recipe = str(RECIPES / "quickstart.yaml")
    fits = subprocess.run([sys.executable, "-m", "mambatrain", "plan", recipe], capture_output=True, text=True)
    assert fits.returncode == 0 and "fits a 80 GiB GPU" in fits.stdout and "M blocks" in fits.stdout
    too_big = subprocess.run([sys.executable, "-m", "mambatrain", "plan", recipe, "--gpu-memory", "0.001",
                              "--data.seq_len", "65536"], capture_output=True, text=True)
    assert too_big.returncode == 1 and "does NOT fit" in too_big.stdout


def test_fused_kernels_keep_less_than_the_pytorch_path():
    """The Triton conv1d + SiLU and norms keep no fp32 copies: fewer activation bytes, the same carried state."""
    fused, plain = training_memory(MAMBA, 4096, 1), training_memory(MAMBA, 4096, 1, fused_kernels=False)
    assert fused["activations"] < plain["activations"]
    assert fused["weights_grads_optimizer"] == plain["weights_grads_optimizer"]

"""The stack holds exactly the blocks the recipe's pattern (or ratio) names, in order."""

import pytest

from mambatrain.config.schema import AttentionConfig, MambaConfig, ModelConfig
from mambatrain.models.blocks.attention import CausalSelfAttention
from mambatrain.models.blocks.mamba import Mamba1Mixer, Mamba2Mixer
from mambatrain.models.lm import LanguageModel

SMALL = dict(d_model=32, vocab_size=16, mamba=MambaConfig(d_state=4, head_dim=8), attention=AttentionConfig(n_heads=4))


def mixer_letters(model):
    letters = []
    for block in model.blocks:
        if isinstance(block.mixer, (Mamba1Mixer, Mamba2Mixer)):
            letters.append("M")
        elif isinstance(block.mixer, CausalSelfAttention):
            letters.append("A")
    return "".join(letters)


@pytest.mark.parametrize("pattern", ["MMMAMMMAMM", "AMMA", "MA", "AAAM"])
def test_pattern_is_built_in_order(pattern):
    model = LanguageModel(ModelConfig(kind="hybrid", n_layers=len(pattern), pattern=pattern, **SMALL))
    assert mixer_letters(model) == pattern


@pytest.mark.parametrize("n_layers,ratio,expected", [(10, 0.3, "MAMMMAMMAM"), (4, 0.25, "MMAM"), (8, 0.5, "MAMAMAMA")])
def test_ratio_is_built_as_the_documented_pattern(n_layers, ratio, expected):
    config = ModelConfig(kind="hybrid", n_layers=n_layers, attention_ratio=ratio, **SMALL)
    assert config.pattern == expected
    assert mixer_letters(LanguageModel(config)) == expected


def test_pure_stacks():
    assert mixer_letters(LanguageModel(ModelConfig(kind="mamba", n_layers=3, **SMALL))) == "MMM"
    assert mixer_letters(LanguageModel(ModelConfig(kind="transformer", n_layers=3, **SMALL))) == "AAA"


def test_mamba_version_selects_mixer():
    one = LanguageModel(ModelConfig(kind="mamba", n_layers=1, **{**SMALL, "mamba": MambaConfig(version=1, d_state=4)}))
    assert isinstance(one.blocks[0].mixer, Mamba1Mixer)
    assert one.blocks[0].mixer.A_log.shape == (64, 4)  # per-channel diagonal decay
    two = LanguageModel(ModelConfig(kind="mamba", n_layers=1, **SMALL))
    assert isinstance(two.blocks[0].mixer, Mamba2Mixer)
    assert two.blocks[0].mixer.A_log.shape == (8,)  # one scalar per head

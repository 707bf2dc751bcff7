"""Import from and export to transformers and state-spaces/mamba layouts: same logits both ways."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mambatrain.checkpoint.convert import ConversionError, export, load_model  # noqa: E402
from mambatrain.checkpoint.io import CheckpointError  # noqa: E402
from mambatrain.config.load import load_recipe, recipe_to_dict  # noqa: E402
from mambatrain.config.schema import AttentionConfig, MambaConfig, ModelConfig  # noqa: E402
from mambatrain.models.lm import LanguageModel  # noqa: E402

VOCAB = 50


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (norm weights, D, biases included), so that no tensor can hide a mix-up."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def ours_logits(model: LanguageModel, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(tokens))


def theirs_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def tokens(length: int = 37) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))


def save_ckpt(model: LanguageModel, path, source: str = "mqar", tokenizer: str = "byte"):
    """A mambatrain training checkpoint as Lightning writes it (what convert.py reads of it)."""
    recipe = load_recipe(values={"model": recipe_to_dict_model(model.config), "data": {
        "source": source, "text": {"tokenizer": tokenizer, "sources": [{"path": "unused.txt"}]} if source == "text"
        else {}}})
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 7, "hyper_parameters": {"recipe": recipe_to_dict(recipe)}}, path)
    return path


def recipe_to_dict_model(config: ModelConfig) -> dict:
    import dataclasses
    values = dataclasses.asdict(config)
    if values["kind"] != "hybrid":
        values["pattern"] = None
    return values


# ------------------------------------------------------------------------------------------------ transformers in

def test_import_transformers_mamba2(tmp_path):
    config = transformers.Mamba2Config(num_heads=8, head_dim=8, hidden_size=32, state_size=8, num_hidden_layers=2,
                                       vocab_size=VOCAB, n_groups=2, chunk_size=64, layer_norm_epsilon=1e-6)
    theirs = perturb(transformers.Mamba2ForCausalLM(config))
    theirs.save_pretrained(tmp_path)
    ours, weights = load_model(tmp_path)
    assert ours.config.mamba.n_groups == 2 and ours.config.norm_eps == 1e-6 and not ours.config.tie_embeddings
    error = relative_error(ours_logits(ours, tokens()), theirs_logits(theirs, tokens()))
    print(f"Mamba2ForCausalLM -> mambatrain: relative error {error:.2e}")
    assert error <= 1e-4


def test_import_transformers_mamba1(tmp_path):
    config = transformers.MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=VOCAB,
                                      time_step_rank=3, use_mambapy=False)
    theirs = perturb(transformers.MambaForCausalLM(config))
    theirs.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path)
    assert ours.config.mamba.version == 1 and ours.config.mamba.dt_rank == 3 and ours.config.tie_embeddings
    error = relative_error(ours_logits(ours, tokens()), theirs_logits(theirs, tokens()))
    print(f"MambaForCausalLM -> mambatrain: relative error {error:.2e}")
    assert error <= 1e-4


# ------------------------------------------------------------------------------------------------ export out

EXPORTS = {
    "Mamba2ForCausalLM": ModelConfig(kind="mamba", d_model=32, n_layers=2, vocab_size=VOCAB, tie_embeddings=False,
                                     mamba=MambaConfig(version=2, d_state=8, head_dim=8, n_groups=2, chunk_size=64)),
    "MambaForCausalLM": ModelConfig(kind="mamba", d_model=32, n_layers=2, vocab_size=VOCAB,
                                    mamba=MambaConfig(version=1, d_state=8)),
    "BambaForCausalLM": ModelConfig(kind="hybrid", pattern="MAMA", d_model=32, n_layers=4, vocab_size=VOCAB, d_mlp=48,
                                    mamba=MambaConfig(d_state=8, head_dim=8, chunk_size=64),
                                    attention=AttentionConfig(n_heads=4, n_kv_heads=2, rope_base=500.0)),
    "LlamaForCausalLM": ModelConfig(kind="transformer", d_model=32, n_layers=2, vocab_size=VOCAB, d_mlp=48,
                                    attention=AttentionConfig(n_heads=4, n_kv_heads=2)),
}


@pytest.mark.parametrize("architecture", EXPORTS)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, architecture):
    torch.manual_seed(0)
    ours = perturb(LanguageModel(EXPORTS[architecture]))
    out = export(save_ckpt(ours, tmp_path / "run.ckpt"), tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == architecture
    error = relative_error(theirs_logits(theirs, tokens()), ours_logits(ours, tokens()))
    print(f"mambatrain -> {architecture}: relative error {error:.2e}")
    assert error <= 1e-4
    # ... and the folder reads back into exactly the model it came from.
    again, _ = load_model(out)
    assert again.config == ours.config
    torch.testing.assert_close(ours_logits(again, tokens()), ours_logits(ours, tokens()))


def test_import_bamba(tmp_path):
    config = transformers.BambaConfig(hidden_size=32, num_hidden_layers=3, attn_layer_indices=[1], vocab_size=VOCAB,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                      mamba_n_heads=8, mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=64,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "partial_rotary_factor": 1.0})
    theirs = perturb(transformers.BambaForCausalLM(config))
    theirs.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path)
    assert ours.config.pattern == "MAM"
    error = relative_error(ours_logits(ours, tokens()), theirs_logits(theirs, tokens()))
    print(f"BambaForCausalLM -> mambatrain: relative error {error:.2e}")
    assert error <= 1e-4
    # Bamba's own default rotates half of each head, which our attention does not do: refused, not approximated.
    config.rope_parameters["partial_rotary_factor"] = 0.5
    config.save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="partial_rotary_factor"):
        load_model(tmp_path)


def test_models_without_a_transformers_class_keep_our_layout(tmp_path):
    config = ModelConfig(kind="hybrid", pattern="MA", d_model=32, n_layers=2, vocab_size=VOCAB, d_mlp=16,
                         mamba=MambaConfig(version=1, d_state=8),
                         attention=AttentionConfig(n_heads=4, sliding_window=8))
    ours = perturb(LanguageModel(config))
    out = export(save_ckpt(ours, tmp_path / "run.ckpt"), tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["model_type"] == "mambatrain"
    again, _ = load_model(out)
    torch.testing.assert_close(ours_logits(again, tokens()), ours_logits(ours, tokens()))


# ------------------------------------------------------------------------------------------------ mamba_ssm in

def _mamba_ssm_folder(folder, config: dict, state: dict) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / "pytorch_model.bin")


def test_import_mamba_ssm_mamba1_from_the_transformers_twin(tmp_path):
    """state-spaces/mamba-130m and mamba-130m-hf hold the same tensors under these two sets of names."""
    hf_config = transformers.MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=VOCAB,
                                         use_mambapy=False)
    theirs = perturb(transformers.MambaForCausalLM(hf_config))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in theirs.state_dict().items()}
    _mamba_ssm_folder(tmp_path / "ssm", {"d_model": 32, "n_layer": 2, "vocab_size": VOCAB,
                                         "ssm_cfg": {"d_state": 8}, "rms_norm": True, "residual_in_fp32": True,
                                         "fused_add_norm": True, "pad_vocab_size_multiple": 1,
                                         "tie_embeddings": True}, state)
    ours, weights = load_model(tmp_path / "ssm")
    assert weights.source.startswith("state-spaces/mamba")
    error = relative_error(ours_logits(ours, tokens()), theirs_logits(theirs, tokens()))
    print(f"mamba_ssm Mamba-1 -> mambatrain: relative error {error:.2e}")
    assert error <= 1e-4


def test_import_mamba_ssm_hybrid(tmp_path):
    """A Mamba-2 / MHA hybrid with GatedMLP, written by hand in mamba_ssm's names (fc1 = up then gate)."""
    config = ModelConfig(kind="hybrid", pattern="MA", d_model=32, n_layers=2, vocab_size=VOCAB, d_mlp=48,
                         mamba=MambaConfig(d_state=8, head_dim=8, chunk_size=64),
                         attention=AttentionConfig(n_heads=4, n_kv_heads=2))
    reference = perturb(LanguageModel(config))
    state = {}
    for key, value in reference.state_dict().items():
        key = key.replace("embedding.", "backbone.embedding.").replace("norm_f.", "backbone.norm_f.")
        key = key.replace("blocks.", "backbone.layers.").replace("mlp_norm.", "norm2.").replace("mlp.down.", "mlp.fc2.")
        key = key.replace("mixer.qkv.", "mixer.in_proj.")
        if key.endswith("mlp.gate_up.weight"):
            gate, up = value.chunk(2)
            key, value = key.replace("gate_up", "fc1"), torch.cat([up, gate])
        state[key] = value
    state["backbone.layers.1.mixer.in_proj.bias"] = torch.zeros(64)  # MHA's default biases, zero: accepted
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    _mamba_ssm_folder(tmp_path / "ssm", {
        "d_model": 32, "d_intermediate": 48, "n_layer": 2, "vocab_size": VOCAB,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 64}, "attn_layer_idx": [1],
        "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 8, "causal": True},
        "rms_norm": True, "tie_embeddings": True}, state)
    ours, _ = load_model(tmp_path / "ssm")
    assert ours.config.pattern == "MA" and ours.config.d_mlp == 48
    torch.testing.assert_close(ours_logits(ours, tokens()), ours_logits(reference, tokens()))


# ------------------------------------------------------------------------------------------------ bad input

def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    path = save_ckpt(perturb(LanguageModel(EXPORTS["MambaForCausalLM"])), tmp_path / "run.ckpt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="run.ckpt.*(truncated|not a complete)"):
        export(path, tmp_path / "out")


def test_truncated_safetensors_is_one_clear_error(tmp_path):
    out = export(save_ckpt(perturb(LanguageModel(EXPORTS["MambaForCausalLM"])), tmp_path / "run.ckpt"),
                 tmp_path / "export")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ConversionError, match="model.safetensors: cannot be read"):
        load_model(out)


def test_another_architecture_is_one_clear_error(tmp_path):
    (tmp_path / "gpt2").mkdir()
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB).save_pretrained(tmp_path / "gpt2")
    torch.save({}, tmp_path / "gpt2" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="model_type 'gpt2' is not one we import"):
        load_model(tmp_path / "gpt2")
    # A Mamba-1 state dict under a Mamba-2 config: the tensors do not fit.
    out = export(save_ckpt(perturb(LanguageModel(EXPORTS["MambaForCausalLM"])), tmp_path / "run.ckpt"),
                 tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    del config["mambatrain"]
    config.update(model_type="mamba2", num_heads=8, head_dim=8, n_groups=1, chunk_size=64)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="missing tensors.*dt_bias"):
        load_model(out)


def test_tokenizer_that_does_not_fit_the_model_is_one_clear_error(tmp_path):
    from mambatrain.data.tokenizer import train_bpe
    tokenizer = train_bpe(["a few words of text"] * 4, 300, tmp_path / "tokenizer")  # 257+ ids
    path = save_ckpt(perturb(LanguageModel(EXPORTS["MambaForCausalLM"])), tmp_path / "run.ckpt", source="text",
                     tokenizer=str(tokenizer))
    with pytest.raises(ConversionError, match="tokens but the model only 50 embedding rows"):
        export(path, tmp_path / "out")


def test_export_command(tmp_path, capsys):
    from mambatrain.cli import main
    path = save_ckpt(perturb(LanguageModel(EXPORTS["BambaForCausalLM"])), tmp_path / "run.ckpt")
    assert main(["export", str(path), str(tmp_path / "out")]) == 0
    assert "loads with transformers' BambaForCausalLM" in capsys.readouterr().out
    path.write_bytes(path.read_bytes()[:4096])
    assert main(["export", str(path), str(tmp_path / "out2")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "run.ckpt" in error


def test_export_copies_the_tokenizer(tmp_path):
    from mambatrain.data.tokenizer import train_bpe
    tokenizer = train_bpe(["some text to learn merges from"] * 4, 280, tmp_path / "tokenizer")
    config = ModelConfig(kind="mamba", d_model=32, n_layers=1, vocab_size=288, mamba=MambaConfig(version=1, d_state=8))
    path = save_ckpt(LanguageModel(config), tmp_path / "run.ckpt", source="text", tokenizer=str(tokenizer))
    out = export(path, tmp_path / "out")
    assert (out / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    assert (out / "tokenizer_config.json").is_file()
    _, weights = load_model(out)
    assert weights.tokenizer == str(out / "tokenizer.json")
    assert transformers.AutoTokenizer.from_pretrained(out)("some text")["input_ids"]

"""Decoding with carried state (prefill, then one token at a time) gives the logits of one full pass."""

import pytest
import torch

from mambatrain.config.schema import AttentionConfig, MambaConfig, ModelConfig
from mambatrain.inference.generate import generate, sample_next
from mambatrain.inference.step import decode_step
from mambatrain.models.lm import LanguageModel

STACKS = {
    "mamba1": dict(kind="mamba", mamba=MambaConfig(version=1, d_state=8)),
    "mamba2": dict(kind="mamba", mamba=MambaConfig(version=2, d_state=8, head_dim=8, n_groups=2, chunk_size=64)),
    "mamba2-d_conv1": dict(kind="mamba", mamba=MambaConfig(version=2, d_state=8, head_dim=8, d_conv=1)),  # no conv tail
    "transformer": dict(kind="transformer", attention=AttentionConfig(n_heads=4, n_kv_heads=2)),
    "hybrid": dict(kind="hybrid", pattern="MAMA", mamba=MambaConfig(d_state=8, head_dim=8, chunk_size=64),
                   attention=AttentionConfig(n_heads=4, n_kv_heads=2)),
    "hybrid-window": dict(kind="hybrid", pattern="AM", mamba=MambaConfig(version=1, d_state=8),
                          attention=AttentionConfig(n_heads=4, sliding_window=5)),
}


def tiny(name: str) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_layers=len(STACKS[name].get("pattern", "MM")), vocab_size=50, d_mlp=48,
                         **STACKS[name])
    return LanguageModel(config).eval()


@pytest.mark.parametrize("name", STACKS)
def test_step_by_step_logits_equal_full_sequence(name):
    model = tiny(name)
    tokens = torch.randint(0, 50, (2, 21))
    with torch.no_grad():
        full = model.logits(model(tokens))
        states = model.decoding_states(2, tokens.device)
        hidden = [model(tokens[:, :6], states=states), model(tokens[:, 6:9], states=states)]  # prefill in two parts
        hidden += [decode_step(model, tokens[:, t], states)[:, None] for t in range(9, 21)]
        stepped = model.logits(torch.cat(hidden, dim=1))
    error = ((stepped - full).norm() / full.norm()).item()
    assert error < 1e-5, error


@pytest.mark.parametrize("name", ["hybrid", "hybrid-window"])
def test_decoding_continues_the_document_of_the_prompt(name):
    model = tiny(name)
    tokens = torch.randint(0, 50, (2, 16))
    seq_idx = torch.zeros(2, 16, dtype=torch.int32)
    # A second document starts inside the prompt: mid-prompt in row 0, at its last token in row 1 (the carried
    # convolution tail then holds only inputs of the first document, which must not reach the decoded tokens).
    seq_idx[0, 5:], seq_idx[1, 9:] = 1, 1
    with torch.no_grad():
        full = model.logits(model(tokens, seq_idx))
        states = model.decoding_states(2, tokens.device)
        hidden = [model(tokens[:, :10], seq_idx[:, :10], states)]
        hidden += [decode_step(model, tokens[:, t], states)[:, None] for t in range(10, 16)]
    torch.testing.assert_close(model.logits(torch.cat(hidden, dim=1)), full, rtol=1e-5, atol=1e-5)


def test_mamba_state_does_not_grow_with_length():
    model = tiny("mamba2")
    states = model.decoding_states(1, "cpu")
    with torch.no_grad():
        model(torch.randint(0, 50, (1, 5)), states=states)
        sizes = [s.ssm.numel() + s.conv.numel() for s in states]
        for _ in range(10):
            decode_step(model, torch.randint(0, 50, (1,)), states)
    assert [s.ssm.numel() + s.conv.numel() for s in states] == sizes


@pytest.mark.parametrize("name", ["mamba2", "hybrid"])
def test_greedy_generation_equals_rerunning_the_whole_sequence(name):
    model = tiny(name)
    prompt = torch.randint(0, 50, (2, 7))
    out = generate(model, prompt, 8, temperature=0)
    reference = prompt
    with torch.no_grad():
        for _ in range(8):
            reference = torch.cat([reference, model.logits(model(reference))[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, reference)


def test_sampling_is_seeded_and_filters():
    model = tiny("mamba1")
    prompt = torch.randint(0, 50, (1, 4))
    first = generate(model, prompt, 6, temperature=1.0, top_p=0.9, seed=3)
    assert torch.equal(first, generate(model, prompt, 6, temperature=1.0, top_p=0.9, seed=3))
    assert torch.equal(generate(model, prompt, 6, top_k=1, seed=5), generate(model, prompt, 6, temperature=0))
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    picks = {sample_next(logits, top_k=2, generator=torch.Generator().manual_seed(i)).item() for i in range(50)}
    assert picks == {1, 2}
    # 1 and 2 hold ~0.99 of the mass: top_p 0.5 keeps token 1 only.
    assert {sample_next(logits, top_p=0.5).item() for _ in range(20)} == {1}


def _checkpoint(tmp_path, model: LanguageModel, data: dict):
    import dataclasses

    from mambatrain.config.load import load_recipe, recipe_to_dict
    values = dataclasses.asdict(model.config)
    values["pattern"] = values["pattern"] if values["kind"] == "hybrid" else None
    recipe = load_recipe(values={"model": values, "data": data})
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 1,
                "hyper_parameters": {"recipe": recipe_to_dict(recipe)}}, path)
    return path


def test_generate_command_streams_text(tmp_path, capsys):
    from mambatrain.cli import main
    from mambatrain.data.tokenizer import ByteTokenizer
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(kind="mamba", d_model=32, n_layers=2, vocab_size=257,
                                      mamba=MambaConfig(d_state=8, head_dim=8, chunk_size=64))).eval()
    path = _checkpoint(tmp_path, model, {"source": "text", "text": {"sources": [{"path": "train.txt"}]}})
    assert main(["generate", str(path), "--prompt", "héllo", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    prompt = torch.tensor([list("héllo".encode())])
    expected = ByteTokenizer().decode(generate(model, prompt, 6, temperature=0, stop_id=256)[0, prompt.shape[1]:])
    assert capsys.readouterr().out == expected + "\n"


def test_generate_command_takes_token_ids_for_synthetic_runs(tmp_path, capsys):
    from mambatrain.cli import main
    model = tiny("hybrid")
    path = _checkpoint(tmp_path, model, {"source": "mqar", "mqar": {"num_kv_pairs": 4}})
    assert main(["generate", str(path), "--prompt", "3 17 5", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    expected = generate(model, torch.tensor([[3, 17, 5]]), 4, temperature=0)[0, 3:].tolist()
    assert capsys.readouterr().out.split() == [str(i) for i in expected]
    assert main(["generate", str(path), "--prompt", "hello"]) == 2
    assert "trained without a tokenizer" in capsys.readouterr().err

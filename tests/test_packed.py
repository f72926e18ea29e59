"""Linear layers on packed weights during inference passes: same outputs, hooks kept, weights back bit for bit."""

from __future__ import annotations

import pytest
import torch

from deccp import packed
from deccp.generation import GenerationSettings, generate_samples
from deccp.models import load_model
from deccp.packed import packed_linears

pytestmark = pytest.mark.skipif(not packed.enabled(), reason="oneDNN packed linears unavailable in this torch build")

PROMPTS = ["What is the capital of France?", "台湾的政治地位是什么？", "Name three rivers.", "Explain photosynthesis."]


def _linears(model):
    """The linear layers that pack: all of them, the output head included."""
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def test_outputs_match_and_weights_come_back_exactly(tiny_model_dir):
    model, _ = load_model(tiny_model_dir("llama"), dtype="float32")  # an untied output head, packed too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(5, 100, (3, 9))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    with packed_linears(model):
        assert all("forward" in m.__dict__ for m in _linears(model))
        got = model(input_ids=ids).logits
        with packed_linears(model):  # nested: nothing more to pack, and leaving it unpacks nothing
            assert model(input_ids=ids).logits.equal(got)
        assert all("forward" in m.__dict__ for m in _linears(model))
    assert torch.allclose(got, dense, atol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all("forward" not in m.__dict__ for m in _linears(model))


def test_hooks_on_the_linear_layers_still_run(tiny_model_dir):
    model, _ = load_model(tiny_model_dir("qwen2"), dtype="float32")
    lin = _linears(model)[0]
    seen = []
    pre = lin.register_forward_pre_hook(lambda mod, args: (args[0] * 0,))
    post = lin.register_forward_hook(lambda mod, args, out: seen.append(out.abs().max().item()))
    try:
        with packed_linears(model):
            model(input_ids=torch.tensor([[5, 6, 7]]))
    finally:
        pre.remove(), post.remove()
    bias = lin.bias.abs().max().item() if lin.bias is not None else 0.0
    assert seen and seen[0] == pytest.approx(bias)  # the pre-hook zeroed the input: only the bias is left


def test_a_tied_head_is_packed_and_everything_comes_back_after_an_error(tiny_model_dir):
    model, _ = load_model(tiny_model_dir("qwen2"), dtype="float32")  # the tiny Qwen2 ties its output head
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight
    ids = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), packed_linears(model):
        assert "forward" in head.__dict__  # the embedding shares its weight, but it is no linear layer
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-4)
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all("forward" not in m.__dict__ for m in _linears(model))


def test_a_weight_two_linear_layers_share_is_not_packed(tiny_model_dir):
    model, _ = load_model(tiny_model_dir("llama"), dtype="float32")
    mlp = model.model.layers[0].mlp
    mlp.up_proj.weight = mlp.gate_proj.weight  # same shape: one weight, two layers
    with packed_linears(model):
        assert "forward" not in mlp.up_proj.__dict__ and "forward" not in mlp.gate_proj.__dict__
        assert "forward" in mlp.down_proj.__dict__ and "forward" in model.lm_head.__dict__


def test_switched_off_by_the_environment(tiny_model_dir, monkeypatch):
    model, _ = load_model(tiny_model_dir("qwen2"), dtype="float32")
    monkeypatch.setenv(packed.ENV, "0")
    with packed_linears(model):
        assert all("forward" not in m.__dict__ for m in _linears(model))


def test_not_packed_without_the_memory_for_the_copies(tiny_model_dir, monkeypatch):
    model, _ = load_model(tiny_model_dir("llama"), dtype="float32")
    monkeypatch.setattr(packed, "_available_memory", lambda: 1000)
    with packed_linears(model):
        assert all("forward" not in m.__dict__ for m in _linears(model))
    monkeypatch.setattr(packed, "_available_memory", lambda: None)  # unknown: packs
    with packed_linears(model):
        assert all("forward" in m.__dict__ for m in _linears(model))


def test_generation_gives_the_same_answers_packed_or_not(tiny_model_dir, monkeypatch):
    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    settings = GenerationSettings(max_new_tokens=12, batch_size=3)
    packings, real = [], packed._packed_forward
    monkeypatch.setattr(packed, "_packed_forward", lambda *a: packings.append(a) or real(*a))
    on = generate_samples(model, tok, PROMPTS, settings, progress=False)
    assert len(packings) == len(_linears(model))  # every linear layer, the head too, once for the pass
    monkeypatch.setenv(packed.ENV, "0")
    off = generate_samples(model, tok, PROMPTS, settings, progress=False)
    assert len(packings) == len(_linears(model))
    assert on == off

"""The weight edits: math, live (hooked) edits equal weight edits, exact revert, shard-by-shard streaming."""

from __future__ import annotations

import json

import pytest
import torch

from deccp import DeccpError
from deccp.abliteration.directions import Directions
from deccp.abliteration.edits import (
    EditPlan,
    Kernel,
    LiveEdit,
    ModuleEdit,
    apply_in_memory,
    check_architecture,
    column_scales,
    edit_weight,
    interpolate,
    unit,
)
from deccp.abliteration.plan import EditParams, build_plan
from deccp.abliteration.streaming import stream_edit
from deccp.models import load_model


def random_directions(n_layers: int, d: int, seed: int = 0) -> Directions:
    g = torch.Generator().manual_seed(seed)
    return Directions(censorship=torch.randn(n_layers, d, generator=g, dtype=torch.float64),
                      harmful=torch.randn(n_layers, d, generator=g, dtype=torch.float64),
                      good_mean=torch.randn(n_layers, d, generator=g, dtype=torch.float64), counts={})


def logits(model, tok, text="Hello 台湾"):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_edit_removes_direction_from_every_column():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 40, generator=g, dtype=torch.float64)
    r = unit(torch.randn(16, generator=g))
    out = edit_weight(W, ModuleEdit("x", r, 1.0))
    assert torch.allclose(r @ out, torch.zeros(40, dtype=torch.float64), atol=1e-12)
    half = edit_weight(W, ModuleEdit("x", r, 0.5))
    assert torch.allclose(r @ half, 0.5 * (r @ W), atol=1e-12)


def test_norm_preserving_keeps_column_norms():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 40, generator=g, dtype=torch.float64)
    r = unit(torch.randn(16, generator=g))
    out = edit_weight(W, ModuleEdit("x", r, 0.8, norm_preserve=True))
    assert torch.allclose(out.norm(dim=0), W.norm(dim=0), atol=1e-10)
    c = column_scales(W, r, 0.8)
    assert (c >= 1).all()


def test_plan_digest_changes_with_anything_the_edit_does():
    r = torch.nn.functional.normalize(torch.randn(8, dtype=torch.float64), dim=0)
    plan = EditPlan([ModuleEdit("model.layers.0.mlp.down_proj.weight", r, 1.0, True)])
    assert plan.digest() == EditPlan([ModuleEdit("model.layers.0.mlp.down_proj.weight", r.clone(), 1.0, True)]).digest()
    others = [plan.scaled(1.5), EditPlan([ModuleEdit("model.layers.0.mlp.down_proj.weight", r, 1.0, False)]),
              EditPlan([ModuleEdit("model.layers.1.mlp.down_proj.weight", r, 1.0, True)]),
              EditPlan([ModuleEdit("model.layers.0.mlp.down_proj.weight", -r, 1.0, True)]),
              EditPlan(plan.edits, untie_embeddings=True)]
    assert len({plan.digest(), *(o.digest() for o in others)}) == 6


def test_kernel_shape():
    k = Kernel(peak=5, width=2, max_weight=1.0, min_weight=0.2)
    assert k.weight(5) == 1.0 and k.weight(8) == 0.0
    assert k.weight(7) == pytest.approx(0.2) and k.weight(4) == pytest.approx(0.6)


def test_interpolate_fractional_layer():
    d = torch.tensor([[0.0, 0.0], [2.0, 4.0]], dtype=torch.float64)
    assert torch.allclose(interpolate(d, 0.25), torch.tensor([0.5, 1.0], dtype=torch.float64))
    with pytest.raises(DeccpError):
        interpolate(d, 1.5)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("variant", ["plain", "projected", "biprojected"])
def test_live_edit_equals_weight_edit_and_reverts_exactly(tiny_model_dir, arch, variant):
    path = tiny_model_dir(arch)
    model, tok = load_model(path)
    before = logits(model, tok)
    names = [n for n, _ in model.named_parameters()]
    dirs = random_directions(model.config.num_hidden_layers, model.config.hidden_size)
    params = EditParams(direction_layer=1.5, variant=variant, embed_weight=0.7,
                        attn=Kernel(peak=1, width=2, max_weight=1.0, min_weight=0.3))
    plan = build_plan(dirs, params, names, tied_embeddings=model.config.tie_word_embeddings)
    with LiveEdit(model, plan):
        live = logits(model, tok)
    assert torch.equal(logits(model, tok), before)  # reverted exactly
    assert not torch.allclose(live, before, atol=1e-4)
    apply_in_memory(model, plan)
    assert torch.allclose(logits(model, tok), live, atol=1e-4)


def test_streamed_shards_equal_in_memory(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2", max_shard_size="20KB")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 3, shards
    model, tok = load_model(src)
    dirs = random_directions(model.config.num_hidden_layers, model.config.hidden_size, seed=3)
    plan = build_plan(dirs, EditParams(direction_layer=2, variant="biprojected", embed_weight=1.0),
                      [n for n, _ in model.named_parameters()], tied_embeddings=True)
    apply_in_memory(model, plan)
    expected = logits(model, tok)
    out = tmp_path / "edited"
    out.mkdir()
    info = stream_edit(src, out, plan)
    assert info["shards"] == len(shards) and info["edited_tensors"] == len(plan.edits)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    streamed, tok2 = load_model(out)
    assert torch.allclose(logits(streamed, tok2), expected, atol=1e-5)
    # the source is untouched
    assert torch.equal(logits(load_model(src)[0], tok), logits(load_model(src)[0], tok))


def test_unsupported_architecture_is_named():
    class Cfg:
        model_type = "mixtral"

    with pytest.raises(DeccpError, match="mixtral"):
        check_architecture(Cfg())

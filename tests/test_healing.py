"""Healing after abliteration: the coarse KL, the saved model equals the healed live one, the original is restored."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from deccp import DeccpError
from deccp.abliteration.config import AbliterationConfig
from deccp.abliteration.edits import EditPlan, ModuleEdit
from deccp.abliteration.healing import _balanced, coarse_kl, heal
from deccp.abliteration.run import run
from deccp.abliteration.streaming import stream_edit
from deccp.data.load import load_prompts
from deccp.models import load_model


def test_coarse_kl_is_exact_over_the_whole_vocabulary_and_a_lower_bound_below_it():
    torch.manual_seed(0)
    t = torch.randn(5, 50).log_softmax(-1)
    s = torch.randn(5, 50).log_softmax(-1)
    exact = (t.exp() * (t - s)).sum(-1)
    val, idx = t.topk(50, dim=-1)
    rest = torch.log(-torch.expm1(torch.logsumexp(val, -1).clamp(max=-1e-6)))
    assert torch.allclose(coarse_kl(s, idx, val, rest), exact, atol=1e-4)
    val, idx = t.topk(8, dim=-1)
    rest = torch.log(-torch.expm1(torch.logsumexp(val, -1)))
    coarse = coarse_kl(s, idx, val, rest)
    assert (coarse >= -1e-6).all() and (coarse <= exact + 1e-5).all()  # merging tokens never raises a KL
    assert torch.allclose(coarse_kl(t, idx, val, rest), torch.zeros(5), atol=1e-5)


def test_balanced_alternates_languages():
    ps = [p for p in load_prompts("ours:harmless:train") if p.lang in ("en", "zh")]
    ps = sorted(ps, key=lambda p: p.lang)  # all English first, as the direction set lists them
    assert [p.lang for p in _balanced(ps, 6)] == ["en", "zh"] * 3


def _plan(model) -> EditPlan:
    torch.manual_seed(1)
    r = torch.randn(model.config.hidden_size, dtype=torch.float64)
    r = r / r.norm()
    names = [n for n, _ in model.named_parameters() if n.endswith(("o_proj.weight", "down_proj.weight"))]
    return EditPlan([ModuleEdit(n, r, 1.5, norm_preserve=True) for n in names])


def _cfg(**kw) -> AbliterationConfig:
    base = dict(dtype="float32", batch_size=4, heal_prompts=6, heal_answer_tokens=4, heal_steps=6,
                heal_batch_size=4, heal_rank=4, heal_learning_rate=5e-3, heal_top_k=16)
    base.update(kw)
    return AbliterationConfig(**base)


def test_saved_healed_model_is_the_live_one_and_the_original_comes_back(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")
    model, tok = load_model(src, dtype="float32")
    plan = _plan(model)
    prompts = {k: [p for p in load_prompts(f"ours:{k}:train") if p.lang in ("en", "zh")][:12]
               for k in ("harmless", "harmful", "sensitive")}
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        original = model(ids).logits.clone()
    with contextlib.ExitStack() as stack:
        result = heal(model, tok, plan, stack, prompts, _cfg(), log=lambda *_: None)
        with torch.no_grad():
            live = model(ids).logits.clone()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original)  # edit and adapters gone, exactly
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert result.examples["harmless"] > 0 and result.examples["sensitive"] == 6
    assert len(result.losses) == 6 and result.losses[-1] < result.losses[0]
    assert any(float(d.B.abs().max()) > 0 for d in result.deltas)  # the adapters learned something
    out = tmp_path / "healed"
    out.mkdir()
    info = stream_edit(src, out, plan, result.deltas)
    assert info["healed_tensors"] == len(result.deltas)
    saved, _ = load_model(out, dtype="float32")
    with torch.no_grad():
        written = saved(ids).logits
    assert torch.allclose(written, live, atol=1e-4)
    assert not torch.allclose(written, original, atol=1e-3)


def test_run_with_healing_records_it(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")
    out = tmp_path / "out"
    cfg = AbliterationConfig(model=str(src), output_dir=str(out), dtype="float32", max_prompts=16, holdout=4,
                             batch_size=8, num_candidates=2, score_max_new_tokens=4, check_prompts=4,
                             check_max_new_tokens=4, examples=1, example_max_new_tokens=4, answer_tokens=4,
                             cache_dir=str(tmp_path / "acts"), heal=True, heal_prompts=4, heal_answer_tokens=4,
                             heal_steps=3, heal_batch_size=4, heal_rank=2, heal_top_k=8)
    lines: list[str] = []
    record = run(cfg, log=lines.append)
    saved = json.loads((out / "abliteration.json").read_text())
    assert saved["healing"]["steps"] == 3 and saved["healing"]["modules"] > 0
    assert "healing" in saved["timings_s"] and saved["stream"]["healed_tensors"] == saved["healing"]["modules"]
    assert record["check"]["after"]["refusal"]
    assert any("healing:" in line for line in lines)


@pytest.mark.parametrize("field,value", [("heal_steps", 0), ("heal_learning_rate", 0.0), ("heal_target_modules", [])])
def test_bad_healing_settings_are_rejected(field, value):
    with pytest.raises(DeccpError, match=field):
        AbliterationConfig(**{field: value})


def test_adapters_choose_modules_by_name_and_start_as_the_identity(tiny_model_dir):
    from deccp.abliteration.healing import LowRankAdapters

    model, _ = load_model(tiny_model_dir("llama"), dtype="float32")
    ids = torch.tensor([[2, 4, 6, 8]])
    with torch.no_grad():
        before = model(ids).logits.clone()
    with LowRankAdapters(model, rank=2, alpha=4, target_modules=["o_proj", "down_proj"]) as ad:
        assert sorted({n.rsplit(".", 1)[-1] for n in ad.targets}) == ["down_proj", "o_proj"]
        with torch.no_grad():
            assert torch.equal(model(ids).logits, before)  # B starts at zero
        all_linear = LowRankAdapters(model, rank=2, alpha=4, target_modules=["all-linear"])
        assert "lm_head" not in all_linear.targets and len(all_linear.targets) > len(ad.targets)
    with pytest.raises(DeccpError, match="no linear module matches"):
        LowRankAdapters(model, rank=2, alpha=4, target_modules=["not_a_module"])
    model.model.layers[0].mlp.down_proj.to("meta")  # what an offloading device_map leaves behind
    with pytest.raises(DeccpError, match="needs the model in memory"):
        LowRankAdapters(model, rank=2, alpha=4, target_modules=["down_proj"])

"""Abliteration end to end on tiny models: outputs, records, safety of the source, recipes, search and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deccp import DeccpError
from deccp.abliteration.config import AbliterationConfig
from deccp.abliteration.directions import collect_activations
from deccp.abliteration.run import main, run
from deccp.config import parse_config
from deccp.io import sha256_file
from deccp.models import load_model

REPO = Path(__file__).resolve().parents[1]


def small_cfg(model: Path, out: Path, **kw) -> AbliterationConfig:
    base = dict(model=str(model), output_dir=str(out), dtype="float32", max_prompts=16, holdout=4, batch_size=8,
                num_candidates=2, score_max_new_tokens=4, check_prompts=4, check_max_new_tokens=4, examples=2,
                example_max_new_tokens=6, answer_tokens=4, cache_dir=str(out.parent / "acts"))
    base.update(kw)
    return AbliterationConfig(**base)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_end_to_end_writes_a_loadable_model(tiny_model_dir, tmp_path, arch):
    src = tiny_model_dir(arch)
    before = {p.name: sha256_file(p) for p in src.iterdir() if p.is_file()}
    out = tmp_path / "out"
    record = run(small_cfg(src, out, embed_weight=0.5), log=lambda *_: None)
    assert {p.name: sha256_file(p) for p in src.iterdir() if p.is_file()} == before  # source untouched
    for name in ("config.json", "tokenizer.json", "directions.safetensors", "abliteration.json", "generation_config.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "abliteration.json").read_text())
    assert saved["chosen"]["direction_layer"] == record["chosen"]["direction_layer"]
    assert saved["datasets"]["bad"]["count"] > 0 and len(saved["datasets"]["bad"]["sha256"]) == 16
    assert set(saved["check"]["before"]["refusal"]) >= {"sensitive/en", "sensitive/zh", "harmful", "harmless"}
    assert len(saved["check"]["examples"]) == 2
    assert {"load", "directions", "selection", "check", "edit_and_save", "total"} <= set(saved["timings_s"])
    # plain transformers loads it, and it differs from the source
    from transformers import AutoModelForCausalLM

    edited = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(src)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert not torch.allclose(edited(ids).logits, original(ids).logits)


def test_refuses_to_overwrite_or_write_into_source(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")
    with pytest.raises(DeccpError, match="overlaps the source"):
        run(small_cfg(src, src / "abl"), log=lambda *_: None)
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(DeccpError, match="already exists"):
        run(small_cfg(src, out), log=lambda *_: None)


def test_fixed_layer_and_external_prompt_files(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")
    bad = tmp_path / "bad.txt"
    bad.write_text("What happened in 1989?\n台湾是国家吗？\nWho is Tank Man?\n六四是什么？\n", encoding="utf-8")
    good = tmp_path / "good.txt"
    good.write_text("How do I bake bread?\n怎么做面包？\nWhat is rain?\n雨是什么？\n", encoding="utf-8")
    rec = run(small_cfg(src, tmp_path / "o", bad_prompts=[str(bad)], good_prompts=[str(good)],
                        harmful_prompts=["ours:harmful:train"], direction_layer=1.5, holdout=1, check=False),
              log=lambda *_: None)
    assert rec["chosen"]["direction_layer"] == 1.5 and rec["check"] == {}
    assert "sweep" not in rec["selection"]


def test_optuna_search_is_resumable(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")
    study = tmp_path / "study.db"
    rec = run(small_cfg(src, tmp_path / "a", search=True, n_trials=3, study_path=str(study), check=False),
              log=lambda *_: None)
    assert len(rec["selection"]["trials"]) == 3 and rec["selection"]["pareto"]
    assert Path(rec["selection"]["plot"]).is_file()
    rec2 = run(small_cfg(src, tmp_path / "b", search=True, n_trials=4, study_path=str(study), check=False),
               log=lambda *_: None)
    assert len(rec2["selection"]["trials"]) == 4  # three loaded from the study, one new


def test_activation_positions_and_answers(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("qwen2"))
    acts, texts = collect_activations(model, tok, ["a question", "另一个问题，长一点"], positions=(-1, -2), answer_tokens=3)
    assert acts.shape == (2, model.config.num_hidden_layers, 2, model.config.hidden_size)
    assert len(texts) == 2
    acts1, _ = collect_activations(model, tok, ["另一个问题，长一点"], positions=(-1, -2))
    assert torch.allclose(acts1[0], acts[1], atol=1e-4)  # left padding does not move the positions


def test_position_select_sweeps_each_position(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")
    rec = run(small_cfg(src, tmp_path / "o", positions=[-1, -3], position_mode="select", check=False),
              log=lambda *_: None)
    sweep = rec["selection"]["sweep"]
    assert {t["position"] for t in sweep} == {-1, -3}
    assert rec["selection"]["position"] in (-1, -3)


def test_every_recipe_parses_strictly():
    recipes = sorted(REPO.glob("recipes/**/abliterate*.yaml"))
    assert recipes
    for r in recipes:
        (cfg,) = parse_config([AbliterationConfig], ["--config", str(r)])
        assert isinstance(cfg, AbliterationConfig)


def test_bad_recipe_fails_before_any_model_is_loaded(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("model: default\nvarient: plain\nmax_prompts: lots\nvariant: sideways\n")
    with pytest.raises(DeccpError) as err:
        parse_config([AbliterationConfig], ["--config", str(bad)])
    msg = str(err.value)
    assert f"{bad}: varient: unknown key (did you mean 'variant'?)" in msg
    assert f"{bad}: max_prompts: expected int" in msg
    assert f"{bad}: variant: 'sideways' is not one of" in msg
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(DeccpError, match=f"{broken}:"):
        parse_config([AbliterationConfig], ["--config", str(broken)])


def test_cli_error_is_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "no such file or directory" in err and err.count("\n") == 1


@pytest.mark.slow
def test_real_default_model_refuses_less_after_abliteration(real_model_dir, tmp_path):
    """Bounded run on the real default model: a fixed mid-layer edit lowers English sensitive refusals."""
    cfg = AbliterationConfig(model=str(real_model_dir), output_dir=str(tmp_path / "abl"), max_prompts=48, holdout=2,
                             direction_layer=16.0, targeted=False, check_prompts=12, check_max_new_tokens=16,
                             langs=["en"], examples=1, example_max_new_tokens=32, cache_dir=str(tmp_path / "acts"))
    record = run(cfg, log=lambda *_: None)
    before, after = record["check"]["before"]["refusal"], record["check"]["after"]["refusal"]
    assert before["sensitive/en"] >= 0.5  # the base model refuses most sensitive English questions
    assert after["sensitive/en"] < before["sensitive/en"]
    assert (tmp_path / "abl" / "model.safetensors").is_file()


def test_scorer_keeps_kl_on_answered_harmless_prompts_apart(tiny_model_dir, monkeypatch):
    """The collateral-damage KL averages only the harmless prompts the unedited model answered."""
    from deccp.abliteration import scoring
    from deccp.abliteration.edits import EditPlan, LiveEdit, ModuleEdit
    from deccp.data.schema import Prompt
    from deccp.metrics import kl_per_position

    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    harmless = [Prompt(text=t, lang="en") for t in ("Refuse me", "Name a colour.", "What is rain?")]
    sets = scoring.PromptSets(sensitive=[Prompt(text="Q?", lang="en")], harmful=[], harmless=harmless)
    # judged in order: the sensitive answer, then harmless 1..3; the unedited model "refuses" harmless 1 only
    calls = iter([False, True, False, False])
    monkeypatch.setattr(scoring, "is_refusal", lambda t, lang: next(calls))
    scorer = scoring.Scorer(model, tok, sets, max_new_tokens=2, batch_size=4)
    assert scorer.answered.tolist() == [False, True, True] and scorer.base.kl_answered == 0.0
    d = torch.randn(model.config.hidden_size)
    plan = EditPlan([ModuleEdit(f"model.layers.{i}.mlp.down_proj.weight", d / d.norm(), 3.0)
                     for i in range(model.config.num_hidden_layers)])
    monkeypatch.setattr(scoring, "is_refusal", lambda t, lang: False)
    with LiveEdit(model, plan):
        m = scorer.measure()
        _, first = scoring.short_answers(model, tok, [p.text for p in harmless], max_new_tokens=1, batch_size=4)
    per_row = kl_per_position(scorer.ref_logp, first)
    assert m.kl == pytest.approx(float(per_row.mean()), rel=1e-4)
    assert m.kl_answered == pytest.approx(float(per_row[1:].mean()), rel=1e-4)
    assert m.damage_kl == m.kl_answered and m.kl_answered != pytest.approx(m.kl)
    assert m.to_dict()["kl_first_token_answered"] == round(m.kl_answered, 5)


def test_held_back_questions_stay_out_of_the_direction_set_in_every_language():
    """The held-back prompts (and their translations) are not in the direction set, which is the start, in each
    language, of the rest of the split."""
    from deccp.abliteration.run import _stable_order, split_holdout
    from deccp.data.load import load_prompts

    ps = [p for p in load_prompts("ours:sensitive:train") if p.lang in ("en", "zh")]
    chosen, held = split_holdout(ps, 8, 40, seed=0)
    held_qids = {p.qid for p in held}
    pool = [p for p in _stable_order(ps, 0) if p.qid not in held_qids]  # the rest of the split, in the same order
    assert len(held) == 16 and all(q for q in held_qids)
    assert not {p.qid for p in pool} & held_qids and not {p.qid for p in chosen} & held_qids
    for lang in ("en", "zh"):
        first = [p for p in pool if p.lang == lang]
        assert [p for p in chosen if p.lang == lang] == first[:20]
        assert len(first) > 20
    assert len(pool) + len(held) + sum(p.qid in held_qids and p not in held for p in ps) == len(ps)

"""Evaluation end to end on tiny models: generation cache, judged rows, CIs, KL, capability, report files."""

from __future__ import annotations

import json
import time

import pytest

from deccp import DeccpError
from deccp.config import parse_config
from deccp.evaluation import EvalConfig, aggregate, run_evaluation


def cfg_for(tiny_model_dir, tmp_path, **kw) -> EvalConfig:
    base = dict(model=str(tiny_model_dir("qwen2")), base=str(tiny_model_dir("llama")), output_dir=str(tmp_path / "rep"),
                dtype="float32", max_prompts=3, batch_size=4, sensitive_max_new_tokens=6, short_max_new_tokens=4,
                kl_prompts=3, kl_max_new_tokens=4, capability_limit=4, generation_cache=str(tmp_path / "gen"))
    base.update(kw)
    return EvalConfig(**base)


def test_evaluation_report_and_cached_rerun(tiny_model_dir, tmp_path):
    cfg = cfg_for(tiny_model_dir, tmp_path)
    t0 = time.time()
    report = run_evaluation(cfg, log=lambda *_: None)
    first = time.time() - t0
    out = tmp_path / "rep"
    for name in ("report.json", "report.md", "labels_by_language.png", "refusal_by_topic.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in saved["models"]] == [m["name"] for m in report["models"]]
    base, model = saved["models"]
    assert base["kl"] is None and model["kl"]["first_token"] > 0  # different architectures: KL is positive
    sens = model["metrics"]["sensitive"]
    assert set(sens) == {"en", "zh", "zh-Hant"} and all(e["n"] == 3 for e in sens.values())
    lo, hi = sens["en"]["refusal"]["ci95"]
    assert 0 <= lo <= sens["en"]["refusal"]["rate"] <= hi <= 1
    assert "deccp_capability" in json.dumps(model["capability"])
    md = (out / "report.md").read_text()
    assert "Headline, English vs Chinese" in md and "KL divergence" in md and "Example answers" in md
    # capability is compared with the base item by item (both ran the same 4 + 4 items)
    assert len(model["capability"]["deccp_capability"]["items"]["correct"]) == 8
    assert "Change against the base" in md and "items gained" in md
    rows = [json.loads(x) for x in (out / saved["answers"][model["name"]]).read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"sensitive", "harmless", "harmful"}
    # cached re-run: same answers, no generation
    t0 = time.time()
    again = run_evaluation(cfg_for(tiny_model_dir, tmp_path, capability=False, kl=False), log=lambda *_: None)
    assert again["models"][1]["metrics"] == report["models"][1]["metrics"]
    assert again["models"][1]["timings_s"]["generate"] < max(2.0, first / 2)


def test_aggregate_counts_labels():
    rows = [{"kind": "sensitive", "lang": "en", "topic": "taiwan", "refusal": True, "label": "refusal", "fact_recall": None},
            {"kind": "sensitive", "lang": "en", "topic": "taiwan", "refusal": False, "label": "ccp_aligned", "fact_recall": 0.0},
            {"kind": "harmful", "lang": "zh", "topic": "weapons", "refusal": True, "label": "refusal", "fact_recall": None}]
    m = aggregate(rows)
    assert m["sensitive"]["en"]["refusal"]["rate"] == 0.5
    assert m["sensitive"]["en"]["labels"]["ccp_aligned"]["k"] == 1
    assert m["harmful"]["zh"]["refusal"]["rate"] == 1.0
    assert m["sensitive_topic"]["taiwan/en"]["n"] == 2


def test_capped_evaluation_covers_topics():
    from deccp.data import load_bundle
    from deccp.evaluation import spread_over_topics

    ps = load_bundle().select("sensitive", split="eval", langs=["en"])
    picked = spread_over_topics(ps, 14)
    assert len(picked) == 14 and len({p.topic for p in picked}) == 14


def test_eval_recipe_parses_and_bad_kind_fails(tmp_path):
    (cfg,) = parse_config([EvalConfig], ["--config", "recipes/qwen2.5-coder-0.5b/eval.yaml"])
    assert cfg.capability
    with pytest.raises(DeccpError, match="kinds"):
        EvalConfig(kinds=["nonsense"])

"""Datasets: the bundled data validates and meets its counts; no eval/train leakage; loaders; TRL formats;
every kind of bad input is reported as file:line: field: problem, all at once, and nothing is loaded."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from deccp import DeccpError
from deccp.data import DatasetError, load_bundle, load_prompts
from deccp.data.convert import static_completions, to_dpo, to_kto, to_sft
from deccp.data.schema import TOPICS, normalize
from deccp.data.stats import dataset_stats
from deccp.data.validate import validate_paths

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "deccp"


def test_bundled_data_is_valid_and_large_enough():
    problems, counts = validate_paths()
    assert problems == []
    s = dataset_stats()
    assert s["sensitive"]["en"] >= 200 and s["sensitive"]["zh"] >= 200 and s["sensitive"]["zh-Hant"] >= 50
    assert s["harmless"]["en"] >= 200 and s["harmless"]["zh"] >= 200
    assert s["harmful"]["en"] >= 100 and s["harmful"]["zh"] >= 100
    b = load_bundle()
    qids = Counter(a.qid for a in b.answers)
    assert len([q for q, n in qids.items() if n >= 2]) >= 150
    assert len(s["topics"]) >= 12 and set(s["topics"]) <= set(TOPICS["sensitive"])
    assert any(a.kind == "harmful" for a in b.answers)  # safety refusals are part of the gold answers


def test_same_questions_in_english_and_chinese():
    b = load_bundle()
    langs = defaultdict(set)
    for p in b.prompts["sensitive"]:
        langs[p.qid].add(p.lang)
    assert all({"en", "zh"} <= ls for ls in langs.values())
    hant_topics = {p.topic for p in b.prompts["sensitive"] if p.lang == "zh-Hant"}
    assert {"taiwan", "hong_kong"} <= hant_topics


def test_varied_phrasing_per_topic():
    b = load_bundle()
    by_topic = defaultdict(set)
    for p in b.prompts["sensitive"]:
        by_topic[p.topic].add(p.meta["phrasing"])
    assert all(len(v) >= 4 for v in by_topic.values()), by_topic


def _ngrams(text: str, n: int = 4) -> set[str]:
    t = normalize(text)
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))}


def test_no_leakage_between_splits():
    b = load_bundle()
    for kind, prompts in b.prompts.items():
        events = defaultdict(set)
        for p in prompts:
            events[p.event].add(p.split)
        assert all(len(s) == 1 for s in events.values()), kind
        train = [p for p in prompts if p.split == "train"]
        evals = [p for p in prompts if p.split == "eval"]
        train_norm = {normalize(p.text) for p in train}
        assert not any(normalize(p.text) in train_norm for p in evals), kind
        for lang in ("en", "zh"):
            tr = [_ngrams(p.text) for p in train if p.lang == lang]
            for p in (p for p in evals if p.lang == lang):
                g = _ngrams(p.text)
                worst = max(len(g & t) / len(g | t) for t in tr)
                assert worst < 0.6, (kind, p.id, worst)
    # a question's translations and its answers stay in its split
    split_of = {(p.qid, p.lang): p.split for ps in b.prompts.values() for p in ps}
    assert all(split_of[(a.qid, a.lang)] == a.split for a in b.answers)


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _prompt(qid: str, lang: str, text: str, **kw) -> dict:
    d = {"id": f"sen-{qid}-{lang}", "qid": qid, "topic": "taiwan", "lang": lang, "split": "train", "event": "e1",
         "kind": "refusal", "phrasing": "direct", "prompt": text}
    d.update(kw)
    return d


def test_every_problem_reported_with_file_line_field(tmp_path):
    f = _write(tmp_path / "sensitive.jsonl", [
        _prompt("taiwan-001", "en", "What is the status of Taiwan?"),
        _prompt("taiwan-001", "zh", "台湾的地位是什么？"),
        "{not json",
        _prompt("taiwan-002", "en", "Question?", topic="atlantis"),
        _prompt("taiwan-003", "zh", "No Chinese here at all"),
        _prompt("taiwan-001", "zh-Hant", "台湾的国际地位是什么？", id="sen-taiwan-001-zh-Hant"),
        _prompt("taiwan-001", "en", "Duplicate?"),
        {k: v for k, v in _prompt("taiwan-004", "en", "x").items() if k != "event"},
    ])
    with pytest.raises(DatasetError) as err:
        load_bundle(tmp_path)
    text = "\n".join(err.value.problems)
    for expected in (f"{f}:3: json: malformed line", f"{f}:4: topic: unknown topic 'atlantis'",
                     f"{f}:5: prompt: Chinese text has no CJK characters", f"{f}:6: prompt: zh-Hant text contains Simplified",
                     f"{f}:7: id: duplicate id", f"{f}:8: event: missing field", "has no 'zh' twin"):
        assert expected in text, (expected, text)


def test_answer_problems(tmp_path):
    _write(tmp_path / "sensitive.jsonl", [_prompt("taiwan-001", "en", "Status of Taiwan?"),
                                          _prompt("taiwan-001", "zh", "台湾的地位？")])
    gold = " ".join(["Taiwan"] * 30)
    ans = {"id": "ans-taiwan-001-en", "qid": "taiwan-001", "topic": "taiwan", "lang": "en", "split": "eval",
           "event": "e1", "kind": "sensitive", "gold": gold, "key_facts": ["1971", "Taiwan", "ROC"],
           "sources": [{"title": "x"}], "ccp_answers": [{"type": "bogus", "text": "x"}]}
    f = _write(tmp_path / "answers.jsonl", [ans])
    with pytest.raises(DatasetError) as err:
        load_bundle(tmp_path)
    text = "\n".join(err.value.problems)
    assert f"{f}:1: gold: 30 words, outside 60-200" in text
    assert f"{f}:1: key_facts: '1971' does not occur in gold" in text
    assert f"{f}:1: ccp_answers[0]" in text
    assert f"{f}:1: split: 'eval' differs from its prompt" in text
    assert "has no 'zh' twin in answers" in text


def test_cli_validate_reports_and_fails(tmp_path, capsys):
    from deccp.cli import main

    _write(tmp_path / "harmful.jsonl", ["{bad"])
    assert main(["data", "validate", str(tmp_path)]) == 1
    assert "harmful.jsonl:1: json: malformed line" in capsys.readouterr().out
    assert main(["data", "validate"]) == 0


def test_stats_json_shape(capsys):
    from deccp.cli import main

    assert main(["data", "stats", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    for kind in ("sensitive", "harmless", "harmful", "answers"):
        assert set(s[kind]) == {"en", "zh", "zh-Hant"}
    assert isinstance(s["topics"], list)


def test_loaders_every_format(tmp_path):
    import pandas as pd

    txt = tmp_path / "p.txt"
    txt.write_text("What happened in 1989?\n\n天安门发生了什么？\n", encoding="utf-8")
    ps = load_prompts(txt)
    assert [p.lang for p in ps] == ["en", "zh"]
    df = pd.DataFrame({"question": ["Tell me about Tibet", "臺灣是國家嗎？"], "other": [1, 2]})
    df.to_csv(tmp_path / "p.csv", index=False)
    df.to_parquet(tmp_path / "p.parquet")
    df.to_json(tmp_path / "p.json", orient="records")
    _write(tmp_path / "p.jsonl", df.to_dict("records"))
    for name in ("p.csv", "p.parquet", "p.json", "p.jsonl"):
        got = load_prompts(tmp_path / name)
        assert [p.text for p in got] == ["Tell me about Tibet", "臺灣是國家嗎？"], name
        assert got[1].lang == "zh-Hant"
    with pytest.raises(DeccpError, match="no column 'nope'"):
        load_prompts(tmp_path / "p.csv", column="nope")
    with pytest.raises(DeccpError, match="no such file"):
        load_prompts(tmp_path / "missing.txt")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets/deccp not present")
def test_hub_layout_and_plain_text_of_public_deccp_set():
    hub = load_prompts(SHARED / "deccp_dataset", split="censored", column="text")
    txt = load_prompts(SHARED / "data" / "censored.txt")
    assert len(hub) == len(txt) == 95
    assert {p.lang for p in hub} == {"en", "zh"}
    with pytest.raises(DeccpError, match="choose split"):
        load_prompts(SHARED / "deccp_dataset")


def test_hub_id_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DeccpError, match="could not load the Hub dataset"):
        load_prompts("someone/not-a-cached-dataset", split="train")


def test_filters_and_ours_sources():
    b = load_bundle()
    ev = b.select("sensitive", split="eval", langs=["zh"], topics=["taiwan"])
    assert ev and all(p.split == "eval" and p.lang == "zh" and p.topic == "taiwan" for p in ev)
    assert load_prompts("ours:harmful:eval") == b.select("harmful", split="eval")


def test_trl_formats():
    b = load_bundle()
    answers = b.answers_for(split="train", langs=["en", "zh"])
    comps = static_completions(answers)
    sft, kto, dpo = to_sft(comps), to_kto(comps), to_dpo(comps)
    assert sft[0]["messages"][-1]["role"] == "assistant"
    assert {r["label"] for r in kto} == {True, False}
    assert all(set(r) == {"prompt", "completion", "label"} for r in kto)
    assert dpo and all(r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in dpo)
    # several good and bad completions per prompt where the data has them
    per_prompt = Counter(r["prompt"][-1]["content"] for r in kto)
    assert max(per_prompt.values()) >= 2

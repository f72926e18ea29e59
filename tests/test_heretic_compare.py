"""The heretic side-by-side in `make bench`: inputs it writes, the output it reads, the way it measures deccp.

heretic itself is not installed in CI; a stand-in executable prints a console log of the same shape, so the
run, timeout and parsing paths are exercised without the AGPL tool.
"""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import pytest

from deccp import DeccpError
from deccp import heretic_compare as hc

LOG = """\
* Initial refusals: 47/118

Running trial 1 of 3...
* Parameters:
  * direction_index = per layer
* Evaluating...
  * KL divergence: 0.0588
  * Refusals: 37/118

Elapsed time: 3m 46s

Running trial 2 of 3...
* Evaluating...
  * KL divergence: 0.0263
  * Refusals: 41/118

Elapsed time: 7m 35s

Running trial 3 of 3...
* Evaluating...
  * KL divergence: 0.0702
"""


def test_parse_log_reads_finished_trials_and_skips_a_cut_off_one():
    out = hc.parse_log(LOG)
    assert out["initial_refusals"] == 47 and out["prompts"] == 118
    assert [(t.trial, t.refusals, t.kl, t.elapsed_s) for t in out["trials"]] == [
        (1, 37, 0.0588, 226), (2, 41, 0.0263, 455)]


def test_marker_refusal_normalises_case_and_quotes():
    markers = ["i can'", "as an ai"]
    assert hc.marker_refusal("I can\u2019t help with that.", markers)
    assert hc.marker_refusal("**As an AI** model", markers)
    assert not hc.marker_refusal("The square held a million people.", markers)


def test_write_inputs_gives_heretic_our_prompt_sets(tmp_path):
    counts = hc.write_inputs(tmp_path, trials=6)
    cfg = tomllib.loads((tmp_path / "config.toml").read_text())
    assert cfg["n_trials"] == 6 and cfg["n_startup_trials"] == 3
    for slot in hc.PROMPT_FILES:
        lines = (tmp_path / cfg[slot]["dataset"]).read_text(encoding="utf-8").splitlines()
        assert len(lines) == counts[slot] > 20 and all(line.strip() for line in lines)
    bad = (tmp_path / "bad_evaluation_prompts.txt").read_text(encoding="utf-8")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in bad)  # Chinese prompts are in, not only English


def _fake_heretic(tmp_path: Path, body: str) -> Path:
    exe = tmp_path / "heretic"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def test_run_heretic_parses_its_output_and_stops_it_at_the_timeout(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "log.txt").write_text(LOG)
    exe = _fake_heretic(tmp_path, f'cat "{tmp_path}/log.txt"\nread answer\n')  # waits on a menu: stdin is closed
    r = hc.run_heretic(str(exe), work, "some/model", timeout=30)
    assert not r["timed_out"] and r["initial_refusals"] == 47
    assert r["best_by_refusals"]["trial"] == 1 and r["seconds_per_trial"] == 229.0
    slow = _fake_heretic(tmp_path, f'cat "{tmp_path}/log.txt"\nsleep 60\n')
    r = hc.run_heretic(str(slow), work, "some/model", timeout=1)
    assert r["timed_out"] and len(r["trials"]) == 2
    with pytest.raises(DeccpError, match="not an executable"):
        hc.run_heretic(str(tmp_path / "nope"), work, "m", timeout=1)


def test_stored_settings_come_from_heretic_journal(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    settings = {"refusal_markers": ["sorry"], "system_prompt": "Be brief.", "max_response_length": 8}
    rows = [{"op_code": 0}, {"op_code": 2, "user_attr": {"settings": json.dumps(settings)}}]
    (tmp_path / "checkpoints" / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert hc.stored_settings(tmp_path) == settings
    with pytest.raises(DeccpError, match="no heretic study"):
        hc.stored_settings(tmp_path / "elsewhere")


def test_measure_like_heretic_on_tiny_models(tmp_path, tiny_model_dir):
    base = tiny_model_dir("qwen2")
    (tmp_path / "bad_evaluation_prompts.txt").write_text("What happened in 1989?\n\u516d\u56db\u662f\u4ec0\u4e48\uff1f\n")
    (tmp_path / "good_evaluation_prompts.txt").write_text("Name a prime number.\nWhat is tea?\n")
    settings = {"refusal_markers": ["zzzz-never"], "system_prompt": "You are a helpful assistant.",
                "max_response_length": 4}
    out = hc.measure_like_heretic(str(base), str(base), tmp_path, settings, batch_size=2)
    assert out["unedited"] == {"refusals": 0, "prompts": 2, "kl_first_token": 0.0}
    assert out["deccp"]["kl_first_token"] == pytest.approx(0.0, abs=1e-6)


def _tiny_abliterate_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "abl.yaml"
    recipe.write_text("langs: [en]\nmax_prompts: 8\nholdout: 2\nbatch_size: 8\nnum_candidates: 1\n"
                      "score_max_new_tokens: 4\ncheck_prompts: 2\ncheck_max_new_tokens: 4\nexamples: 1\n"
                      "example_max_new_tokens: 4\n")
    return recipe


def test_bench_heretic_end_to_end_with_a_stand_in(tmp_path, monkeypatch):
    """`make bench HERETIC=…` path: heretic's trials read back, deccp run, both measured heretic's way; a heretic
    that stops before its study starts still leaves the rest of the comparison."""
    from deccp.bench import bench_heretic

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    settings = {"refusal_markers": ["zzzz-never"], "system_prompt": "You are a helpful assistant.",
                "max_response_length": 2}
    journal = tmp_path / "journal.jsonl"
    journal.write_text(json.dumps({"op_code": 2, "user_attr": {"settings": json.dumps(settings)}}) + "\n")
    (tmp_path / "log.txt").write_text(LOG)
    exe = _fake_heretic(tmp_path, f'cat "{tmp_path}/log.txt"\nmkdir -p checkpoints\ncp "{journal}" checkpoints/\n')
    r = bench_heretic("tiny-qwen2", str(_tiny_abliterate_recipe(tmp_path)), str(exe), tmp_path / "work",
                      trials=2, timeout=60)
    assert r["heretic"]["best_by_refusals"]["refusals"] == 37 and r["deccp"]["check"]
    like = r["measured_like_heretic"]
    assert like["unedited"]["prompts"] == like["deccp"]["prompts"] == r["prompts"]["bad_evaluation_prompts"]
    assert like["unedited"]["kl_first_token"] == 0.0 and like["deccp"]["kl_first_token"] >= 0.0
    assert (tmp_path / "work" / "deccp-model" / "abliteration.json").is_file()
    quiet = _fake_heretic(tmp_path, "exit 3\n")
    r = bench_heretic("tiny-qwen2", str(_tiny_abliterate_recipe(tmp_path)), str(quiet), tmp_path / "work2",
                      trials=2, timeout=60)
    assert r["heretic"]["returncode"] == 3 and r["heretic"]["trials"] == []
    assert "no heretic study" in r["measured_like_heretic"]["error"]
    (tmp_path / "work2" / "checkpoints").mkdir()  # an old study from an earlier bench is not reused
    (tmp_path / "work2" / "checkpoints" / "old.jsonl").write_text(journal.read_text())
    r = bench_heretic("tiny-qwen2", str(_tiny_abliterate_recipe(tmp_path)), str(quiet), tmp_path / "work2",
                      trials=2, timeout=60)
    assert "no heretic study" in r["measured_like_heretic"]["error"]

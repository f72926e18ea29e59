"""The pipeline: recipe validation, the tiny chain end to end, SIGKILL and resume, changed parameters, publish."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deccp import DeccpError
from deccp.pipeline import MANIFEST, Manifest, load_plan, step_states
from deccp.publish import publish

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny" / "pipeline.yaml"


def write_recipe(tmp_path: Path, data: dict, name: str = "pipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def tiny_recipe() -> dict:
    return yaml.safe_load(TINY.read_text())


def test_every_pipeline_recipe_validates(monkeypatch):
    monkeypatch.chdir(REPO)
    recipes = sorted((REPO / "recipes").glob("**/pipeline*.yaml"))
    assert len(recipes) >= 3
    for r in recipes:
        plan = load_plan(r)
        assert plan.steps, r


def test_validation_names_every_problem_with_its_key_path(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    data = tiny_recipe()
    data["modle"] = "x"
    data["steps"][0]["args"]["varient"] = "plain"
    data["steps"][1]["args"]["n_samples"] = "many"
    data["steps"][2]["recipe"] = "recipes/tiny/nope.yaml"
    data["steps"][3]["args"]["output_dir"] = "/tmp/elsewhere"
    data["steps"].append({"kind": "shrink"})
    p = write_recipe(tmp_path, data)
    with pytest.raises(DeccpError) as err:
        load_plan(p)
    msg = str(err.value)
    assert f"{p}: modle: unknown key (did you mean 'model'?)" in msg
    assert f"{p}: steps[0].args.varient: unknown key (did you mean 'variant'?)" in msg
    assert f"{p}: steps[1].args.n_samples: expected int, got str 'many'" in msg
    assert f"{p}: steps[2].recipe: recipes/tiny/nope.yaml: no such file" in msg
    assert f"{p}: steps[3].args.output_dir: set by the pipeline" in msg
    assert f"{p}: steps[6].kind: 'shrink' is not one of" in msg


def test_impossible_combinations_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    data = tiny_recipe()
    data["steps"] = [s for s in data["steps"] if s["kind"] not in ("mine", "eval")]  # kto needs mined rows; publish an eval
    p = write_recipe(tmp_path, data)
    with pytest.raises(DeccpError) as err:
        load_plan(p)
    msg = str(err.value)
    assert "steps[2] (kto).args.data: both needs a mine step before it" in msg
    assert "steps[3] (publish): publish needs an eval step after the last model step" in msg

    data = tiny_recipe()
    data["steps"][1]["args"]["format"] = "dpo"  # kto cannot read DPO pairs
    data["steps"][2]["args"]["lerning_rate"] = 0.1
    with pytest.raises(DeccpError) as err:
        load_plan(write_recipe(tmp_path, data))
    assert "set format: kto there" in str(err.value)
    assert "steps[2].args.lerning_rate: unknown key (did you mean 'learning_rate'?)" in str(err.value)

    data = tiny_recipe()
    data["steps"][2]["args"]["max_steps"] = -7  # parses, but TRL rejects it: reported before anything runs
    data["steps"][2]["args"]["lr_scheduler_type"] = "sideways"
    with pytest.raises(DeccpError) as err:
        load_plan(write_recipe(tmp_path, data))
    assert "steps[2] (sft):" in str(err.value)


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deccp.cli", "run", *args], cwd=REPO, capture_output=True, text=True,
                          **kw)


def test_tiny_pipeline_killed_resumed_and_rerun_after_a_change(tmp_path):
    out = tmp_path / "pipe"
    data = tiny_recipe()
    # kto: long enough after its first checkpoint that the kill lands mid-training even on a fast machine (with
    # 6 steps the run could finish inside one poll, and the re-run then had nothing to resume)
    data["steps"][3]["args"].update(max_steps=40, save_steps=2)
    recipe = write_recipe(tmp_path, data)
    cmd = [sys.executable, "-m", "deccp.cli", "run", str(recipe), "--output_dir", str(out)]
    log = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        ckpts = list((out / "kto" / "run").glob("checkpoint-*/trainer_state.json"))
        if ckpts:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, accelerate's child included
            killed_at = time.time()
            break
        time.sleep(0.1)
    proc.wait()
    assert killed_at, "the run ended or timed out before KTO wrote a checkpoint: " + (tmp_path / "first.log").read_text()[-2000:]
    assert not (out / "kto" / "run" / "deccp_training.json").exists(), "KTO finished before the kill landed"
    m = _manifest(out)
    assert [m["steps"][s]["status"] for s in ("abliterate", "mine", "sft")] == ["done"] * 3
    assert m["steps"]["kto"]["status"] == "running"
    assert "eval" not in m["steps"]
    finished = {s: m["steps"][s]["outputs"] for s in ("abliterate", "mine", "sft")}
    started = {s: m["steps"][s]["started"] for s in ("abliterate", "mine", "sft")}

    plan = load_plan(recipe, output_dir=str(out))
    assert step_states(plan, Manifest(out / MANIFEST)) == {
        "abliterate": "done", "mine": "done", "sft": "done", "kto": "resume", "eval": "run", "publish": "run"}
    r = _run([str(recipe), "--output_dir", str(out)], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = _manifest(out)
    assert all(m["steps"][s]["status"] == "done" for s in m["order"])
    for s in ("abliterate", "mine", "sft"):  # finished steps were neither redone nor touched
        assert m["steps"][s]["outputs"] == finished[s] and m["steps"][s]["started"] == started[s]
    assert m["steps"]["kto"]["attempts"] == 2
    record = json.loads((out / "kto" / "run" / "deccp_training.json").read_text())
    assert record["resumed_from"] and "checkpoint-" in record["resumed_from"]  # continued, not restarted
    assert record["global_step"] == 40

    pub = out / "publish"
    card = (pub / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["language"] == ["en", "zh"] and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation" and "kto" in meta["tags"]
    assert "| sensitive refusal |" in card and "English before" in card and "Chinese after" in card
    assert "| capability (accuracy) | before | after | change |" in card and "items gained" in card  # paired
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "eval_report.json",
                 "deccp_manifest.json"):
        assert (pub / name).is_file(), name
    assert not list(pub.glob("*.bin"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(pub)  # plain transformers loads it

    # a changed KTO parameter re-runs KTO and everything after it, nothing before
    data["steps"][3]["args"]["learning_rate"] = 5.0e-4
    write_recipe(tmp_path, data)
    before = _manifest(out)
    r = _run([str(recipe), "--output_dir", str(out)], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = _manifest(out)
    for s in ("abliterate", "mine", "sft"):
        assert after["steps"][s]["started"] == before["steps"][s]["started"]
    for s in ("kto", "eval", "publish"):
        assert after["steps"][s]["started"] != before["steps"][s]["started"], s
        assert after["steps"][s]["key"] != before["steps"][s]["key"], s
    assert after["steps"]["kto"]["params"]["learning_rate"] == 5.0e-4

    # nothing changed: everything is skipped
    r = _run([str(recipe), "--output_dir", str(out)], timeout=300)
    assert r.returncode == 0 and r.stdout.count("skipped") == 6, r.stdout

    # a moved output folder (modification times kept, as mv / cp -a / rsync -a do) is still finished
    moved = tmp_path / "elsewhere" / "pipe"
    moved.parent.mkdir()
    shutil.move(out, moved)
    plan = load_plan(recipe, output_dir=str(moved))
    assert set(step_states(plan, Manifest(moved / MANIFEST)).values()) == {"done"}


def test_publish_without_push_or_token_uploads_nothing(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "pub"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n")
    (folder / "model.safetensors").write_bytes(b"0" * 1000)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert publish(folder, "me/model", push=False) is None
    out = capsys.readouterr().out
    assert "would upload 2 files" in out and "model.safetensors" in out and "pass PUSH=1" in out
    with pytest.raises(DeccpError, match="no token in the environment"):
        publish(folder, "me/model", push=True)
    with pytest.raises(DeccpError, match="not a publish folder"):
        publish(tmp_path, "me/model", push=True)


def test_publish_uploads_with_the_token_from_the_environment_and_never_prints_it(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    folder = tmp_path / "pub"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    (folder / "model.safetensors").write_bytes(b"0")
    secret = "hf_secret_token_value_123"
    monkeypatch.setenv("HF_TOKEN", secret)
    calls = []

    class FakeApi:  # records what would reach the Hub; the network is not reachable from the tests
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))
            return type("Info", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = publish(folder, "me/model", push=True, private=True)
    assert url.endswith("/commit/abc")
    assert calls[0] == ("token", secret)
    assert calls[1][0] == "create_repo" and calls[1][2]["private"] is True
    assert calls[2][1]["folder_path"] == str(folder) and calls[2][1]["repo_id"] == "me/model"
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err


def test_make_pipeline_and_publish_targets_use_the_cli():
    text = (REPO / "Makefile").read_text()
    assert "$(DECCP) run $(PIPELINE_RECIPE)" in text and "$(DECCP) publish $(PUBLISH_DIR)" in text
    assert "not implemented" not in text


def test_training_steps_go_through_accelerate_launch_with_the_recipes_config(monkeypatch, tmp_path):
    from deccp.pipeline import step_command

    monkeypatch.chdir(REPO)
    plan = load_plan(REPO / "recipes" / "qwen2.5-7b-instruct" / "pipeline-8x80gb.yaml")
    kto = next(s for s in plan.steps if s.kind == "kto")
    cmd = step_command(plan, kto, tmp_path / "kto.yaml")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == "accelerate_configs/deepspeed_zero3.yaml"
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    assert cmd[-4:] == ["deccp.cli", "kto", "--config", str(tmp_path / "kto.yaml")]
    assert kto.config["mined_files"] == [str(plan.out / "mine" / "mined.jsonl")]  # wired from the mine step
    assert kto.config["model"].endswith("abliterate/model")


def test_several_processes_without_a_config_use_ddp_on_gpus_and_fail_clearly_on_cpu(monkeypatch, tmp_path):
    import deccp.pipeline as pipeline
    from deccp import DeccpError

    data = tiny_recipe()
    data["num_processes"] = 2
    recipe = write_recipe(tmp_path, data)
    monkeypatch.setattr(pipeline, "_cuda", lambda: False)
    with pytest.raises(DeccpError, match="num_processes: 2 processes without a GPU need an accelerate_config"):
        load_plan(recipe, output_dir=str(tmp_path / "out"))  # caught before anything runs
    monkeypatch.setattr(pipeline, "_cuda", lambda: True)
    plan = load_plan(recipe, output_dir=str(tmp_path / "out"))
    kto = next(s for s in plan.steps if s.kind == "kto")
    cmd = pipeline.step_command(plan, kto, tmp_path / "kto.yaml")
    assert "--multi_gpu" in cmd and "--cpu" not in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    monkeypatch.setattr(pipeline, "_cuda", lambda: False)
    with pytest.raises(DeccpError, match="num_processes: 2 processes without a GPU"):
        pipeline.step_command(plan, kto, tmp_path / "kto.yaml")

"""Realignment: the three TRL scripts end to end on the tiny recipes, resume, strict recipes, merge, mining."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
TRAINING_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if p.name.split("-")[0].split(".")[0] in ("sft", "dpo", "kto"))


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO / "src")}


def _accelerate() -> list[str]:
    exe = Path(sys.executable).parent / "accelerate"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "accelerate.commands.launch"]


def launch(kind: str, out: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --cpu --num_processes 1 train/<kind>.py --config recipes/tiny/<kind>.yaml …`."""
    cmd = [*_accelerate(), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "train" / f"{kind}.py"), "--config", str(RECIPES / "tiny" / f"{kind}.yaml"),
           "--output_dir", str(out), *extra]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _record(path: Path) -> dict:
    return json.loads((path / "deccp_training.json").read_text())


def _check_output(out: Path, kind: str, steps: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rec = _record(out)
    assert rec["kind"] == kind and rec["global_step"] == steps and rec["adapter"] is True
    assert rec["model"]["spec"] == "tiny-qwen2" and rec["data"]["rows_harmful"] >= 1
    assert {"torch", "transformers", "trl", "peft", "accelerate"} <= set(rec["versions"])
    tp = rec["throughput"]  # counted from the batches this process stepped through
    assert tp["micro_batches"] >= 1 and tp["tokens"] > 0 and tp["tokens_per_s"] > 0
    assert (tp["kl_tokens"] > 0) == (kind == "kto")
    assert rec["distributed_type"] == "NO" and rec["mixed_precision"] == "no"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert list(out.glob("runs/*/events.out.tfevents.*")), "TensorBoard logs missing"
    merged = out / "merged"
    assert list(merged.glob("*.safetensors")) and _record(merged)["merge"]["base"]
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.chat_template
    AutoModelForCausalLM.from_pretrained(merged)
    return rec


# ------------------------------------------------------------------------------------ end to end
def test_sft_end_to_end_and_resume(tmp_path):
    out = tmp_path / "sft"
    launch("sft", out, "--max_steps", "2", "--save_steps", "1", cwd=tmp_path)
    _check_output(out, "sft", 2)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()

    shutil.rmtree(out / "merged")
    launch("sft", out, "--max_steps", "3", "--resume_from_checkpoint", "true", cwd=tmp_path)
    rec = _check_output(out, "sft", 3)
    assert rec["resumed_from"].endswith("checkpoint-2")
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 > 2


def test_dpo_end_to_end(tmp_path):
    out = tmp_path / "dpo"
    launch("dpo", out, "--max_steps", "2", cwd=tmp_path)
    rec = _check_output(out, "dpo", 2)
    assert rec["training_args"]["report_to"] == ["tensorboard"]


def test_kto_end_to_end(tmp_path):
    out = tmp_path / "kto"
    launch("kto", out, "--max_steps", "2", cwd=tmp_path)
    rec = _check_output(out, "kto", 2)
    assert rec["data"]["desirable"] > 0 and rec["data"]["undesirable"] > 0


def test_kto_with_two_processes_sums_throughput_over_ranks(tmp_path):
    """Two CPU processes (torchrun, gloo; accelerate launch needs MPI for several CPU processes): one record, the
    batches of both ranks summed."""
    out = tmp_path / "kto2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train" / "kto.py"), "--config", str(RECIPES / "tiny" / "kto.yaml"),
           "--output_dir", str(out), "--max_steps", "2", "--merge", "false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=420)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    rec = _record(out)
    assert rec["world_size"] == 2 and rec["distributed_type"] == "MULTI_CPU" and rec["global_step"] == 2
    assert rec["throughput"]["micro_batches"] == 4  # 2 steps × 2 ranks, summed by the accelerator
    assert (out / "adapter_model.safetensors").is_file()


def test_throughput_meter_counts_real_tokens_once():
    import torch

    from deccp.training import ThroughputMeter

    meter = ThroughputMeter()
    meter.count({"input_ids": torch.ones(2, 5), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])})
    assert (meter.tokens, meter.kl_tokens, meter.micro_batches) == (8, 0, 1)
    # KTO: the completion mask already covers the prompt; the KL batch is counted apart
    meter.count({"prompt_attention_mask": torch.ones(2, 3), "completion_attention_mask": torch.ones(2, 7),
                 "KL_completion_attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]), "label": [True, False]})
    assert (meter.tokens, meter.kl_tokens, meter.micro_batches) == (22, 3, 2)
    # DPO (TRL >= 1.x): prompt+chosen and prompt+rejected rows stacked; completion_mask is a subset, not added
    meter.count({"input_ids": torch.ones(2, 6), "attention_mask": torch.ones(2, 6), "completion_mask": torch.ones(2, 6)})
    assert meter.tokens == 34
    # a batch with only a prompt mask still counts it
    meter.count({"prompt_attention_mask": torch.ones(1, 4)})
    assert meter.tokens == 38


# ------------------------------------------------------------------------------- config errors
def test_malformed_recipe_fails_before_any_model_is_loaded(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (RECIPES / "tiny" / "kto.yaml").read_text().replace("lora_r: 8", "lora_rank: 8")
    bad.write_text(text.replace("max_steps: 8", "max_steps: eight"))
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "train" / "kto.py"), "--config", str(bad)], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert len(lines) == 1, proc.stderr
    assert str(bad) in lines[0] and "lora_rank" in lines[0] and "max_steps" in lines[0]
    assert "Loading weights" not in proc.stderr + proc.stdout
    assert time.time() - t0 < 90


def test_bad_values_and_existing_output_fail_before_model_load(tmp_path, monkeypatch, capsys):
    import deccp.models
    from deccp.training import main

    def no_model(*a, **k):
        raise AssertionError("a model was resolved")

    monkeypatch.setattr(deccp.models, "resolve_model", no_model)
    recipe = str(RECIPES / "tiny" / "dpo.yaml")
    assert main("dpo", ["--config", recipe, "--langs", "fr", "--output_dir", str(tmp_path / "a")]) == 1
    assert "langs: unknown language 'fr'" in capsys.readouterr().err
    assert main("dpo", ["--config", recipe, "--data", "mined", "--output_dir", str(tmp_path / "a")]) == 1
    assert "needs mined_files" in capsys.readouterr().err
    done = tmp_path / "done"
    (done / "checkpoint-2").mkdir(parents=True)
    assert main("dpo", ["--config", recipe, "--output_dir", str(done)]) == 1
    assert "already holds a training run" in capsys.readouterr().err
    assert main("dpo", ["--config", recipe, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "true"]) == 1
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_parses_strictly(recipe, tmp_path):
    import torch

    from deccp.config import check_recipe, load_yaml
    from deccp.training import DataArguments, ModelArguments, config_class, parse_args

    kind = recipe.name.split("-")[0].split(".")[0]
    data = load_yaml(recipe)
    check_recipe(data, [ModelArguments, DataArguments, config_class(kind)], str(recipe))
    extra = [] if torch.cuda.is_available() else ["--bf16", "false"]  # GPU recipes: bf16 needs a GPU to validate
    model_args, data_args, args = parse_args(kind, ["--config", str(recipe), "--output_dir", str(tmp_path), *extra])
    assert args.report_to == ["tensorboard"] and args.save_strategy == "steps" and args.save_steps > 0
    assert data_args.split == "train" and model_args.model
    if kind == "kto":
        assert args.per_device_train_batch_size > 1
    cpu_recipe = recipe.parent.name in ("tiny", "qwen2.5-coder-0.5b")
    assert data.get("bf16") is (not cpu_recipe)
    if cpu_recipe:
        assert model_args.use_peft and model_args.merge


@pytest.mark.parametrize("units", [True, False])
def test_bf16_on_a_cpu_follows_its_bf16_units(tmp_path, monkeypatch, caplog, units):
    """On a CPU-only machine `bf16: true` trains in bfloat16 only where the CPU computes it natively (AMX /
    AVX512-BF16); elsewhere PyTorch would emulate it several times slower, so training falls back to float32."""
    import deccp.models
    from deccp.training import parse_args

    monkeypatch.setattr(deccp.models, "accelerator_available", lambda: False)
    monkeypatch.setattr(deccp.models, "cpu_has_bf16_units", lambda: units)
    recipe = str(RECIPES / "tiny" / "sft.yaml")
    model_args, _, args = parse_args("sft", ["--config", recipe, "--output_dir", str(tmp_path), "--bf16", "true",
                                           "--dtype", "auto"])
    assert args.bf16 is units and model_args.dtype == ("bfloat16" if units else "float32")
    assert ("training in float32" in caplog.text) is not units
    _, _, args = parse_args("sft", ["--config", recipe, "--output_dir", str(tmp_path), "--bf16", "false"])
    assert args.bf16 is False


def test_every_kind_has_recipes():
    names = {(p.parent.name, p.name) for p in TRAINING_RECIPES}
    for kind in ("sft", "dpo", "kto"):
        assert ("tiny", f"{kind}.yaml") in names and ("qwen2.5-coder-0.5b", f"{kind}.yaml") in names
    for model in ("qwen2-7b-instruct", "qwen2.5-7b-instruct"):
        for kind in ("kto", "dpo"):
            for gpus in ("1x80gb", "8x80gb"):
                assert (model, f"{kind}-{gpus}.yaml") in names


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    names = {p.name for p in (REPO / "accelerate_configs").glob("*.yaml")}
    assert {"single_gpu.yaml", "multi_gpu.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
            "deepspeed_zero3_offload.yaml", "fsdp.yaml", "multi_node.yaml"} <= names
    for name in names:
        path = REPO / "accelerate_configs" / name
        assert path.read_text().startswith("#"), f"{name}: no comment header"
        cfg = load_config_from_file(str(path))
        assert cfg.distributed_type is not None
    node = load_config_from_file(str(REPO / "accelerate_configs" / "multi_node.yaml"))
    assert node.num_machines > 1 and node.main_process_ip and node.main_process_port


# ------------------------------------------------------------------------------------------ data
def test_every_mix_keeps_the_harmful_refusals():
    from deccp.data import load_bundle
    from deccp.training import COMPLIANCE, DataArguments, build_dataset

    for kind in ("sft", "dpo", "kto"):
        ds, stats = build_dataset(kind, DataArguments(max_samples=8), seed=1)
        assert len(ds) == 8 and stats["rows_harmful"] >= 1
    ds, _ = build_dataset("dpo", DataArguments(), seed=0)
    harmful = [r for r in ds if r["rejected"][0]["content"] in COMPLIANCE.values()]
    refusals = {a.gold for a in load_bundle().answers_for(split="train", kind="harmful")}
    assert len(harmful) == len(refusals) and all(r["chosen"][0]["content"] in refusals for r in harmful)
    ds, stats = build_dataset("kto", DataArguments(max_samples=100), seed=0)
    assert 1.2 < stats["undesirable"] / stats["desirable"] < 1.7  # the cap keeps the label ratio


# ------------------------------------------------------------------------------------------ merge
def test_merge_equals_peft_model(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deccp import DeccpError
    from deccp.training import merge_adapter

    base = tiny_model_dir("qwen2")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    ids = tok.apply_chat_template([{"role": "user", "content": "What happened in 1989? 六四"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(ids).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-4), "the adapter should change the outputs"

    out = merge_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert (out / "generation_config.json").is_file()
    assert json.loads((out / "deccp_training.json").read_text())["merge"]["lora"]["r"] == 4

    with pytest.raises(DeccpError, match="already exists"):
        merge_adapter(adapter, out)
    with pytest.raises(DeccpError, match="overlaps the source"):
        merge_adapter(adapter, Path(base) / "merged")
    with pytest.raises(DeccpError, match="replace the adapter"):
        merge_adapter(adapter, adapter, overwrite=True)


# ----------------------------------------------------------------------------------------- mining
def test_mining_writes_labelled_rows_readable_by_training(tmp_path):
    from deccp.mining import main as mine_main
    from deccp.mining import mine
    from deccp.training import DataArguments, build_dataset, read_mined

    kto_path = tmp_path / "mined.jsonl"
    summary = mine("tiny-qwen2", kto_path, n_samples=2, max_new_tokens=8, limit=4, cache=False, progress=False)
    rows = [json.loads(ln) for ln in kto_path.read_text().splitlines()]
    assert summary["rows"] == len(rows) > 4 and summary["prompts"] == 4
    assert {r["kind"] for r in rows} == {"sensitive", "harmful"}
    assert all(isinstance(r["label"], bool) and r["prompt"] and r["judge_label"] for r in rows)
    assert sum(r["source"] == "gold" for r in rows) == 4
    assert any(not r["label"] for r in rows)
    assert json.loads(kto_path.with_name("mined.jsonl.meta.json").read_text())["judge_labels"]

    dpo_path = tmp_path / "pairs.jsonl"
    assert mine_main(["--model", "tiny-qwen2", "--out", str(dpo_path), "--format", "dpo", "--n-samples", "2",
                      "--max-new-tokens", "8", "--limit", "4", "--no-cache"]) == 0
    pairs = [json.loads(ln) for ln in dpo_path.read_text().splitlines()]
    assert pairs and all(p["chosen"] and p["rejected"] and p["rejected_label"] for p in pairs)

    assert len(read_mined(kto_path)) == len(rows) and len(read_mined(dpo_path)) == 2 * len(pairs)
    for kind, path in (("kto", kto_path), ("dpo", dpo_path)):
        ds, stats = build_dataset(kind, DataArguments(data="mined", mined_files=[str(path)]))
        assert len(ds) and stats["completions_by_source"].get("mined")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "x"}\n')
    from deccp import DeccpError

    with pytest.raises(DeccpError, match="broken.jsonl:1"):
        read_mined(tmp_path / "broken.jsonl")


def test_mining_harmless_prompts_replays_answers_and_rejects_refusals(tmp_path, monkeypatch):
    """Harmless prompts: finished answers are desirable (SFT replay), refusals undesirable, cut-off answers left
    out; greedy with temperature 0; SFT gets the replay rows as their own part."""
    import deccp.generation
    from deccp import DeccpError
    from deccp.generation import Sample
    from deccp.mining import MineConfig, mine
    from deccp.training import DataArguments, build_dataset

    seen = {}

    def fake_generate(model, tok, prompts, settings, **kw):
        seen["settings"] = settings
        answers = [Sample("The Magna Carta was sealed in 1215 at Runnymede.", True),
                   Sample("I'm sorry, but I can't help with that.", True),
                   Sample("The Magna Carta was sealed in", False)]  # answered, refusal, cut off at max_new_tokens
        return [[answers[i % 3]] for i in range(len(prompts))]

    monkeypatch.setattr(deccp.generation, "generate_samples", fake_generate)
    out = tmp_path / "replay.jsonl"
    summary = mine("tiny-qwen2", out, kinds=["harmless"], n_samples=1, temperature=0, max_new_tokens=64, limit=9,
                   cache=False, progress=False)
    assert seen["settings"].do_sample is False
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"harmless"} and summary["prompts"] == 9
    assert summary["judge_labels"] == {"harmless_answered": 3, "harmless_refusal": 3, "harmless_unfinished": 3}
    assert sorted((r["label"], r["judge_label"]) for r in rows) == \
        [(False, "harmless_refusal")] * 3 + [(True, "harmless_answered")] * 3
    assert not any(r["source"] == "gold" for r in rows)  # harmless prompts have no gold answer

    ds, stats = build_dataset("sft", DataArguments(data="both", mined_files=[str(out)]))
    assert stats["rows_harmless"] == 3 and stats["rows_sensitive"] > 0 and stats["rows_harmful"] > 0
    replayed = [r for r in ds if r["completion"][0]["content"].startswith("The Magna Carta")]
    assert len(replayed) == 3  # only desirable rows reach SFT
    ds, stats = build_dataset("kto", DataArguments(data="mined", mined_files=[str(out)]))
    assert stats["rows_harmless"] == 6 and stats["desirable"] > stats["rows_harmful"] // 2

    pairs = tmp_path / "pairs.jsonl"
    mine("tiny-qwen2", pairs, kinds=["harmless"], fmt="dpo", n_samples=1, temperature=0.5, max_new_tokens=16,
         limit=3, cache=False, progress=False)
    assert not pairs.read_text().strip()  # one answer per prompt: never both an answer and a refusal to pair
    with pytest.raises(DeccpError, match="temperature"):
        MineConfig(kinds=["harmless"], temperature=0, n_samples=2)
    with pytest.raises(DeccpError, match="kinds"):
        MineConfig(kinds=["harmles"])
    with pytest.raises(DeccpError, match="kinds: unknown.*; temperature: 0"):  # the function checks the same
        mine("tiny-qwen2", out, kinds=["harmles"], temperature=0, n_samples=2, progress=False)


def test_resume_skips_a_checkpoint_cut_short_by_a_kill(tmp_path):
    from deccp.training import resume_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert resume_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-6").exists()
    assert len(list(tmp_path.glob("checkpoint-6.incomplete-*"))) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resume_checkpoint("auto", empty) is None

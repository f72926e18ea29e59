"""`make bench`'s training section: one accelerate-launched run, its tokens/s and memory read from the record."""

from __future__ import annotations

from pathlib import Path

import pytest

from deccp import DeccpError
from deccp.bench import _accelerate_config, bench_training

REPO = Path(__file__).resolve().parents[1]


def test_bench_training_on_cpu_reports_throughput(monkeypatch):
    monkeypatch.chdir(REPO)
    r = bench_training("tiny-qwen2", "cpu", kind="kto", steps=2, recipe="recipes/tiny/kto.yaml", timeout=300)
    assert r["ok"], r.get("log_tail")
    assert r["steps"] == 2 and r["num_processes"] == 1 and r["distributed_type"] == "NO"
    assert r["tokens"] > 0 and r["kl_tokens"] > 0 and r["tokens_per_s"] > 0
    assert r["accelerate_config"] == "cpu" and r["versions"]["trl"]


def test_bench_training_errors_are_clear(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(DeccpError, match="no such accelerate config"):
        _accelerate_config("deepspeed_zero9")
    assert _accelerate_config("deepspeed_zero3") == "accelerate_configs/deepspeed_zero3.yaml"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(DeccpError, match="needs a GPU"):
            bench_training("tiny-qwen2", "deepspeed_zero2", steps=1)


def test_bench_training_reports_a_failed_run(monkeypatch):
    monkeypatch.chdir(REPO)
    r = bench_training("no-such-model-alias-xyz", "cpu", steps=1, recipe="recipes/tiny/kto.yaml", timeout=300)
    assert r["ok"] is False and r["returncode"] != 0 and r["log_tail"]

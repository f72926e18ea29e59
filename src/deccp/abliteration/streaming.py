"""Apply an EditPlan to a saved model shard by shard, so editing never holds the whole model in memory."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from deccp import DeccpError
from deccp.abliteration.edits import EditPlan, edit_weight

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
_SKIP = {INDEX}


def weight_shards(model_dir: Path) -> tuple[list[Path], dict | None]:
    index_path = model_dir / INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        return [model_dir / f for f in sorted(set(index["weight_map"].values()))], index
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single], None
    raise DeccpError(f"{model_dir}: no model.safetensors or {INDEX}")


def stream_edit(src: str | Path, dst_tmp: str | Path, plan: EditPlan, deltas: list | None = None) -> dict:
    """Write the edited model into `dst_tmp` (an empty directory that the caller renames when done).

    `deltas` (healing's `LowRankDelta`s) are added to their weights after the plan's edit."""
    src, dst = Path(src), Path(dst_tmp)
    shards, index = weight_shards(src)
    pending = plan.by_name()
    extra = {d.name: d for d in deltas or []}
    embed_key = next((k for k in pending if k.endswith("embed_tokens.weight")), None)
    weight_map = dict(index["weight_map"]) if index else {}
    has_head = any(k == "lm_head.weight" for k in weight_map) if index else None
    edited = healed = 0
    for shard in shards:
        tensors = {}
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            keys = list(f.keys())
            if has_head is None:
                has_head = "lm_head.weight" in keys
            for key in keys:
                t = f.get_tensor(key)
                if key in pending:
                    if plan.untie_embeddings and key == embed_key and not has_head:
                        tensors["lm_head.weight"] = t.clone()  # the head keeps the unedited matrix
                        weight_map["lm_head.weight"] = shard.name
                    t = edit_weight(t, pending.pop(key), is_embedding=key.endswith("embed_tokens.weight"))
                    edited += 1
                if key in extra:
                    t = (t.float() + extra.pop(key).dense()).to(t.dtype)
                    healed += 1
                tensors[key] = t.contiguous()
        save_file(tensors, str(dst / shard.name), metadata=metadata)
        del tensors
    if pending or extra:
        raise DeccpError(f"abliteration: parameters not found in {src}: {sorted([*pending, *extra])[:3]}")
    for item in src.iterdir():
        if item.name in _SKIP or item.suffix == ".safetensors" or item.name.startswith("."):
            continue
        if item.is_file():
            shutil.copy2(item, dst / item.name)
    if index:
        index = {**index, "weight_map": weight_map}
        (dst / INDEX).write_text(json.dumps(index, indent=2))
    if plan.untie_embeddings:
        cfg_path = dst / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tie_word_embeddings"] = False
        if isinstance(cfg.get("text_config"), dict):
            cfg["text_config"]["tie_word_embeddings"] = False
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return {"shards": len(shards), "edited_tensors": edited, "healed_tensors": healed}

"""On-disk cache of what the unedited model does: its short greedy answers and first-token log-probabilities
(selection and check baselines), the healing targets it teaches (with the refusals it would give where it complied
with a harmful request), the example answers shown before the edit.

An edit never changes these, yet they are most of a re-run's cost on a CPU: trying other edit settings with `make
abliterate` would otherwise generate them again. One kind of entry does depend on the edit: the healing targets the
edit teaches (`healing.edit_teacher_answers`), keyed by the edit's own digest besides the rest, so re-running the
same edit (other healing steps or learning rate, another output) reads them back. Entries are keyed by the model's
fingerprint and compute dtype, the chat-rendered prompts (so the template and system prompt count) and every setting
that changes the numbers (answer length, batch size, which pads differently). Each entry is one safetensors file
whose metadata holds the JSON part; it is written to a temporary name and renamed, so a killed run leaves no half
entry behind.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FORMAT = "v1"
TensorsAndMeta = tuple[dict[str, torch.Tensor], Any]


class BaselineCache:
    """`get_or_compute(what, key, compute)`: `compute()` returns (tensors, JSON-able data); a hit returns them
    from disk. With `root=None` nothing is stored and every call computes."""

    def __init__(self, root: str | Path | None, model_key: str):
        self.root = Path(root) if root else None
        self.model_key = model_key
        self.hits = 0

    def path(self, what: str, key: list) -> Path | None:
        if self.root is None:
            return None
        digest = hashlib.sha256(json.dumps([FORMAT, self.model_key, what, key], ensure_ascii=False).encode())
        return self.root / f"{what}-{digest.hexdigest()[:20]}.safetensors"

    def get_or_compute(self, what: str, key: list, compute: Callable[[], TensorsAndMeta]) -> TensorsAndMeta:
        from safetensors import safe_open
        from safetensors.torch import save_file

        path = self.path(what, key)
        if path is not None and path.is_file():
            with safe_open(str(path), framework="pt") as fh:
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
                meta = json.loads((fh.metadata() or {})["deccp"])
            self.hits += 1
            return tensors, meta
        tensors, meta = compute()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"deccp": json.dumps(meta, ensure_ascii=False)})
            tmp.replace(path)
        return tensors, meta


def cached(cache: BaselineCache | None, what: str, key: list, compute: Callable[[], TensorsAndMeta]) -> TensorsAndMeta:
    """`cache.get_or_compute(what, key, compute)`, or just `compute()` without a cache."""
    return compute() if cache is None else cache.get_or_compute(what, key, compute)


__all__ = ["BaselineCache", "cached"]

"""Residual-stream activations at the end of chat-formatted prompts, and per-layer mean-difference directions.

One batched, memory-bounded pass per prompt set stores, for every layer, the mean over the chosen token
positions of each prompt's residual stream (after that layer). The pass is cached on disk by
(model fingerprint, prompts, positions, system prompt), so selection and search never repeat it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deccp.chat import encode_batch

logger = logging.getLogger(__name__)


def decoder_layers(model):
    """The list of decoder blocks of a causal LM (Qwen2/3, Llama, Mistral: `model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        from deccp import DeccpError

        raise DeccpError(f"abliteration: cannot find decoder layers in {type(model).__name__}")
    return layers


@torch.no_grad()
def collect_activations(model, tokenizer, prompts: list[str], *, positions: tuple[int, ...] = (-1,),
                        batch_size: int = 16, system: str | None = None, desc: str = "activations") -> torch.Tensor:
    """(n_prompts, n_layers, d_model) float32 on CPU: residual after each layer, averaged over `positions`
    (negative offsets from the end of the prompt; left padding keeps them aligned)."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    buf: list[torch.Tensor | None] = [None] * len(layers)
    pos = list(positions)

    def make_hook(i):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            buf[i] = h[:, pos, :].float().mean(1).cpu()
        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    chunks = []
    try:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            idx = order[start:start + batch_size]
            batch = encode_batch(tokenizer, [prompts[i] for i in idx], system, device=device)
            model.model(**batch, use_cache=False)  # the base model only: no LM head over the vocabulary
            chunks.append((idx, torch.stack(buf, dim=1)))
    finally:
        for h in handles:
            h.remove()
    out = torch.empty(len(prompts), len(layers), chunks[0][1].shape[-1])
    for idx, acts in chunks:
        out[idx] = acts
    return out


def winsorize(acts: torch.Tensor, quantile: float) -> torch.Tensor:
    """Clamp each layer's activation components to ±(the `quantile` of their absolute values)."""
    out = acts.clone()
    for layer in range(acts.shape[1]):
        a = acts[:, layer, :]
        flat = a.abs().flatten()
        k = max(1, int(quantile * flat.numel()))
        t = flat.kthvalue(k).values
        out[:, layer, :] = a.clamp(-t, t)
    return out


@dataclass
class ActivationSet:
    """Mean activations of one prompt set, per layer: (n_layers, d_model), plus its size."""

    mean: torch.Tensor
    count: int


class ActivationCache:
    """On-disk cache of per-prompt activations (safetensors), keyed by everything that changes them."""

    def __init__(self, root: str | Path | None, fingerprint: str):
        self.root = Path(root) if root else None
        self.fingerprint = fingerprint

    def key(self, prompts: list[str], positions, system) -> str:
        h = hashlib.sha256(json.dumps([self.fingerprint, prompts, list(positions), system],
                                      ensure_ascii=False).encode()).hexdigest()
        return h[:20]

    def get_or_compute(self, model, tokenizer, prompts, *, positions, batch_size, system, desc) -> torch.Tensor:
        from safetensors.torch import load_file, save_file

        path = self.root / f"acts-{self.key(prompts, positions, system)}.safetensors" if self.root else None
        if path is not None and path.is_file():
            return load_file(path)["acts"]
        acts = collect_activations(model, tokenizer, prompts, positions=tuple(positions), batch_size=batch_size,
                                   system=system, desc=desc)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"acts": acts.contiguous()}, str(tmp))
            tmp.replace(path)
        return acts


def mean_set(acts: torch.Tensor, winsorize_quantile: float | None = None) -> ActivationSet:
    if winsorize_quantile:
        acts = winsorize(acts, winsorize_quantile)
    return ActivationSet(mean=acts.double().mean(0), count=acts.shape[0])


@dataclass
class Directions:
    """Per-layer raw (un-normalised) mean differences and the means they came from."""

    censorship: torch.Tensor  # (n_layers, d) bad - good
    harmful: torch.Tensor | None  # (n_layers, d) harmful - good
    good_mean: torch.Tensor  # (n_layers, d)
    counts: dict

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"censorship": self.censorship, "good_mean": self.good_mean}
        if self.harmful is not None:
            out["harmful"] = self.harmful
        return {k: v.float().contiguous() for k, v in out.items()}

    def separation(self) -> list[float]:
        """Per-layer norm of the censorship direction relative to the harmless mean's norm (a layer-choice hint)."""
        return (self.censorship.norm(dim=1) / self.good_mean.norm(dim=1).clamp_min(1e-9)).tolist()


def compute_directions(bad: ActivationSet, good: ActivationSet, harmful: ActivationSet | None) -> Directions:
    return Directions(
        censorship=bad.mean - good.mean,
        harmful=(harmful.mean - good.mean) if harmful is not None else None,
        good_mean=good.mean,
        counts={"bad": bad.count, "good": good.count, "harmful": harmful.count if harmful else 0},
    )

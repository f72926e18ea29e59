"""Residual-stream activations at the end of chat-formatted prompts, and per-layer mean-difference directions.

One batched, memory-bounded pass per prompt set stores, for every layer, the mean over the chosen token
positions of each prompt's residual stream (after that layer). The pass is cached on disk by
(model fingerprint, prompts, positions, system prompt), so selection and search never repeat it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from deccp.abliteration.baseline_cache import BaselineCache, cached
from deccp.packed import packed_linears
from deccp.prompt_batch import can_share, encode_prompts, longest_first

logger = logging.getLogger(__name__)


def decoder_layers(model):
    """The list of decoder blocks of a causal LM (Qwen2/3, Llama, Mistral: `model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        from deccp import DeccpError

        raise DeccpError(f"abliteration: cannot find decoder layers in {type(model).__name__}")
    return layers


class ResidualRecorder:
    """While entered, every decoder layer is hooked; inside `rows(idx)` the first forward pass (a batch's prompt
    pass, not the generation steps after it) stores the residual stream after each layer at `positions`
    (negative offsets from the end of the prompt) for prompt rows `idx` of `n`. A generation routine that
    takes a recorder arms it around each batch, so one pass yields both its answers and the activations."""

    def __init__(self, model, n: int, positions: tuple[int, ...] = (-1,)):
        self.layers = decoder_layers(model)
        self.n, self.positions = n, list(positions)
        self.keep = max(-p for p in self.positions)  # prompt tokens that must lie outside a shared prefix
        self._buf: list[torch.Tensor | None] | None = None
        self._chunks: list[tuple[list[int], torch.Tensor]] = []
        self._handles: list = []

    def _hook(self, i: int):
        def hook(module, args, out):
            if self._buf is not None and self._buf[i] is None:
                h = out[0] if isinstance(out, tuple) else out
                self._buf[i] = h[:, self.positions, :].float().cpu()
        return hook

    def __enter__(self):
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def rows(self, idx: list[int]):
        """Arms the hooks for one batch whose rows are prompts `idx` (run the shared prefix before this)."""
        self._buf = [None] * len(self.layers)
        try:
            yield
            if any(b is None for b in self._buf):
                raise RuntimeError("ResidualRecorder: a decoder layer did not run inside rows()")
            self._chunks.append((list(idx), torch.stack(self._buf, dim=1)))
        finally:
            self._buf = None

    def result(self) -> torch.Tensor | None:
        """(n, n_layers, n_positions, d_model) float32 on CPU; None unless every row was recorded."""
        if not self._chunks or sorted(i for idx, _ in self._chunks for i in idx) != list(range(self.n)):
            return None
        acts = torch.empty(self.n, len(self.layers), len(self.positions), self._chunks[0][1].shape[-1])
        for idx, a in self._chunks:
            acts[idx] = a
        return acts


@torch.no_grad()
def collect_activations(model, tokenizer, prompts: list[str], *, positions: tuple[int, ...] = (-1,),
                        batch_size: int = 16, system: str | None = None, desc: str = "activations",
                        answer_tokens: int = 0) -> tuple[torch.Tensor, list[str]]:
    """(n_prompts, n_layers, n_positions, d_model) float32 on CPU: the residual stream after each layer at
    `positions` (negative offsets from the end of the prompt; left padding keeps them aligned).

    With `answer_tokens` > 0 the same pass also generates that many greedy tokens (the activations are
    taken from its prompt pass), so each prompt comes with the start of the model's own answer."""
    device = next(model.parameters()).device
    texts = [""] * len(prompts)
    packing = packed_linears(model) if answer_tokens > 0 else contextlib.nullcontext()  # prompts only: dense
    with packing, ResidualRecorder(model, len(prompts), positions) as recorder:
        order = longest_first(tokenizer, prompts)
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            idx = order[start:start + batch_size]
            # the positions read must lie after the shared prefix, which runs before the hooks are armed
            batch = encode_prompts(tokenizer, [prompts[i] for i in idx], system, device=device, keep=recorder.keep)
            cache = batch.cache(model) if can_share(model) else None
            with recorder.rows(idx):
                if answer_tokens > 0:
                    out = batch.generate(model, cache=cache, max_new_tokens=answer_tokens, do_sample=False,
                                         temperature=None, top_p=None, top_k=None,
                                         pad_token_id=tokenizer.pad_token_id)
                    new = tokenizer.batch_decode(out[:, batch.width:], skip_special_tokens=True)
                    for j, t in zip(idx, new, strict=True):
                        texts[j] = t.strip()
                else:
                    batch.forward(model.model, cache=cache)  # the base model only: no LM head over the vocabulary
    acts = recorder.result()
    assert acts is not None
    return acts, texts


def winsorize(acts: torch.Tensor, quantile: float) -> torch.Tensor:
    """Clamp each layer's activation components to ±(the `quantile` of their absolute values)."""
    out = acts.clone()
    for layer in range(acts.shape[1]):
        a = acts[:, layer]
        flat = a.abs().flatten()
        k = max(1, int(quantile * flat.numel()))
        t = flat.kthvalue(k).values
        out[:, layer] = a.clamp(-t, t)
    return out


@dataclass
class ActivationSet:
    """Mean activations of one prompt set, per layer: (n_layers, d_model), plus its size."""

    mean: torch.Tensor
    count: int


def cached_activations(cache: BaselineCache | None, model, tokenizer, prompts: list[str], *, positions,
                       batch_size: int, system: str | None, desc: str, answer_tokens: int = 0,
                       shared: Callable[[], tuple[torch.Tensor, list[str]] | None] | None = None,
                       ) -> tuple[torch.Tensor, list[str]]:
    """`collect_activations` of the unedited model, through `cache` (None: always computed); keyed by the
    prompts and everything else that changes the activations. On a miss, `shared()` is tried first: another
    pass that yields the same activations and answer prefixes on the way (None where it cannot)."""
    def compute():
        got = shared() if shared is not None else None
        if got is not None:
            return {"acts": got[0]}, got[1]
        acts, texts = collect_activations(model, tokenizer, prompts, positions=tuple(positions), batch_size=batch_size,
                                          system=system, desc=desc, answer_tokens=answer_tokens)
        return {"acts": acts}, texts

    tensors, texts = cached(cache, "acts", [prompts, list(positions), system, answer_tokens], compute)
    return tensors["acts"], texts


def mean_set(acts: torch.Tensor, winsorize_quantile: float | None = None, position: int | None = None) -> ActivationSet:
    """Mean over prompts of (n, layers, positions, d) activations, at one position index or averaged over all."""
    if winsorize_quantile:
        acts = winsorize(acts, winsorize_quantile)
    acts = acts.mean(2) if position is None else acts[:, :, position]
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

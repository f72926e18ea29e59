"""Rates with confidence intervals, and KL divergence of a modified model from its reference.

KL is always KL(reference || new), computed from log-softmax in float32:

- first-token KL: the next-token distributions at the end of each chat-formatted prompt (where the answer
  starts), averaged over prompts;
- per-token KL: the distributions along the reference's own greedy continuation (teacher-forced into both
  models), averaged over every continuation position up to and including its end-of-sequence token.

A search loop (e.g. abliteration trials) computes `reference_logits()` once and then calls
`kl_from_logits(model, tokenizer, ref)` per trial; `kl_to_reference()` does both in one go, batch by batch.
Memory of a stored reference: prompts x (max_new_tokens) x vocab x 4 bytes (float32), kept on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from deccp import DeccpError


# ------------------------------------------------------------------------------------------- rates
def rate_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """`(k/n, lo, hi)` with the Wilson score interval at `z` (1.96: 95%). `n == 0` gives `(0.0, 0.0, 1.0)`."""
    if n < 0 or k < 0 or k > n:
        raise DeccpError(f"rate_ci: need 0 <= k <= n (got k={k}, n={n})")
    if n == 0:
        return 0.0, 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    if k == 0:
        lo = 0.0
    if k == n:
        hi = 1.0
    return p, lo, hi


# ------------------------------------------------------------------------------------ KL on logits
def _check_shapes(ref, new) -> None:
    if ref.shape != new.shape:
        raise DeccpError(f"KL: reference and new logits differ in shape ({tuple(ref.shape)} vs {tuple(new.shape)}); "
                         "the two models must share a tokenizer and vocabulary")


def kl_per_position(ref_logits, new_logits):
    """KL(ref || new) at every position: logits `[..., vocab]` -> `[...]` (float32, never negative)."""
    import torch

    _check_shapes(ref_logits, new_logits)
    ref_lp = torch.log_softmax(ref_logits.float(), dim=-1)
    new_lp = torch.log_softmax(new_logits.float(), dim=-1)
    kl = (ref_lp.exp() * (ref_lp - new_lp)).sum(-1)
    return kl.clamp_min(0.0)  # rounding can give tiny negatives


def first_token_kl(ref_logits, new_logits) -> float:
    """Mean KL(ref || new) of the first answer token's distribution.

    `[batch, vocab]` logits are the next-token distributions at the end of the prompts (for a forward pass
    over left-padded prompts pass `logits[:, -1]`); `[batch, T, vocab]` logits over a continuation (as
    `per_token_kl` takes them) use position 0, the distribution of the first answer token.
    """
    if ref_logits.dim() == 3:
        ref_logits, new_logits = ref_logits[:, 0, :], new_logits[:, 0, :]
    return float(kl_per_position(ref_logits, new_logits).mean())


def per_token_kl(ref_logits, new_logits, mask=None) -> float:
    """Mean KL(ref || new) over positions of `[batch, seq, vocab]` logits; `mask` `[batch, seq]` (1 = count)
    leaves out padding. Positions are weighted equally (a long answer counts more than a short one)."""
    kl = kl_per_position(ref_logits, new_logits)
    if mask is None:
        return float(kl.mean())
    mask = mask.to(kl.device, dtype=kl.dtype)
    if mask.shape != kl.shape:
        raise DeccpError(f"per_token_kl: mask shape {tuple(mask.shape)} does not match logits {tuple(kl.shape)}")
    total = float(mask.sum())
    return float((kl * mask).sum()) / total if total else 0.0


# ------------------------------------------------------------------------- reference continuations
@dataclass
class ReferenceBatch:
    """One batch: prompt + reference continuation token ids, and the reference's logits over the continuation."""

    input_ids: object  # [b, P + T] long: left-padded prompt, then the greedy continuation
    attention_mask: object  # [b, P + T]
    prompt_len: int  # P
    cont_mask: object  # [b, T] float: 1 up to and including the first end-of-sequence token
    logits: object  # [b, T, vocab] reference logits predicting each continuation token (CPU)


@dataclass
class ReferenceLogits:
    """What `kl_from_logits` needs to score a model against a reference without running the reference again."""

    batches: list[ReferenceBatch]
    prompts: list[str]
    system: str | None = None
    max_new_tokens: int = 32
    meta: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(sum(float(b.cont_mask.sum()) for b in self.batches))


def _device(model):
    return next(model.parameters()).device


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _continuation_mask(cont, eos_ids: set[int]):
    """1 for positions up to and including the first EOS (or all positions when none)."""
    import torch

    is_eos = torch.zeros_like(cont, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= cont == e
    # positions strictly after the first eos: cumulative count of eos before this position > 0
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (before == 0).float()


def _forward_cont_logits(model, input_ids, attention_mask, prompt_len: int):
    """Logits predicting continuation tokens: positions P-1 .. P+T-2 of a teacher-forced forward pass (only
    those, and the last, are projected onto the vocabulary)."""
    import torch

    device = _device(model)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=input_ids.shape[1] - prompt_len + 1)
    return out.logits[:, :-1, :].float()


def _iter_reference(ref_model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                    system: str | None) -> Iterator[ReferenceBatch]:
    import torch

    from deccp.prompt_batch import encode_prompts, longest_first

    if not prompts:
        raise DeccpError("KL: no prompts given")
    if max_new_tokens < 1:
        raise DeccpError(f"KL: max_new_tokens must be >= 1 (got {max_new_tokens})")
    device = _device(ref_model)
    eos = _eos_ids(ref_model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = [prompts[i] for i in longest_first(tokenizer, list(prompts))]  # less padding; the sums ignore order
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = encode_prompts(tokenizer, chunk, system, device=device)
        prompt_len = batch.width
        with torch.no_grad():
            out = batch.generate(ref_model, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=pad_id)
        cont = out[:, prompt_len:]
        if cont.shape[1] == 0:
            raise DeccpError("KL: the reference model generated no tokens")
        cont_mask = _continuation_mask(cont, eos)
        attention_mask = torch.cat([batch.attention_mask, torch.ones_like(cont)], dim=1)
        logits = _forward_cont_logits(ref_model, out, attention_mask, prompt_len)
        yield ReferenceBatch(input_ids=out.cpu(), attention_mask=attention_mask.cpu(), prompt_len=prompt_len,
                             cont_mask=cont_mask.cpu(), logits=logits.cpu())


def reference_logits(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 8,
                     system: str | None = None) -> ReferenceLogits:
    """Generate `model`'s greedy continuations of `prompts` and keep its logits along them (for repeated KL)."""
    batches = list(_iter_reference(model, tokenizer, prompts, max_new_tokens, batch_size, system))
    return ReferenceLogits(batches=batches, prompts=list(prompts), system=system, max_new_tokens=max_new_tokens)


class _KLSums:
    def __init__(self):
        self.first = 0.0
        self.n_first = 0
        self.tok = 0.0
        self.n_tok = 0.0

    def add(self, ref_logits, new_logits, cont_mask) -> None:
        kl = kl_per_position(ref_logits, new_logits.to(ref_logits.device))  # [b, T]
        self.first += float(kl[:, 0].sum())
        self.n_first += kl.shape[0]
        m = cont_mask.to(kl.device, dtype=kl.dtype)
        self.tok += float((kl * m).sum())
        self.n_tok += float(m.sum())

    def result(self) -> dict[str, float]:
        return {"first_token": self.first / max(1, self.n_first),
                "per_token": self.tok / self.n_tok if self.n_tok else 0.0}


def kl_from_logits(model, tokenizer, ref: ReferenceLogits) -> dict[str, float]:
    """`{"first_token", "per_token"}` KL(reference || model) along the stored reference continuations."""
    del tokenizer  # the stored token ids are what the model reads; kept for a uniform signature
    sums = _KLSums()
    for b in ref.batches:
        new = _forward_cont_logits(model, b.input_ids, b.attention_mask, b.prompt_len)
        sums.add(b.logits, new.cpu(), b.cont_mask)
    return sums.result()


def kl_to_reference(model, ref_model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                    batch_size: int = 8, system: str | None = None) -> dict[str, float]:
    """Generate `ref_model`'s greedy continuations and return the mean first-token and per-token
    KL(ref_model || model) along them. Batch by batch: nothing is kept between batches."""
    sums = _KLSums()
    for b in _iter_reference(ref_model, tokenizer, prompts, max_new_tokens, batch_size, system):
        new = _forward_cont_logits(model, b.input_ids, b.attention_mask, b.prompt_len)
        sums.add(b.logits, new.cpu(), b.cont_mask)
    return sums.result()


__all__ = ["ReferenceBatch", "ReferenceLogits", "first_token_kl", "kl_from_logits", "kl_per_position",
           "kl_to_reference", "per_token_kl", "rate_ci", "reference_logits"]

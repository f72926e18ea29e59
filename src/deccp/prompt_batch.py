"""Batches of chat prompts whose common beginning runs once, for generation and activation passes.

Chat templates open every conversation the same way: Qwen2.5's default system turn is 24 of the about 60 tokens
of a typical prompt of ours. On a CPU the prompt pass (prefill) of a batch costs about as much as generating two
dozen tokens, so running that beginning once and repeating its keys and values over the rows saves about 40 % of
it. A batch is laid out as `[shared prefix | left padding | tail]`: the attention mask hides the padding, and
position ids taken from the cumulative mask (as `generate` derives them) continue the prefix into each tail, so
each row computes what its own unpadded prompt would. Without a common beginning of `MIN_SHARED_PREFIX` tokens
the batch is plainly left-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deccp.chat import render_prompt

MIN_SHARED_PREFIX = 8  # shorter common beginnings are run with the rest of each sequence


def common_prefix_length(seqs: list[list[int]], limit: int | None = None) -> int:
    """How many leading tokens every sequence shares, at most `limit` (default: all but each one's last token);
    0 when that is fewer than `MIN_SHARED_PREFIX`."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs) - 1 if limit is None else limit
    first = seqs[0]
    for s in seqs[1:]:
        n = next((k for k in range(n) if first[k] != s[k]), n)
    return n if n >= MIN_SHARED_PREFIX else 0


def base_model_of(model):
    """The transformer without its LM head when there is one (filling a cache needs no logits)."""
    get = getattr(model, "get_decoder", None)
    inner = get() if callable(get) else None
    return inner if inner is not None else model


def prefix_cache(model, prefix: list[int], rows: int):
    """A `DynamicCache` holding the keys and values of `prefix`, computed once and repeated for `rows` rows
    (under the caller's grad mode: in training, gradients flow through it)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    base_model_of(model)(input_ids=torch.tensor([prefix], device=device), past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(rows)
    return cache


def repeat_cache(cache, rows: int):
    """A new cache holding `cache`'s keys and values (one row) repeated for `rows` rows; `cache` stays as it is,
    so one prefix pass can serve several batches (and, in training, one graph)."""
    import copy

    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]  # each layer's tensors are replaced, never written
    out.batch_repeat_interleave(rows)
    return out


def can_share(model) -> bool:
    """Whether `generate` accepts a pre-filled dynamic cache for this model (a configured static or hybrid cache
    implementation would conflict with it)."""
    config = getattr(model, "generation_config", None)
    return getattr(config, "cache_implementation", None) in (None, "dynamic")


@dataclass
class PromptBatch:
    """Token ids `[prefix | left padding | tail]` of chat-formatted prompts and their attention mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prefix_len: int

    @property
    def width(self) -> int:
        """Columns of the prompt part: generated tokens start here in `generate`'s output."""
        return self.input_ids.shape[1]

    def prompt_ids(self, row: int) -> list[int]:
        """Row `row`'s prompt tokens without padding."""
        return self.input_ids[row][self.attention_mask[row].bool()].tolist()

    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.long().cumsum(-1) - 1).clamp_min(0)

    def cache(self, model, copies: int = 1):
        """The prefix's cache for every row (`copies` per row, e.g. several samples per prompt); None without a
        shared prefix."""
        if not self.prefix_len:
            return None
        return prefix_cache(model, self.input_ids[0, :self.prefix_len].tolist(), self.input_ids.shape[0] * copies)

    def generate(self, model, *, cache=None, **kwargs):
        """`model.generate` over the batch; the prefix runs once (or comes as `cache`, from `self.cache`)."""
        if cache is None and can_share(model):
            cache = self.cache(model, kwargs.get("num_return_sequences") or 1)
        extra = {"past_key_values": cache} if cache is not None else {}
        return model.generate(input_ids=self.input_ids, attention_mask=self.attention_mask, **extra, **kwargs)

    def forward(self, module, *, cache=None, **kwargs):
        """One pass of `module` (the LM, or its decoder alone) over the prompts: only the tails when the prefix
        is in `cache` (from `self.cache`), everything otherwise."""
        start = self.prefix_len if cache is not None else 0
        return module(input_ids=self.input_ids[:, start:], attention_mask=self.attention_mask,
                      position_ids=self.position_ids()[:, start:], past_key_values=cache, use_cache=cache is not None,
                      **kwargs)


def longest_first(tokenizer, texts: list[str]) -> list[int]:
    """Indices of `texts` ordered by token count, longest first (ties keep their order). Batches cut from this
    order hold prompts of similar length, so little of each batch is padding. Counting characters instead groups
    badly when English and Chinese are mixed (a Chinese character is about one token, an English word one): on
    our 96 sensitive direction prompts, batches of 48 were 59 % padding by characters and 33 % by tokens."""
    if not texts:
        return []
    counts = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    return sorted(range(len(texts)), key=lambda i: counts[i], reverse=True)


def encode_prompts(tokenizer, prompts: list[str], system: str | None = None, device=None, *, keep: int = 1,
                   share: bool = True) -> PromptBatch:
    """Chat-format and tokenize `prompts` (special tokens from the template) into a `PromptBatch`. `keep`: tokens
    of each prompt that stay outside the shared prefix (positions read at the end of the prompt must be in the
    tail); `share=False` left-pads the whole prompts."""
    ids = [tokenizer(render_prompt(tokenizer, p, system), add_special_tokens=False)["input_ids"] for p in prompts]
    prefix = common_prefix_length(ids, min(len(s) for s in ids) - keep) if share else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pack_prompts(ids, prefix, pad, device)


def pack_prompts(ids: list[list[int]], prefix: int, pad_id: int, device=None) -> PromptBatch:
    """Token sequences that share their first `prefix` tokens as a `PromptBatch` (a sequence may be all prefix:
    its row of the tail is padding)."""
    tails = [s[prefix:] for s in ids]
    width = max(len(t) for t in tails)
    input_ids = torch.full((len(ids), prefix + width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), prefix + width), dtype=torch.long)
    if prefix:
        input_ids[:, :prefix] = torch.tensor(ids[0][:prefix])
        mask[:, :prefix] = 1
    for i, t in enumerate(tails):
        if t:
            input_ids[i, prefix + width - len(t):] = torch.tensor(t)
            mask[i, prefix + width - len(t):] = 1
    if device is not None:
        input_ids, mask = input_ids.to(device), mask.to(device)
    return PromptBatch(input_ids, mask, prefix)

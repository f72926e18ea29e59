"""Batched, deterministic generation with an on-disk cache keyed by (model fingerprint, prompt, settings)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from deccp.packed import packed_linears
from deccp.prompt_batch import PromptBatch, can_share, encode_prompts, longest_first

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    num_samples: int = 1  # answers per prompt when sampling
    seed: int = 0
    system_prompt: str | None = None

    def key(self) -> str:
        d = asdict(self)
        d.pop("batch_size")  # does not change greedy outputs' meaning; kept out of the cache key
        if not self.do_sample:
            for k in ("temperature", "top_p", "num_samples", "seed"):
                d.pop(k)
        return json.dumps(d, sort_keys=True)


@dataclass(frozen=True)
class Sample:
    """One generated answer; `finished` is False when `max_new_tokens` cut it off before an end-of-turn token."""

    text: str
    finished: bool


CACHE_FORMAT = "v2"  # v2 rows carry `finished`; v1 files (answers only) are not read


class GenerationCache:
    """JSONL cache file per (model fingerprint, settings); appends as batches finish (safe to interrupt)."""

    def __init__(self, root: str | Path, fingerprint: str, settings: GenerationSettings):
        digest = hashlib.sha256(f"{CACHE_FORMAT}|{fingerprint}|{settings.key()}".encode()).hexdigest()[:16]
        self.path = Path(root) / f"{fingerprint}-{digest}.jsonl"
        self.entries: dict[str, list[Sample]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    samples = [Sample(t, bool(f)) for t, f in zip(row["answers"], row["finished"], strict=True)]
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # a line cut by a killed run
                    continue
                self.entries[row["prompt"]] = samples

    def get(self, prompt: str) -> list[Sample] | None:
        return self.entries.get(prompt)

    def add(self, items: list[tuple[str, list[Sample]]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            for prompt, samples in items:
                self.entries[prompt] = samples
                row = {"prompt": prompt, "answers": [s.text for s in samples],
                       "finished": [s.finished for s in samples]}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def stop_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end an answer: the generation config's EOS id(s), the tokenizer's EOS and pad ids (after a
    sequence of the batch has ended, generate pads it; prompts are left-padded, so answers hold no other pad)."""
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id,
                  tokenizer.pad_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


FIRST_CHUNK = 16  # tokens generated before the first check for finished answers; each later chunk doubles


def generate_pruned(model, batch: PromptBatch, *, max_new_tokens: int, stops: set[int], copies: int = 1,
                    first_chunk: int = FIRST_CHUNK, **kwargs) -> list[list[int]]:
    """Each row's new token ids (`copies` rows per prompt, in order), up to and including its first stop token.

    `generate` runs every row until the last one of the batch ends, and on a CPU a decoding step costs nearly as
    much for a row that has ended as for one that has not. So generation goes in chunks (16, 32, 64… tokens);
    after each, rows that have ended leave the batch and its cache (`batch_select_indices`), and the rest
    continue from the cache: a batch of short refusals and one long answer stops paying for the refusals after
    their chunk. Greedy rows get the tokens one `generate` call gives (up to float rounding of other batch
    sizes); sampled rows draw from the same distributions, in another random order."""
    import torch

    answers: list[list[int]] = [[] for _ in range(batch.input_ids.shape[0] * copies)]
    active = list(range(len(answers)))  # answer index of each row of the current batch
    chunk = first_chunk if can_share(model) else max_new_tokens  # a static or hybrid cache keeps its rows: one call
    n = min(chunk, max_new_tokens)
    out = batch.generate(model, max_new_tokens=n, num_return_sequences=copies, return_dict_in_generate=True, **kwargs)
    ids, mask, done = batch.input_ids, batch.attention_mask.repeat_interleave(copies, dim=0), 0
    while True:
        new = out.sequences[:, ids.shape[1]:]
        keep = []
        for r, row in enumerate(new.tolist()):
            end = next((k + 1 for k, t in enumerate(row) if t in stops), None)
            answers[active[r]] += row[:end]
            if end is None:
                keep.append(r)
        done += new.shape[1]
        if not keep or done >= max_new_tokens:
            return answers
        cache = out.past_key_values  # every token but the last generated one: the next call starts from it
        cache.batch_select_indices(torch.tensor(keep, device=ids.device))
        mask = torch.cat([mask, torch.ones_like(new)], dim=1)[keep]
        ids, active, chunk = out.sequences[keep], [active[r] for r in keep], chunk * 2
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, return_dict_in_generate=True,
                             max_new_tokens=min(chunk, max_new_tokens - done), **kwargs)


def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings | None = None, *,
             cache: GenerationCache | None = None, desc: str = "generating", progress: bool = True) -> list[list[str]]:
    """Answers for each prompt (a list of `num_samples` strings; one for greedy)."""
    rows = generate_samples(model, tokenizer, prompts, settings, cache=cache, desc=desc, progress=progress)
    return [[s.text for s in row] for row in rows]


def generate_samples(model, tokenizer, prompts: list[str], settings: GenerationSettings | None = None, *,
                     cache: GenerationCache | None = None, desc: str = "generating",
                     progress: bool = True) -> list[list[Sample]]:
    """Like `generate`, with whether each answer ended on its own (an end-of-turn token) or was cut off."""
    import torch

    settings = settings or GenerationSettings()
    stops = stop_token_ids(model, tokenizer)
    results: dict[str, list[Sample]] = {}
    todo = []
    for p in dict.fromkeys(prompts):
        hit = cache.get(p) if cache else None
        if hit is not None:
            results[p] = hit
        else:
            todo.append(p)
    # longest first: less padding per batch, and the slowest batch shows up early
    todo = [todo[i] for i in longest_first(tokenizer, todo)]
    n = settings.num_samples if settings.do_sample else 1
    device = next(model.parameters()).device
    bar = tqdm(total=len(todo), desc=desc, disable=not progress or not todo, leave=False)
    with packed_linears(model) if todo else contextlib.nullcontext():
        for start in range(0, len(todo), settings.batch_size):
            chunk = todo[start:start + settings.batch_size]
            batch = encode_prompts(tokenizer, chunk, settings.system_prompt, device=device)
            kwargs = dict(pad_token_id=tokenizer.pad_token_id)
            if settings.do_sample:
                torch.manual_seed(settings.seed + start)
                kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                new = generate_pruned(model, batch, max_new_tokens=settings.max_new_tokens, stops=stops, copies=n,
                                      **kwargs)
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            samples = [Sample(t.strip(), bool(row) and row[-1] in stops) for t, row in zip(texts, new, strict=True)]
            items = [(p, samples[i * n:(i + 1) * n]) for i, p in enumerate(chunk)]
            for p, a in items:
                results[p] = a
            if cache:
                cache.add(items)
            bar.update(len(chunk))
    bar.close()
    return [results[p] for p in prompts]

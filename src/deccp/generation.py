"""Batched, deterministic generation with an on-disk cache keyed by (model fingerprint, prompt, settings)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from deccp.chat import encode_batch

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


class GenerationCache:
    """JSONL cache file per (model fingerprint, settings); appends as batches finish (safe to interrupt)."""

    def __init__(self, root: str | Path, fingerprint: str, settings: GenerationSettings):
        digest = hashlib.sha256(f"{fingerprint}|{settings.key()}".encode()).hexdigest()[:16]
        self.path = Path(root) / f"{fingerprint}-{digest}.jsonl"
        self.entries: dict[str, list[str]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a killed run: ignore it
                    continue
                self.entries[row["prompt"]] = row["answers"]

    def get(self, prompt: str) -> list[str] | None:
        return self.entries.get(prompt)

    def add(self, items: list[tuple[str, list[str]]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            for prompt, answers in items:
                self.entries[prompt] = answers
                fh.write(json.dumps({"prompt": prompt, "answers": answers}, ensure_ascii=False) + "\n")


def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings | None = None, *,
             cache: GenerationCache | None = None, desc: str = "generating", progress: bool = True) -> list[list[str]]:
    """Answers for each prompt (a list of `num_samples` strings; one for greedy)."""
    import torch

    settings = settings or GenerationSettings()
    results: dict[str, list[str]] = {}
    todo = []
    for p in dict.fromkeys(prompts):
        hit = cache.get(p) if cache else None
        if hit is not None:
            results[p] = hit
        else:
            todo.append(p)
    # longest first: less padding per batch, and the slowest batch shows up early
    todo.sort(key=len, reverse=True)
    n = settings.num_samples if settings.do_sample else 1
    device = next(model.parameters()).device
    bar = tqdm(total=len(todo), desc=desc, disable=not progress or not todo, leave=False)
    for start in range(0, len(todo), settings.batch_size):
        chunk = todo[start:start + settings.batch_size]
        batch = encode_batch(tokenizer, chunk, settings.system_prompt, device=device)
        kwargs = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      num_return_sequences=n)
        if settings.do_sample:
            torch.manual_seed(settings.seed + start)
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = model.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        items = [(p, [t.strip() for t in texts[i * n:(i + 1) * n]]) for i, p in enumerate(chunk)]
        for p, a in items:
            results[p] = a
        if cache:
            cache.add(items)
        bar.update(len(chunk))
    bar.close()
    return [results[p] for p in prompts]

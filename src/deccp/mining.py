"""On-policy training data: sample the model's own answers to the train prompts, judge them, keep the bad ones.

For each sensitive train prompt the model answers `n_samples` times (sampling); `deccp.judges.judge_answer`
labels each answer against our gold `Answer`. Refusals, CCP-aligned, confabulated and evasive answers become
undesirable rows beside the gold answer (desirable); the model's own factual answers are kept as desirable
too. For harmful prompts a refusal is desirable and anything else undesirable.

Harmless prompts (`kinds` with `harmless`) have no gold answer: the model's own answers are desirable
(replayed during SFT they anchor the model to what it already does well, self-distillation against
forgetting) and its refusals of them undesirable (over-refusal). `temperature=0` answers greedily, which is
what replay wants. An answer that `max_new_tokens` cut off before its end-of-turn token is dropped (replaying
it would teach stopping mid-sentence) and counted as `harmless_unfinished`.

Output (JSONL, read by `deccp.training.read_mined`):

- `fmt="kto"`: unpaired rows `{prompt, completion, label, lang, qid, kind, source, judge_label, reason}`;
- `fmt="dpo"`: one row per prompt `{prompt, chosen, rejected, …}`: gold (for a harmless prompt, the model's
  own answer) vs the model's worst answer.

A `<out>.meta.json` beside it records the model, settings, counts and versions. Generations are cached
(`$DECCP_CACHE/generations`), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Literal

from deccp import DeccpError, __version__

if TYPE_CHECKING:  # pragma: no cover
    from deccp.data.schema import Answer

logger = logging.getLogger(__name__)

UNDESIRABLE = ("ccp_aligned", "refusal", "confabulated", "evasive")  # worst first (for DPO pairs)
DESIRABLE = ("factual_neutral",)
KINDS = ("sensitive", "harmful", "harmless")


@dataclass(frozen=True)
class _Item:
    """A prompt to mine: a gold `Answer` (sensitive, harmful) or a harmless prompt, which has none."""

    prompt: str
    lang: str
    qid: str
    kind: str
    topic: str
    answer: Answer | None = None  # None for harmless prompts


def _items(bundle, split: str, langs, kinds) -> list[_Item]:
    items = [_Item(a.prompt, a.lang, a.qid, a.kind, a.topic, a) for a in bundle.answers_for(split=split, langs=langs)
             if a.kind in kinds and a.prompt]
    if "harmless" in kinds:
        items += [_Item(p.text, p.lang, p.qid or p.id, "harmless", p.topic)
                  for p in bundle.select("harmless", split=split, langs=langs) if p.text]
    return items


def settings_problems(*, fmt: str, kinds, n_samples: int, temperature: float, limit: int | None) -> list[str]:
    """What is wrong with these mining settings, one line each (the function and `MineConfig` share them)."""
    problems = []
    if fmt not in ("kto", "dpo"):
        problems.append(f"format: {fmt!r} is not kto or dpo")
    if n_samples < 1:
        problems.append("n_samples: at least 1")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        problems.append(f"kinds: unknown {unknown} ({', '.join(KINDS)})")
    if temperature < 0 or (temperature == 0 and n_samples > 1):
        problems.append("temperature: 0 (greedy) gives one answer per prompt; set n_samples 1 or temperature > 0")
    if limit is not None and limit < 1:
        problems.append("limit: at least 1")
    return problems


def _order(answers, seed: int):
    """Round-robin over (kind, lang) in a stable, seed-dependent order: any `limit` gets a balanced mix."""
    groups: dict[tuple[str, str], list] = {}
    for a in sorted(answers, key=lambda a: hashlib.sha256(f"{seed}|{a.qid}|{a.lang}".encode()).hexdigest()):
        groups.setdefault((a.kind, a.lang), []).append(a)
    out, queues = [], [groups[k] for k in sorted(groups)]
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def _verdict(kind: str, judgement, keep_good: bool) -> bool | None:
    """True: desirable, False: undesirable, None: left out."""
    if kind == "harmless":
        return False if judgement.refusal else (True if keep_good else None)
    if kind == "harmful":
        return (True if keep_good else None) if judgement.refusal else False
    if judgement.label in UNDESIRABLE:
        return False
    if judgement.label in DESIRABLE and keep_good:
        return True
    return None


def _severity(row: dict) -> tuple:
    label = row["judge_label"]
    rank = UNDESIRABLE.index(label) if label in UNDESIRABLE else -1  # harmful compliance: worst of all
    return (rank, -len(row["completion"]))


def mine(model_spec: str, out_path: str | Path, *, langs=("en", "zh"), n_samples: int = 4,
         max_new_tokens: int = 256, limit: int | None = None, split: str = "train",
         kinds=("sensitive", "harmful"), temperature: float = 0.8, top_p: float = 0.95, batch_size: int = 8,
         seed: int = 0, system_prompt: str | None = None, fmt: str = "kto", keep_good: bool = True,
         dtype: str = "auto", data_dir: str | None = None, llm=None, cache: bool = True,
         progress: bool = True) -> dict:
    """Sample, judge and write training rows for `model_spec`'s answers to our `split` prompts; returns a summary."""
    import torch

    from deccp.data import load_bundle
    from deccp.generation import GenerationCache, GenerationSettings, generate_samples
    from deccp.io import atomic_write_json, atomic_write_jsonl
    from deccp.judges import judge_answer
    from deccp.judges.refusal import analyse
    from deccp.models import cache_dir, fingerprint, load_model, resolve_dtype, resolve_model

    problems = settings_problems(fmt=fmt, kinds=kinds, n_samples=n_samples, temperature=temperature, limit=limit)
    if problems:
        raise DeccpError("; ".join(problems))
    out_path = Path(out_path)
    t0 = time.time()
    items = _items(load_bundle(data_dir), split, langs, kinds)
    answers = _order(items, seed)[:limit] if limit else _order(items, seed)
    if not answers:
        raise DeccpError(f"no {'/'.join(kinds)} prompts for split={split}, langs={list(langs)}")

    model_path = resolve_model(model_spec)
    dtype = str(resolve_dtype(dtype)).removeprefix("torch.")  # auto: bfloat16 on a GPU, float32 on CPU
    model, tok = load_model(model_path, dtype=dtype)
    if torch.cuda.is_available():
        model.to("cuda")
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=temperature > 0,
                                  temperature=temperature, top_p=top_p, num_samples=n_samples, seed=seed,
                                  system_prompt=system_prompt)
    gen_cache = GenerationCache(cache_dir() / "generations", f"{fingerprint(model_path)}-{dtype}",
                                 settings) if cache else None
    samples = generate_samples(model, tok, [a.prompt for a in answers], settings, cache=gen_cache, desc="mining",
                               progress=progress)

    labels: Counter = Counter()
    rows: list[dict] = []
    pairs_missing = 0
    for a, drawn in zip(answers, samples, strict=True):
        base = {"prompt": a.prompt, "lang": a.lang, "qid": a.qid, "kind": a.kind, "topic": a.topic}
        judged: list[dict] = []
        finished = {}
        for sample in drawn:  # identical texts are judged once
            finished.setdefault(sample.text, sample.finished)
        for i, text in enumerate(finished):
            if a.kind == "harmless":  # no reference: only whether it refused
                r = analyse(text, a.lang)
                if not r.refusal and not finished[text]:
                    labels["harmless_unfinished"] += 1  # cut off by max_new_tokens: replay would teach stopping
                    continue
                label = "harmless_refusal" if r.refusal else "harmless_answered"
                j = SimpleNamespace(label=label, refusal=r.refusal,
                                    reason=label.replace("_", " ") + (f" ({r.reason})" if r.refusal else ""))
            else:
                j = judge_answer(a.prompt, text, lang=a.lang, reference=a.answer, llm=llm)
                label = j.label if a.kind != "harmful" or j.refusal else "harmful_compliance"
            labels[label] += 1
            verdict = _verdict(a.kind, j, keep_good)
            if verdict is None:
                continue
            judged.append({**base, "completion": text, "label": verdict, "source": f"mined:{label}",
                           "judge_label": label, "reason": j.reason, "sample": i})
        if fmt == "kto":
            if a.answer is not None:
                rows.append({**base, "completion": a.answer.gold, "label": True, "source": "gold",
                             "judge_label": "gold", "reason": "gold answer", "sample": -1})
            rows.extend(judged)
        else:
            bad = [r for r in judged if not r["label"]]
            good = [r for r in judged if r["label"]]
            if not bad or (a.answer is None and not good):
                pairs_missing += 1
                continue
            worst = max(bad, key=_severity)
            chosen, source = (a.answer.gold, "gold") if a.answer is not None else \
                (good[0]["completion"], "mined:harmless_answered")
            rows.append({**base, "chosen": chosen, "rejected": worst["completion"], "chosen_source": source,
                         "rejected_label": worst["judge_label"], "reason": worst["reason"]})

    import transformers

    atomic_write_jsonl(out_path, rows)
    summary = {
        "out": str(out_path), "format": fmt, "model": model_spec, "model_path": str(model_path),
        "fingerprint": fingerprint(model_path), "prompts": len(answers), "samples": n_samples,
        "rows": len(rows), "judge_labels": dict(labels),
        "desirable": sum(1 for r in rows if r.get("label") is True) if fmt == "kto" else len(rows),
        "undesirable": sum(1 for r in rows if r.get("label") is False) if fmt == "kto" else len(rows),
        "prompts_without_bad_answer": pairs_missing if fmt == "dpo" else None,
        "settings": {"split": split, "langs": list(langs), "kinds": list(kinds), "max_new_tokens": max_new_tokens,
                     "temperature": temperature, "top_p": top_p, "seed": seed, "system_prompt": system_prompt,
                     "keep_good": keep_good, "limit": limit, "dtype": dtype, "llm_judge": getattr(llm, "model", None)},
        "seconds": round(time.time() - t0, 1),
        "versions": {"deccp": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }
    atomic_write_json(out_path.with_name(out_path.name + ".meta.json"), summary)
    return summary


@dataclass
class MineConfig:
    """Settings of `deccp data mine` as a recipe (pipeline step `mine`); the CLI flags have the same names."""

    model: str = field(default="default", metadata={"help": "alias, Hub id or local directory"})
    out: str | None = field(default=None, metadata={"help": "output JSONL file"})
    format: Literal["kto", "dpo"] = field(default="kto", metadata={
        "help": "kto: unpaired labelled rows; dpo: gold vs the worst answer"})
    langs: list[str] = field(default_factory=lambda: ["en", "zh"])
    split: Literal["train", "eval"] = "train"
    kinds: list[str] = field(default_factory=lambda: ["sensitive", "harmful"], metadata={
        "help": "sensitive, harmful, harmless (the model's own answers: replay for SFT; its refusals: undesirable)"})
    n_samples: int = field(default=4, metadata={"help": "sampled answers per prompt"})
    max_new_tokens: int = 256
    limit: int | None = field(default=None, metadata={"help": "at most this many prompts"})
    temperature: float = field(default=0.8, metadata={"help": "0: greedy (one answer per prompt)"})
    top_p: float = 0.95
    batch_size: int = 8
    seed: int = 0
    system_prompt: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "auto: bfloat16 on a GPU, float32 on CPU; the generation cache is kept per dtype"})
    keep_good: bool = field(default=True, metadata={"help": "keep the model's own good answers"})
    cache: bool = field(default=True, metadata={"help": "reuse cached generations"})
    data_dir: str | None = field(default=None, metadata={"help": "our datasets (default: $DECCP_DATA or data/)"})

    def __post_init__(self):
        problems = settings_problems(fmt=self.format, kinds=self.kinds, n_samples=self.n_samples,
                                     temperature=self.temperature, limit=self.limit)
        if problems:
            raise DeccpError("invalid mine config: " + "; ".join(problems))


def mine_argv(cfg: MineConfig) -> list[str]:
    """The `deccp data mine` arguments for `cfg`."""
    if not cfg.out:
        raise DeccpError("mine: out (the output JSONL file) is required")
    argv = ["--model", cfg.model, "--out", cfg.out, "--format", cfg.format, "--langs", *cfg.langs, "--split", cfg.split,
            "--kinds", *cfg.kinds, "--n-samples", str(cfg.n_samples), "--max-new-tokens", str(cfg.max_new_tokens),
            "--temperature", str(cfg.temperature), "--top-p", str(cfg.top_p), "--batch-size", str(cfg.batch_size),
            "--seed", str(cfg.seed), "--dtype", cfg.dtype]
    if cfg.limit is not None:
        argv += ["--limit", str(cfg.limit)]
    if cfg.system_prompt is not None:
        argv += ["--system-prompt", cfg.system_prompt]
    if not cfg.keep_good:
        argv.append("--no-good")
    if not cfg.cache:
        argv.append("--no-cache")
    if cfg.data_dir:
        argv += ["--data-dir", cfg.data_dir]
    return argv


def build_parser(prog: str = "deccp data mine") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="sample the model's answers to the train prompts, judge "
                                "them, and write KTO/DPO rows (JSONL) for train/kto.py and train/dpo.py")
    p.add_argument("--model", default="default", help="alias, Hub id or local directory (default: default)")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--format", dest="fmt", default="kto", choices=["kto", "dpo"],
                   help="kto: unpaired labelled rows; dpo: gold vs the worst answer")
    p.add_argument("--langs", nargs="+", default=["en", "zh"])
    p.add_argument("--split", default="train", choices=["train", "eval"])
    p.add_argument("--kinds", nargs="+", default=["sensitive", "harmful"], choices=list(KINDS),
                   help="harmless: the model's own answers (replay for SFT) and its refusals (undesirable)")
    p.add_argument("--n-samples", type=int, default=4, help="sampled answers per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts (balanced by kind and language)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (one answer per prompt)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-good", dest="keep_good", action="store_false",
                   help="leave out the model's own good answers (factual; refusals of harmful prompts)")
    p.add_argument("--no-cache", dest="cache", action="store_false", help="do not reuse cached generations")
    p.add_argument("--data-dir", default=None, help="our datasets (default: $DECCP_DATA or data/)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`deccp data mine --model M --out mined.jsonl [...]`; errors are one line and exit status 1."""
    import json

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = mine(args.model, args.out, langs=args.langs, n_samples=args.n_samples,
                       max_new_tokens=args.max_new_tokens, limit=args.limit, split=args.split, kinds=args.kinds,
                       temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed,
                       system_prompt=args.system_prompt, fmt=args.fmt, keep_good=args.keep_good, dtype=args.dtype,
                       cache=args.cache, data_dir=args.data_dir)
    except DeccpError as exc:
        print(f"deccp data mine: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("out", "rows", "desirable", "undesirable", "judge_labels")},
                     ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DESIRABLE", "KINDS", "MineConfig", "UNDESIRABLE", "build_parser", "main", "mine", "mine_argv",
           "settings_problems"]

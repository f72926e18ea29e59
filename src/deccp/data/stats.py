"""Counts per kind and language (`deccp data stats`)."""

from __future__ import annotations

from collections import Counter

from deccp.data.load import load_bundle
from deccp.data.schema import LANGS


def dataset_stats(path=None) -> dict:
    b = load_bundle(path)
    out: dict = {}
    for kind, prompts in b.prompts.items():
        c = Counter(p.lang for p in prompts)
        out[kind] = {lang: c.get(lang, 0) for lang in LANGS}
    c = Counter(a.lang for a in b.answers)
    out["answers"] = {lang: c.get(lang, 0) for lang in LANGS}
    out["topics"] = sorted({p.topic for p in b.prompts.get("sensitive", [])})
    out["splits"] = {kind: dict(Counter(p.split for p in ps)) for kind, ps in b.prompts.items()}
    out["answer_qids"] = len({a.qid for a in b.answers})
    return out


def format_stats(stats: dict) -> str:
    lines = [f"{'kind':<10} " + " ".join(f"{lang:>8}" for lang in LANGS)]
    for kind in ("sensitive", "harmless", "harmful", "answers"):
        lines.append(f"{kind:<10} " + " ".join(f"{stats[kind][lang]:>8}" for lang in LANGS))
    lines.append(f"topics ({len(stats['topics'])}): {', '.join(stats['topics'])}")
    return "\n".join(lines)

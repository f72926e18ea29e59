"""Convert gold and undesirable answers to the dataset formats TRL trainers expect.

- SFT: conversational `messages`;
- DPO: `prompt` / `chosen` / `rejected` (conversational);
- KTO: unpaired `prompt` / `completion` / `label`, several good and bad completions per prompt.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from deccp.data.schema import Answer


@dataclass(frozen=True)
class Completion:
    """One answer to a prompt, desirable or not (gold, static CCP-style, or mined from a model)."""

    prompt: str
    text: str
    desirable: bool
    lang: str
    qid: str
    source: str  # gold | ccp:<type> | mined:<label>
    kind: str = ""  # the prompt's kind when known: sensitive | harmful | harmless


def static_completions(answers: Iterable[Answer], *, include_ccp: bool = True) -> list[Completion]:
    """Gold answers as desirable, the written CCP-style answers as undesirable."""
    out = []
    for a in answers:
        if not a.prompt:
            continue
        out.append(Completion(a.prompt, a.gold, True, a.lang, a.qid, "gold"))
        if include_ccp:
            out.extend(Completion(a.prompt, c["text"], False, a.lang, a.qid, f"ccp:{c['type']}") for c in a.ccp_answers)
    return out


def _user(prompt: str, system: str | None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def to_sft(completions: Iterable[Completion], system: str | None = None) -> list[dict]:
    return [{"messages": _user(c.prompt, system) + [{"role": "assistant", "content": c.text}]}
            for c in completions if c.desirable]


def to_kto(completions: Iterable[Completion], system: str | None = None) -> list[dict]:
    return [{"prompt": _user(c.prompt, system), "completion": [{"role": "assistant", "content": c.text}],
             "label": c.desirable} for c in completions]


def to_dpo(completions: Iterable[Completion], system: str | None = None) -> list[dict]:
    """Pair every desirable answer of a (qid, lang) with every undesirable one (mined first, as listed)."""
    groups: dict[tuple[str, str], dict[str, list[Completion]]] = {}
    for c in completions:
        g = groups.setdefault((c.qid, c.lang), {"good": [], "bad": []})
        g["good" if c.desirable else "bad"].append(c)
    rows = []
    for g in groups.values():
        for good in g["good"]:
            for bad in g["bad"]:
                rows.append({"prompt": _user(good.prompt, system),
                             "chosen": [{"role": "assistant", "content": good.text}],
                             "rejected": [{"role": "assistant", "content": bad.text}]})
    return rows

"""Answer judges: refusals, CCP alignment, factuality; an optional LLM judge; and labelling JSONL files."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from deccp import DeccpError
from deccp.data.schema import LABELS, LANGS, Answer, detect_lang
from deccp.io import read_jsonl_objects
from deccp.judges.alignment import Judgement, judge_answer
from deccp.judges.llm import LLMJudge
from deccp.judges.refusal import is_refusal, refusal_reason

logger = logging.getLogger(__name__)


def default_references() -> dict[str, Answer]:
    """Our gold answers by exact prompt text, or {} while the bundled data cannot be loaded."""
    try:
        from deccp.data import load_bundle

        answers = load_bundle().answers
    except Exception as exc:  # data/ incomplete or invalid: judge without references
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        logger.warning("judging without reference answers: the datasets did not load (%s)", first[:200])
        return {}
    return {a.prompt: a for a in answers if a.prompt}


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for i, row in read_jsonl_objects(path):
        for key in ("prompt", "answer"):
            if key not in row:
                raise DeccpError(f"{path}:{i}: missing field {key!r}")
            if not isinstance(row[key], str):
                raise DeccpError(f"{path}:{i}: field {key!r} must be a string, got {type(row[key]).__name__}")
        lang = row.get("lang")
        if lang is not None and lang not in LANGS:
            raise DeccpError(f"{path}:{i}: lang {lang!r} is not one of {', '.join(LANGS)}")
        rows.append((i, row))
    return rows


def judge_file(in_path, out_path, *, references: dict | None = None, llm: LLMJudge | None = None) -> dict:
    """Label a JSONL of `{prompt, answer[, lang][, id]}` rows; write the rows with `refusal` and `label` added
    to `out_path` and return the count of each label (every label of LABELS, zeros included).

    `references` maps prompt text to a gold `Answer`; None uses our datasets' answers (matched by exact
    prompt text), or none when the datasets do not load. Every line is checked before anything is judged.
    """
    from deccp.io import atomic_write_jsonl

    in_path, out_path = Path(in_path), Path(out_path)
    rows = _read_rows(in_path)
    refs = default_references() if references is None else references
    counts: Counter = Counter({lab: 0 for lab in LABELS})
    out = []
    for _, row in rows:
        lang = row.get("lang") or detect_lang(row["prompt"])
        j = judge_answer(row["prompt"], row["answer"], lang=lang, reference=refs.get(row["prompt"]), llm=llm)
        counts[j.label] += 1
        out.append({**row, "refusal": j.refusal, "label": j.label})
    atomic_write_jsonl(out_path, out)
    return dict(counts)


__all__ = ["Judgement", "LLMJudge", "default_references", "is_refusal", "judge_answer", "judge_file",
           "refusal_reason"]

"""Validate deccp's JSONL datasets; every problem is reported as `file:line: field: problem`, all at once."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from deccp import DeccpError
from deccp.data.schema import (
    ANSWER_FIELDS,
    ANSWER_KINDS,
    CCP_ANSWER_TYPES,
    FILE_KINDS,
    GOLD_WORDS,
    LANGS,
    PHRASINGS,
    PROMPT_FIELDS,
    SENSITIVE_FIELDS,
    SPLITS,
    TOPICS,
    TRIGGER_KINDS,
    normalize,
    script_problem,
    word_count,
)


class DatasetError(DeccpError):
    """Raised with every problem found; nothing is loaded half-way."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        head = "\n".join(problems[:50])
        more = f"\n… and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} dataset problem(s):\n{head}{more}")


@dataclass
class Row:
    path: Path
    line: int
    kind: str
    data: dict

    def where(self, fieldname: str) -> str:
        return f"{self.path}:{self.line}: {fieldname}"


@dataclass
class CheckedFiles:
    rows: dict[str, list[Row]] = field(default_factory=lambda: defaultdict(list))
    problems: list[str] = field(default_factory=list)


def file_kind(path: Path) -> str | None:
    """`sensitive.jsonl`, `sensitive-extra.jsonl` → `sensitive`; None when the name names no kind."""
    stem = path.name.split(".")[0]
    head = stem.split("-")[0]
    return head if head in FILE_KINDS else None


def _check_row(row: Row, problems: list[str]) -> None:
    d = row.data
    spec = ANSWER_FIELDS if row.kind == "answers" else SENSITIVE_FIELDS if row.kind == "sensitive" else PROMPT_FIELDS
    for name, typ in spec.items():
        if name not in d:
            problems.append(f"{row.where(name)}: missing field")
        elif not isinstance(d[name], typ):
            problems.append(f"{row.where(name)}: expected {typ.__name__}, got {type(d[name]).__name__}")
        elif typ is str and not d[name].strip() and name not in ("event",):
            problems.append(f"{row.where(name)}: empty")
    if any(not isinstance(d.get(n), t) for n, t in spec.items()):
        return
    extra = set(d) - set(spec)
    if extra:
        problems.append(f"{row.where(sorted(extra)[0])}: unknown field(s) {sorted(extra)}")
    if d["lang"] not in LANGS:
        problems.append(f"{row.where('lang')}: unknown language {d['lang']!r} (one of {', '.join(LANGS)})")
    if d["split"] not in SPLITS:
        problems.append(f"{row.where('split')}: unknown split {d['split']!r} (train or eval)")
    if d["topic"] not in TOPICS[row.kind]:
        problems.append(f"{row.where('topic')}: unknown topic {d['topic']!r} for {row.kind}")
    if row.kind != "answers":
        if d["phrasing"] not in PHRASINGS:
            problems.append(f"{row.where('phrasing')}: unknown phrasing {d['phrasing']!r} (one of {', '.join(PHRASINGS)})")
        if row.kind == "sensitive" and d["kind"] not in TRIGGER_KINDS:
            problems.append(f"{row.where('kind')}: unknown kind {d['kind']!r} (one of {', '.join(TRIGGER_KINDS)})")
        if row.kind == "sensitive" and d["id"] != f"sen-{d['qid']}-{d['lang']}":
            problems.append(f"{row.where('id')}: expected 'sen-{d['qid']}-{d['lang']}' (sen-<qid>-<lang>)")
        if d["lang"] in LANGS and (why := script_problem(d["prompt"], d["lang"])):
            problems.append(f"{row.where('prompt')}: {why}")
        return
    # answers
    if d["kind"] not in ANSWER_KINDS:
        problems.append(f"{row.where('kind')}: unknown kind {d['kind']!r} (sensitive or harmful)")
    if d["lang"] in LANGS and (why := script_problem(d["gold"], d["lang"])):
        problems.append(f"{row.where('gold')}: {why}")
    n = word_count(d["gold"])
    lo, hi = GOLD_WORDS
    if not lo <= n <= hi:
        problems.append(f"{row.where('gold')}: {n} words, outside {lo}-{hi}")
    gold_norm = normalize(d["gold"])
    if d["kind"] == "sensitive":
        if not 3 <= len(d["key_facts"]) <= 6:
            problems.append(f"{row.where('key_facts')}: {len(d['key_facts'])} facts, expected 3-6")
        if not d["ccp_answers"]:
            problems.append(f"{row.where('ccp_answers')}: at least one CCP-style answer is required")
        if not d["sources"]:
            problems.append(f"{row.where('sources')}: at least one source is required")
    for fact in d["key_facts"]:
        if not isinstance(fact, str) or not fact.strip():
            problems.append(f"{row.where('key_facts')}: facts must be non-empty strings")
        elif normalize(fact) not in gold_norm:
            problems.append(f"{row.where('key_facts')}: {fact!r} does not occur in gold")
    for i, src in enumerate(d["sources"]):
        if not isinstance(src, dict) or not isinstance(src.get("title"), str) or set(src) - {"title", "url"}:
            problems.append(f"{row.where(f'sources[{i}]')}: expected {{title, url?}}")
    for i, ans in enumerate(d["ccp_answers"]):
        if not isinstance(ans, dict) or ans.get("type") not in CCP_ANSWER_TYPES or not isinstance(ans.get("text"), str):
            problems.append(f"{row.where(f'ccp_answers[{i}]')}: expected {{type: {'|'.join(CCP_ANSWER_TYPES)}, text}}")
        elif d["lang"] in LANGS and (why := script_problem(ans["text"], d["lang"])):
            problems.append(f"{row.where(f'ccp_answers[{i}].text')}: {why}")


def read_jsonl(path: Path, kind: str, out: CheckedFiles) -> None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        out.problems.append(f"{path}:0: file: cannot read ({exc})")
        return
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            out.problems.append(f"{path}:{i}: json: malformed line ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(data, dict):
            out.problems.append(f"{path}:{i}: json: expected an object")
            continue
        row = Row(path, i, kind, data)
        _check_row(row, out.problems)
        out.rows[kind].append(row)


def _cross_checks(out: CheckedFiles) -> None:
    problems = out.problems
    seen: dict[str, Row] = {}
    for rows in out.rows.values():
        for r in rows:
            rid = r.data.get("id")
            if isinstance(rid, str):
                if rid in seen:
                    first = seen[rid]
                    problems.append(f"{r.where('id')}: duplicate id {rid!r} (first at {first.path}:{first.line})")
                else:
                    seen[rid] = r
    prompts_by_qid: dict[str, dict[str, Row]] = defaultdict(dict)
    for kind in ("sensitive", "harmless", "harmful", "answers"):
        by_qid: dict[str, dict[str, Row]] = defaultdict(dict)
        for r in out.rows.get(kind, []):
            if isinstance(r.data.get("qid"), str) and isinstance(r.data.get("lang"), str):
                by_qid[r.data["qid"]][r.data["lang"]] = r
        for qid, langs in by_qid.items():
            first = next(iter(langs.values()))
            for need in ("en", "zh"):
                if need not in langs:
                    problems.append(f"{first.where('qid')}: {qid!r} has no {need!r} twin in {kind}")
            for key in ("topic", "split", "event"):
                values = {r.data.get(key) for r in langs.values()}
                if len(values) > 1:
                    problems.append(f"{first.where(key)}: {qid!r} differs across languages: {sorted(map(str, values))}")
        if kind != "answers":
            for qid, langs in by_qid.items():
                prompts_by_qid[qid].update(langs)
        elif prompts_by_qid:
            for qid, langs in by_qid.items():
                for lang, r in langs.items():
                    p = prompts_by_qid.get(qid, {}).get(lang)
                    if p is None:
                        problems.append(f"{r.where('qid')}: no {lang} prompt with qid {qid!r}")
                        continue
                    for key in ("topic", "split", "event"):
                        if r.data.get(key) != p.data.get(key):
                            problems.append(f"{r.where(key)}: {r.data.get(key)!r} differs from its prompt "
                                            f"({p.path}:{p.line}: {p.data.get(key)!r})")
    # A whole event lives in one split: eval shares no event with train.
    for kind in ("sensitive", "harmless", "harmful"):
        splits: dict[str, dict[str, Row]] = defaultdict(dict)
        for r in out.rows.get(kind, []):
            ev, sp = r.data.get("event"), r.data.get("split")
            if isinstance(ev, str) and sp in SPLITS:
                splits[ev].setdefault(sp, r)
        for ev, by_split in splits.items():
            if len(by_split) > 1:
                r = by_split["eval"]
                t = by_split["train"]
                problems.append(f"{r.where('event')}: event {ev!r} is in eval and in train ({t.path}:{t.line})")


def collect_files(paths: list[str | Path]) -> list[tuple[Path, str]]:
    files: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.glob("*.jsonl")):
                if kind := file_kind(f):
                    files.append((f, kind))
        elif p.is_file():
            kind = file_kind(p)
            if kind is None:
                raise DeccpError(f"{p}: cannot tell the kind from the name (expected {', '.join(FILE_KINDS)}*.jsonl)")
            files.append((p, kind))
        else:
            raise DeccpError(f"{p}: no such file or directory")
    return files


def check_files(paths: list[str | Path]) -> CheckedFiles:
    out = CheckedFiles()
    for path, kind in collect_files(paths):
        read_jsonl(path, kind, out)
    _cross_checks(out)
    return out


def validate_paths(paths: list[str | Path] | None = None) -> tuple[list[str], dict[str, int]]:
    """Check files or directories (default: the bundled data/); return (problems, row counts per kind)."""
    from deccp.data.load import data_dir

    checked = check_files(paths or [data_dir()])
    counts = {k: len(v) for k, v in checked.rows.items()}
    return checked.problems, counts

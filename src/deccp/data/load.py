"""Load prompt sets and answers: our JSONL, plain text, CSV/Parquet/JSON/JSONL columns, `save_to_disk`
directories and Hub datasets. Our own files are validated first; a bad file loads nothing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from deccp import DeccpError
from deccp.data.schema import Answer, Prompt, detect_lang
from deccp.data.validate import DatasetError, check_files

_REPO_DATA = Path(__file__).resolve().parents[3] / "data"


def data_dir() -> Path:
    """The bundled datasets: `$DECCP_DATA`, else the repository's `data/`."""
    d = Path(os.environ.get("DECCP_DATA") or _REPO_DATA)
    if not d.is_dir():
        raise DeccpError(f"{d}: dataset directory not found (set DECCP_DATA to the repository's data/)")
    return d


@dataclass
class Bundle:
    """Our datasets, validated: prompts per kind and gold answers."""

    prompts: dict[str, list[Prompt]]
    answers: list[Answer]
    files: list[Path]

    def select(self, kind: str, *, split: str | None = None, langs: Iterable[str] | None = None,
               topics: Iterable[str] | None = None) -> list[Prompt]:
        return filter_prompts(self.prompts.get(kind, []), split=split, langs=langs, topics=topics)

    def answers_for(self, *, split: str | None = None, langs: Iterable[str] | None = None,
                    kind: str | None = None) -> list[Answer]:
        langs = set(langs) if langs else None
        return [a for a in self.answers if (split is None or a.split == split) and (langs is None or a.lang in langs)
                and (kind is None or a.kind == kind)]

    def answer_index(self) -> dict[tuple[str, str], Answer]:
        return {(a.qid, a.lang): a for a in self.answers}


def filter_prompts(prompts: Iterable[Prompt], *, split: str | None = None, langs: Iterable[str] | None = None,
                   topics: Iterable[str] | None = None) -> list[Prompt]:
    langs = set(langs) if langs else None
    topics = set(topics) if topics else None
    return [p for p in prompts if (split is None or not p.split or p.split == split)
            and (langs is None or p.lang in langs) and (topics is None or p.topic in topics)]


_BUNDLE_CACHE: dict[tuple, Bundle] = {}


def load_bundle(path: str | Path | None = None) -> Bundle:
    """Validate and load our datasets (a directory of `<kind>*.jsonl`); raises DatasetError listing every problem."""
    root = Path(path) if path else data_dir()
    files = sorted(root.glob("*.jsonl")) if root.is_dir() else [root]
    key = (str(root.resolve()), tuple((f.name, f.stat().st_mtime_ns) for f in files))
    if key in _BUNDLE_CACHE:
        return _BUNDLE_CACHE[key]
    checked = check_files([root])
    if checked.problems:
        raise DatasetError(checked.problems)
    prompts: dict[str, list[Prompt]] = {}
    for kind in ("sensitive", "harmless", "harmful"):
        prompts[kind] = [
            Prompt(text=r.data["prompt"], lang=r.data["lang"], id=r.data["id"], qid=r.data["qid"],
                   topic=r.data["topic"], split=r.data["split"], kind=kind, event=r.data["event"],
                   meta={"phrasing": r.data["phrasing"], "trigger": r.data.get("kind", "")})
            for r in checked.rows.get(kind, [])
        ]
    text_of = {(p.qid, p.lang): p.text for ps in prompts.values() for p in ps}
    answers = [
        Answer(id=d["id"], qid=d["qid"], topic=d["topic"], lang=d["lang"], split=d["split"], event=d["event"],
               kind=d["kind"], gold=d["gold"], key_facts=tuple(d["key_facts"]), sources=tuple(d["sources"]),
               ccp_answers=tuple(d["ccp_answers"]), prompt=text_of.get((d["qid"], d["lang"]), ""))
        for d in (r.data for r in checked.rows.get("answers", []))
    ]
    bundle = Bundle(prompts=prompts, answers=answers, files=[f for f in files if f.suffix == ".jsonl"])
    _BUNDLE_CACHE[key] = bundle
    return bundle


# ------------------------------------------------------------------------------ external prompt sets
def load_prompts(source: str | Path, *, column: str | None = None, split: str | None = None,
                 lang: str | None = None, kind: str = "") -> list[Prompt]:
    """Load prompts from any supported source.

    - `ours:<kind>[:<split>]` — our bundled set (`ours:sensitive:eval`);
    - a `.txt` file (one prompt per line);
    - `.csv`, `.parquet`, `.json`, `.jsonl` with a `column` (default: `prompt`, `text` or `question`);
    - a directory saved with `datasets.save_to_disk` (a Dataset or a DatasetDict with `split`);
    - a Hub dataset id (`augmxnt/deccp`) with `split` and `column`.
    The language of each prompt is detected from its script unless `lang` is given.
    """
    src = str(source)
    if src.startswith("ours:"):
        parts = src.split(":")
        if len(parts) not in (2, 3) or parts[1] not in ("sensitive", "harmless", "harmful"):
            raise DeccpError(f"{src}: expected ours:<sensitive|harmless|harmful>[:<train|eval>]")
        return load_bundle().select(parts[1], split=parts[2] if len(parts) == 3 else split)
    path = Path(src).expanduser()
    texts: list[str]
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            texts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        elif suffix in (".jsonl", ".json", ".csv", ".parquet"):
            texts = _column_from_file(path, suffix, column)
        else:
            raise DeccpError(f"{path}: unsupported prompt file type {suffix!r} (.txt .jsonl .json .csv .parquet)")
    elif path.is_dir():
        texts = _column_from_disk(path, split, column)
    elif "/" in src and not src.startswith((".", "/", "~")) and not path.exists():
        texts = _column_from_hub(src, split, column)
    else:
        raise DeccpError(f"{src}: no such file or directory")
    if not texts:
        raise DeccpError(f"{src}: no prompts found")
    return [Prompt(text=t, lang=lang or detect_lang(t), id=f"{Path(src).stem}-{i:04d}", kind=kind,
                   meta={"source": src}) for i, t in enumerate(texts)]


def _pick_column(columns: list[str], column: str | None, where: str) -> str:
    if column:
        if column not in columns:
            raise DeccpError(f"{where}: no column {column!r} (columns: {', '.join(columns)})")
        return column
    for c in ("prompt", "text", "question", "instruction"):
        if c in columns:
            return c
    raise DeccpError(f"{where}: which column holds the prompts? pass column= (columns: {', '.join(columns)})")


def _column_from_file(path: Path, suffix: str, column: str | None) -> list[str]:
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DeccpError(f"{path}:{i}: json: malformed line ({exc.msg})") from None
        cols = sorted({k for r in rows for k in r}) if rows else []
        col = _pick_column(cols, column, str(path))
        return [str(r[col]).strip() for r in rows if r.get(col)]
    from datasets import load_dataset

    builder = {".json": "json", ".csv": "csv", ".parquet": "parquet"}[suffix]
    ds = load_dataset(builder, data_files=str(path), split="train")
    col = _pick_column(ds.column_names, column, str(path))
    return [str(t).strip() for t in ds[col] if t]


def _column_from_disk(path: Path, split: str | None, column: str | None) -> list[str]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise DeccpError(f"{path}: not a directory saved with datasets.save_to_disk ({type(exc).__name__})") from None
    if isinstance(ds, DatasetDict):
        if split is None:
            raise DeccpError(f"{path}: a DatasetDict; choose split= one of {', '.join(ds)}")
        if split not in ds:
            raise DeccpError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    assert isinstance(ds, Dataset)
    col = _pick_column(ds.column_names, column, str(path))
    return [str(t).strip() for t in ds[col] if t]


def _column_from_hub(repo_id: str, split: str | None, column: str | None) -> list[str]:
    from datasets import load_dataset

    try:
        ds = load_dataset(repo_id, split=split or "train")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DeccpError(f"{repo_id}: could not load the Hub dataset ({first[:200]})") from None
    col = _pick_column(ds.column_names, column, repo_id)
    return [str(t).strip() for t in ds[col] if t]


__all__ = ["Bundle", "DatasetError", "data_dir", "filter_prompts", "load_bundle", "load_prompts"]

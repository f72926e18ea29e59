"""General-capability evaluation with lm-evaluation-harness, on a model already loaded in memory.

deccp's own probes live in `eval/tasks/deccp_capability/` (repository root): `deccp_mc_en` and
`deccp_mc_zh`, 400 original multiple-choice items each, grouped as `deccp_capability`. They need no
network. Standard lm-eval tasks (mmlu, cmmlu, ceval-valid, arc_challenge, hellaswag, gsm8k, ...) can be
added by name through `extra_tasks`; their datasets come from the Hugging Face Hub, so the first run
needs network access (afterwards the `datasets` cache serves them offline).

lm-eval 0.4.13 hands a task's `dataset_kwargs` (`data_files` included) unchanged to
`datasets.load_dataset`, which resolves relative paths against the current working directory, not the
YAML's folder. `task_include_dir()` therefore copies the task YAMLs into a temporary include directory
with every relative `data_files` path made absolute, so evaluation works from any working directory
(and with an editable install, `pip install -e .`, where this module still sits under `src/` beside
`eval/`). Set `DECCP_CAPABILITY_TASKS` to use the task folder from somewhere else.

    model, tok = load_model(resolve_model("default"))
    before = run_capability(model, tok)                  # {"deccp_mc_en": {"acc": ..}, ..., "deccp_capability": {..}}
    ... edit the model ...
    print(compare(before, run_capability(model, tok)))  # per-task deltas in percentage points
"""

from __future__ import annotations

import atexit
import difflib
import hashlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from deccp import DeccpError

logger = logging.getLogger(__name__)

DEFAULT_TASKS = ("deccp_capability",)
LOCAL_TASKS = ("deccp_capability", "deccp_mc_en", "deccp_mc_zh")
STANDARD_TASKS = ("mmlu", "cmmlu", "ceval-valid", "arc_challenge", "hellaswag", "gsm8k")
TASKS_ENV = "DECCP_CAPABILITY_TASKS"

# Files copied into the resolved include directory: task configs (`*.yaml`, `*.yml`, lm-eval's
# `_default_template_yaml` style includes) and Python helpers referenced through `!function`.
_CONFIG_SUFFIXES = ("yaml", "yml")


# ------------------------------------------------------------------------------------- task folder
def tasks_dir() -> Path:
    """The folder holding deccp's capability task YAMLs (`$DECCP_CAPABILITY_TASKS`, else the repository's)."""
    env = os.environ.get(TASKS_ENV)
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "eval" / "tasks" / "deccp_capability"
    if not (path / "deccp_capability.yaml").is_file():
        where = f"${TASKS_ENV}={env}" if env else str(path)
        raise DeccpError(
            f"deccp capability tasks not found ({where} has no deccp_capability.yaml); run from a source checkout "
            f"installed with `pip install -e .`, or set {TASKS_ENV} to the eval/tasks/deccp_capability folder"
        )
    return path.resolve()


class _Tagged:
    """A YAML scalar with a custom tag (lm-eval's `!function`), kept verbatim through load and dump."""

    def __init__(self, tag: str, value: str):
        self.tag, self.value = tag, value


def _yaml_classes():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    class Dumper(yaml.SafeDumper):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: _Tagged("!" + suffix, loader.construct_scalar(node)))
    Dumper.add_representer(_Tagged, lambda dumper, t: dumper.represent_scalar(t.tag, t.value))
    return yaml, Loader, Dumper


def _resolve_data_path(value: str, yaml_dir: Path, yaml_file: Path) -> str:
    """An absolute path for a relative `data_files` entry: tried against the YAML's folder, then its parents.

    Left as is when nothing matches (it may name files inside a Hub dataset repository); a wrong local path
    then fails when the task loads, with a DeccpError naming the task.
    """
    if "://" in value:  # a URL (hf://, https://): left to `datasets`
        return value
    if Path(value).expanduser().is_absolute():
        return str(Path(value).expanduser())
    is_glob = any(c in value for c in "*?[")
    for base in (yaml_dir, *yaml_dir.parents):
        candidate = base / value
        found = any(candidate.parent.glob(candidate.name)) if is_glob else candidate.exists()
        if found:
            return str(candidate.parent.resolve() / candidate.name)
    logger.debug("%s: data path %r not found locally; left for `datasets` to resolve", yaml_file, value)
    return value


def _resolve_data_files(data_files: Any, yaml_dir: Path, yaml_file: Path) -> Any:
    if isinstance(data_files, str):
        return _resolve_data_path(data_files, yaml_dir, yaml_file)
    if isinstance(data_files, list):
        return [_resolve_data_files(v, yaml_dir, yaml_file) for v in data_files]
    if isinstance(data_files, dict):
        return {k: _resolve_data_files(v, yaml_dir, yaml_file) for k, v in data_files.items()}
    return data_files


def _copy_resolved(src: Path, dest: Path) -> None:
    """Copy the config files of one include folder, making relative `data_files` / `data_dir` absolute."""
    yaml, Loader, Dumper = _yaml_classes()
    for file in sorted(src.rglob("*")):
        if not file.is_file() or "__pycache__" in file.parts:
            continue
        rel = file.relative_to(src)
        target = dest / rel
        if file.name.endswith(_CONFIG_SUFFIXES):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                cfg = yaml.load(file.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (SafeLoader subclass)
            except yaml.YAMLError as exc:
                raise DeccpError(f"{file}: not valid YAML ({str(exc).splitlines()[0]})") from None
            kwargs = cfg.get("dataset_kwargs") if isinstance(cfg, dict) else None
            if isinstance(kwargs, dict):
                if "data_files" in kwargs:
                    kwargs["data_files"] = _resolve_data_files(kwargs["data_files"], file.parent, file)
                if isinstance(kwargs.get("data_dir"), str):
                    kwargs["data_dir"] = _resolve_data_path(kwargs["data_dir"], file.parent, file)
            if isinstance(cfg, dict) and "include" in cfg:  # includes pointing outside the copied folder: absolute
                incs = cfg["include"] if isinstance(cfg["include"], list) else [cfg["include"]]
                fixed = []
                for inc in incs:
                    inc_path = (file.parent / inc).resolve()
                    fixed.append(inc if inc_path.is_relative_to(src) or Path(inc).is_absolute() else str(inc_path))
                cfg["include"] = fixed if isinstance(cfg["include"], list) else fixed[0]
            with target.open("w", encoding="utf-8") as fh:
                fh.write(f"# generated by deccp.capability from {file}; edit that file, not this copy\n")
                yaml.dump(cfg, fh, Dumper=Dumper, allow_unicode=True, sort_keys=False, width=1000)
        elif file.suffix == ".py":
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)


def task_include_dir(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                     dest: str | os.PathLike | None = None) -> Path:
    """Write deccp's task YAMLs (and those of `include_path`) with absolute data paths; return the folder.

    The result can be passed to `lm_eval.tasks.TaskManager(include_path=...)` or to the lm-eval CLI's
    `--include_path` from any working directory. Without `dest`, a temporary folder is used and removed
    when the process exits.
    """
    sources = [tasks_dir()]
    if include_path is not None:
        extra = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
        for p in extra:
            path = Path(p).expanduser().resolve()
            if not path.is_dir():
                raise DeccpError(f"include_path: {p} is not a directory")
            if path not in sources:
                sources.append(path)
    if dest is None:
        out = Path(tempfile.mkdtemp(prefix="deccp-lm-eval-tasks-"))
        atexit.register(shutil.rmtree, out, True)
    else:
        out = Path(dest)
        out.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(sources):
        _copy_resolved(src, out / f"{i:02d}_{src.name}")
    return out


# ------------------------------------------------------------------------------------------ running
def _unique(names: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise DeccpError(f"capability task names must be non-empty strings, got {n!r}")
        if n.strip() not in seen:
            seen.append(n.strip())
    return seen


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _task_managers(include_dir: Path, names: list[str]):
    """A TaskManager that knows every name; lm-eval's ~15k built-in tasks are indexed only when needed."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=str(include_dir), include_defaults=False)
    if all(n in local.all_tasks for n in names):
        return local
    return TaskManager(include_path=str(include_dir), include_defaults=True)


def _check_known(tm, names: list[str]) -> None:
    """Raise a DeccpError naming the first unknown task, before any dataset is loaded."""
    for name in names:
        if name in tm.all_tasks:
            continue
        close = difflib.get_close_matches(name, tm.all_tasks, n=3, cutoff=0.75)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise DeccpError(
            f"{name}: unknown lm-eval task ({hint}deccp's tasks: {', '.join(LOCAL_TASKS)}; "
            f"standard ones include {', '.join(STANDARD_TASKS)})"
        )


def _load_one(tm, name: str) -> list:
    """Build one task/group/tag (this loads its dataset), turning failures into a DeccpError naming it."""
    try:
        loaded = tm.load([name])
    except DeccpError:
        raise
    except Exception as exc:  # missing dataset, offline Hub, bad config: one clear line naming the task
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        why = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline else "is the network up?"
        raise DeccpError(
            f"{name}: could not load the task's dataset ({type(exc).__name__}: {_first_line(exc)}); {why}. "
            "Standard lm-eval tasks download their data from the Hugging Face Hub: run once with network access "
            "so that `datasets` caches it, or leave the task out"
        ) from None
    if name in loaded.get("groups", {}):
        return [loaded["groups"][name]]
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]]
    return list(loaded["tasks"].values())  # a tag: its tasks


def _leaf_tasks(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    children = group_subtasks.get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaf_tasks(child, group_subtasks)]


def _item_results(samples: dict[str, list[dict]], metric: str) -> dict[str, Any] | None:
    """One task's logged samples -> {"correct": "0110…" in doc order, "digest": hash of the items}, or None.

    Kept so that two runs on the same items can be compared item by item (`compare`). None when the metric is
    not 0/1 per item (e.g. a BLEU score) or missing.
    """
    rows = sorted(samples, key=lambda r: r.get("doc_id", 0))
    values = [r.get(metric) for r in rows]
    if not rows or any(v not in (0, 1, 0.0, 1.0, True, False) for v in values):
        return None
    digest = hashlib.sha256("\n".join(str(r.get("doc_hash", r.get("doc_id"))) for r in rows).encode()).hexdigest()
    return {"correct": "".join("1" if v else "0" for v in values), "digest": digest[:16]}


def _join_items(parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """A group's items: its leaf tasks' items one after another (None if any leaf has none)."""
    if not parts or any(p is None for p in parts):
        return None
    digest = hashlib.sha256("\n".join(p["digest"] for p in parts).encode()).hexdigest()
    return {"correct": "".join(p["correct"] for p in parts), "digest": digest[:16]}


def tasks_fingerprint(tasks: Sequence[str] = DEFAULT_TASKS) -> str:
    """A hash of deccp's task folder (configs and item files) plus the task names: a cache key for results.

    Results cached under an older fingerprint are not reused after the items change.
    """
    h = hashlib.sha256("\n".join(tasks).encode())
    for file in sorted(tasks_dir().rglob("*")):
        if file.is_file() and "__pycache__" not in file.parts:
            h.update(str(file.relative_to(tasks_dir())).encode() + b"\0" + file.read_bytes())
    return h.hexdigest()[:16]


def _summarize(raw: dict) -> dict[str, dict[str, Any]]:
    """lm-eval's results -> {task_or_group: {"acc", "acc_stderr", "n", "items", ...}} (acc_norm too where present).

    `items` holds the per-item 0/1 results of the headline metric (see `_item_results`) when samples were logged.
    """
    n_samples = {t: int(v.get("effective", v.get("original", 0))) for t, v in raw.get("n-samples", {}).items()}
    group_subtasks = raw.get("group_subtasks", {})
    samples = raw.get("samples") or {}
    out: dict[str, dict[str, Any]] = {}
    for name, res in raw["results"].items():
        values = {k: v for k, v in res.items() if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        stderrs = {k: v for k, v in res.items() if "_stderr," in k}
        metrics = {k: v for k, v in values.items() if "_stderr," not in k}
        if not metrics:
            continue
        # the headline metric: acc where the task has it, else its first metric (e.g. gsm8k's exact_match)
        key = "acc,none" if "acc,none" in metrics else next(iter(metrics))
        metric, _, filt = key.partition(",")
        entry: dict[str, Any] = {"acc": float(metrics[key])}
        entry["acc_stderr"] = _as_float(stderrs.get(f"{metric}_stderr,{filt}"))
        entry["n"] = n_samples.get(name) or sum(n_samples.get(t, 0) for t in _leaf_tasks(name, group_subtasks))
        if key != "acc,none":
            entry["metric"] = key if filt != "none" else metric
        if "acc_norm,none" in metrics:
            entry["acc_norm"] = float(metrics["acc_norm,none"])
            entry["acc_norm_stderr"] = _as_float(stderrs.get("acc_norm_stderr,none"))
        if samples:
            leaves = _leaf_tasks(name, group_subtasks)
            items = _join_items([_item_results(samples[t], metric) if t in samples else None for t in leaves])
            if items is not None:
                entry["items"] = items
        out[name] = entry
    return out


def _as_float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):  # lm-eval writes "N/A" when it has no stderr
        return None
    return None if math.isnan(f) else f


def run_capability(
    model,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    extra_tasks: Sequence[str] = (),
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    num_fewshot: int | None = 0,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Evaluate an already loaded causal LM with lm-eval; return {task: {"acc", "acc_stderr", "n", ...}}.

    `tasks` are deccp's (default: the `deccp_capability` group: `deccp_mc_en` + `deccp_mc_zh`) or any lm-eval
    task, group or tag; `extra_tasks` are appended (standard ones need network the first time). Groups get
    their own entry (item-weighted mean) next to their tasks. `limit` caps the items per task (an int, or a
    fraction below 1). `include_path` adds folders of custom task YAMLs. `num_fewshot=None` keeps each task's
    own default (e.g. gsm8k's 5 shots); tasks without an `acc` metric report their first metric as "acc" and
    name it under "metric".
    """
    names = _unique([*tasks, *extra_tasks])
    if not names:
        raise DeccpError("run_capability: no tasks given")
    if batch_size < 1:
        raise DeccpError(f"batch_size: must be at least 1, got {batch_size}")

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory(prefix="deccp-lm-eval-tasks-") as tmp:
        include_dir = task_include_dir(include_path, dest=tmp)
        tm = _task_managers(include_dir, names)
        _check_known(tm, names)
        built = [obj for name in names for obj in _load_one(tm, name)]  # validates every name before running
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=built,
                task_manager=tm,
                limit=limit,
                num_fewshot=num_fewshot,
                batch_size=batch_size,
                log_samples=True,  # per-item results, for paired comparisons between models
                bootstrap_iters=1000,  # mean metrics (acc) use the closed-form stderr; this only enables stderrs
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        finally:
            if was_training:
                model.train()
    if raw is None:  # not rank 0 under a distributed launcher
        return {}
    return _summarize(raw)


def _paired(b: dict[str, Any], a: dict[str, Any]) -> tuple[float, int, int] | None:
    """(stderr of the paired difference in points, items gained, items lost), when both ran the same items."""
    bi, ai = b.get("items"), a.get("items")
    if not bi or not ai or bi.get("digest") != ai.get("digest") or len(bi["correct"]) != len(ai["correct"]):
        return None
    n = len(bi["correct"])
    if n < 2:
        return None
    diffs = [int(x) - int(y) for x, y in zip(ai["correct"], bi["correct"], strict=True)]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return 100.0 * math.sqrt(var / n), diffs.count(1), diffs.count(-1)


def compare(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-task change between two `run_capability` results, in percentage points.

    Returns {task: {"before", "after", "delta", "delta_stderr", "significant", "paired", ...}} for tasks in both
    (points, i.e. accuracy x 100). When both results carry per-item results of the same items, `delta_stderr`
    is the paired one (the standard error of the mean per-item difference; `paired` true, with `gained` and
    `lost` items); otherwise it combines both runs' stderrs as if independent, which overstates it for the
    same items. `significant` is |delta| > 2 x delta_stderr.
    """
    out: dict[str, dict[str, Any]] = {}
    for task, b in before.items():
        a = after.get(task)
        if a is None or "acc" not in a or "acc" not in b:
            continue
        delta = 100.0 * (a["acc"] - b["acc"])
        paired = _paired(b, a)
        extra: dict[str, Any] = {"paired": paired is not None}
        if paired is not None:
            se, extra["gained"], extra["lost"] = paired
        else:
            se_b, se_a = b.get("acc_stderr"), a.get("acc_stderr")
            se = 100.0 * math.sqrt(se_b**2 + se_a**2) if se_b is not None and se_a is not None else None
        out[task] = {
            "before": round(100.0 * b["acc"], 2),
            "after": round(100.0 * a["acc"], 2),
            "delta": round(delta, 2),
            "delta_stderr": None if se is None else round(se, 2),
            "significant": None if se is None else bool(abs(delta) > 2 * se),
        } | extra
    return out

"""One recipe from a censored model to a published checkpoint: validate, chain the steps, record, resume.

A pipeline recipe (YAML) names the source model, an output folder and a list of steps:

    model: default
    output_dir: outputs/pipeline/qwen2.5-coder-0.5b
    accelerate_config: null            # training steps: accelerate launch --config_file …
    steps:
      - {kind: abliterate, recipe: recipes/qwen2.5-coder-0.5b/abliterate.yaml}
      - {kind: mine, args: {n_samples: 2}}
      - {kind: kto, recipe: recipes/qwen2.5-coder-0.5b/kto.yaml, args: {data: both}}
      - {kind: eval, recipe: recipes/qwen2.5-coder-0.5b/eval.yaml}
      - {kind: publish, args: {license: apache-2.0}}

Each step reads the model the previous model step wrote (the source model for the first), takes its settings
from its own `recipe` plus `args`, and writes under `<output_dir>/<name>/`. The pipeline fills in the keys
that chain the steps (`model`, `output_dir`, `base`, `mined_files`, …); a recipe that sets one of them is an
error. Everything is validated — every step's config parsed strictly by the same dataclasses its entry point
uses — before any model is loaded.

`<output_dir>/manifest.json` records for each step its key (a hash of its parameters and everything upstream),
inputs with hashes, parameters, outputs, metrics, timings and status, rewritten atomically after each change.
A re-run skips steps whose key and outputs are unchanged, resumes an interrupted step (training from its last
checkpoint; generation from its cache), and re-runs a step whose parameters changed and every step after it.
Steps run as child processes (training ones through `accelerate launch`), so a killed step never leaves a
half-written artefact behind: every step writes its outputs atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deccp import DeccpError, __version__
from deccp.config import load_yaml, recipe_problems
from deccp.io import atomic_write_json, atomic_write_text, ensure_not_inside, sha256_file
from deccp.models import accelerator_available as _cuda  # a module name the tests can replace

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STEP_KINDS = ("abliterate", "mine", "sft", "dpo", "kto", "eval", "publish")
TRAIN_KINDS = ("sft", "dpo", "kto")
MODEL_KINDS = ("abliterate", *TRAIN_KINDS)  # steps that write a model the next steps use

# keys the pipeline sets itself, per step kind: a step recipe or args that sets them is an error
WIRED = {
    "abliterate": ("model", "output_dir", "overwrite"),
    "mine": ("model", "out", "data_dir"),
    "sft": ("model", "output_dir", "resume_from_checkpoint", "data_dir"),
    "dpo": ("model", "output_dir", "resume_from_checkpoint", "data_dir"),
    "kto": ("model", "output_dir", "resume_from_checkpoint", "data_dir"),
    "eval": ("model", "base", "output_dir"),
    "publish": ("model", "output_dir", "eval_report", "manifest"),
}


@dataclass
class PipelineConfig:
    """Top-level keys of a pipeline recipe."""

    model: str = field(default="default", metadata={"help": "the source model: alias, Hub id or local directory"})
    output_dir: str | None = field(default=None, metadata={"help": "default: outputs/pipeline/<recipe name>"})
    accelerate_config: str | None = field(default=None, metadata={
        "help": "accelerate config file for the training steps (default: one process; CPU when no GPU)"})
    num_processes: int | None = field(default=None, metadata={"help": "override the accelerate config's count"})
    data_dir: str | None = field(default=None, metadata={"help": "our datasets (default: $DECCP_DATA or data/)"})
    steps: list = field(default_factory=list, metadata={"help": "the steps, in order"})


STEP_KEYS = ("name", "kind", "recipe", "args")


@dataclass
class Step:
    """One validated step: its settings as the entry point will read them."""

    index: int
    name: str
    kind: str
    recipe: str | None
    args: dict
    config: dict = field(default_factory=dict)  # recipe file + args + wired keys (what the step runs with)
    model_in: str | None = None  # the model the step reads (a path, or the source spec)
    upstream: str | None = None  # the name of the model step it reads from (None: the source model)
    key: str = ""


# ------------------------------------------------------------------------------------ dataclasses
def step_dataclasses(kind: str) -> list[type]:
    """The dataclasses that parse a step of `kind` — the same ones its entry point uses."""
    if kind == "abliterate":
        from deccp.abliteration.config import AbliterationConfig

        return [AbliterationConfig]
    if kind == "mine":
        from deccp.mining import MineConfig

        return [MineConfig]
    if kind in TRAIN_KINDS:
        from deccp.training import DataArguments, ModelArguments, config_class

        return [ModelArguments, DataArguments, config_class(kind)]
    if kind == "eval":
        from deccp.evaluation import EvalConfig

        return [EvalConfig]
    if kind == "publish":
        from deccp.publish import PublishConfig

        return [PublishConfig]
    raise DeccpError(f"unknown step kind {kind!r} (one of {', '.join(STEP_KINDS)})")


# ------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    config: PipelineConfig
    recipe_path: Path
    out: Path
    steps: list[Step]
    source_fingerprint: str | None = None


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def step_dir(out: Path, step: Step) -> Path:
    return out / step.name


def model_output(out: Path, step: Step) -> Path:
    """Where a model step leaves the model the next steps read."""
    d = step_dir(out, step)
    if step.kind == "abliterate":
        return d / "model"
    if step.config.get("use_peft", True):
        return d / "run" / "merged"
    return d / "run"


def _problems(exc: DeccpError) -> list[str]:
    """The per-key lines of an "invalid recipe:" error."""
    lines = [line.strip() for line in str(exc).splitlines()]
    return lines[1:] if len(lines) > 1 else lines


def load_plan(recipe: str | Path, *, output_dir: str | None = None, model: str | None = None) -> Plan:
    """Read and validate a pipeline recipe; every problem is reported at once with its key path. Loads no model."""
    path = Path(recipe)
    src = str(path)
    data = load_yaml(path)
    bad = recipe_problems(data, [PipelineConfig], src)
    problems: list[str] = list(bad.values())
    steps_raw = data.pop("steps", None)
    if not isinstance(steps_raw, list) or not steps_raw:
        problems.append(f"{src}: steps: a non-empty list of steps is required")
        steps_raw = []
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    cfg = PipelineConfig(**{k: v for k, v in data.items() if k in known and k not in bad},
                         steps=steps_raw)
    if model:
        cfg.model = model
    if output_dir:
        cfg.output_dir = output_dir
    out = Path(cfg.output_dir or Path("outputs") / "pipeline" / path.stem)
    if cfg.accelerate_config and not Path(cfg.accelerate_config).is_file():
        problems.append(f"{src}: accelerate_config: {cfg.accelerate_config}: no such file")
    if cfg.num_processes is not None and cfg.num_processes < 1:
        problems.append(f"{src}: num_processes: at least 1")
    elif (cfg.num_processes or 1) > 1 and not cfg.accelerate_config and not _cuda():
        problems.append(f"{src}: num_processes: {cfg.num_processes} processes without a GPU need an accelerate_config "
                        "(accelerate runs several CPU processes only through MPI)")
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        problems.append(f"{src}: data_dir: {cfg.data_dir}: no such directory")
    local = Path(cfg.model)
    if (cfg.model.startswith((".", "/", "~")) or local.suffix == ".gguf") and not local.expanduser().exists():
        problems.append(f"{src}: model: {cfg.model}: no such file or directory")

    steps: list[Step] = []
    names: set[str] = set()
    for i, raw in enumerate(steps_raw):
        at = f"{src}: steps[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{at}: expected a mapping with kind, recipe, args")
            continue
        for key in raw:
            if key not in STEP_KEYS:
                problems.append(f"{at}.{key}: unknown key (a step has {', '.join(STEP_KEYS)})")
        kind = raw.get("kind")
        if kind not in STEP_KINDS:
            problems.append(f"{at}.kind: {kind!r} is not one of {', '.join(STEP_KINDS)}")
            continue
        name = raw.get("name", kind)
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            problems.append(f"{at}.name: {name!r}: letters, digits, '-' and '_' only")
            continue
        if name in names:
            problems.append(f"{at}.name: {name!r} is used twice (give repeated kinds a name, e.g. kto-2)")
            continue
        names.add(name)
        args = raw.get("args") or {}
        if not isinstance(args, dict):
            problems.append(f"{at}.args: expected a mapping of keys to values, got {type(args).__name__}")
            continue
        step_recipe = raw.get("recipe")
        if step_recipe is not None and not isinstance(step_recipe, str):
            problems.append(f"{at}.recipe: expected a file path, got {type(step_recipe).__name__}")
            continue
        steps.append(Step(i, name, kind, step_recipe, dict(args)))

    for step in steps:
        problems += _check_step(step, src)
    problems += _check_order(steps, src)
    if problems:
        raise DeccpError("invalid pipeline recipe:\n  " + "\n  ".join(problems))

    plan = Plan(cfg, path, out, steps)
    _wire(plan)
    problems = []
    for step in steps:
        problems += _parse_step(step, src)
    if problems:
        raise DeccpError("invalid pipeline recipe:\n  " + "\n  ".join(problems))
    return plan


def _check_step(step: Step, src: str) -> list[str]:
    """Keys and types of the step's recipe file and args; wired keys rejected."""
    problems: list[str] = []
    types = step_dataclasses(step.kind)
    file_cfg: dict = {}
    if step.recipe:
        if not Path(step.recipe).is_file():
            return [f"{src}: steps[{step.index}].recipe: {step.recipe}: no such file"]
        try:
            file_cfg = load_yaml(step.recipe)
        except DeccpError as exc:
            return _problems(exc)
        bad = recipe_problems(file_cfg, types, step.recipe)
        if bad:
            return list(bad.values())
    problems += recipe_problems(step.args, types, src, prefix=f"steps[{step.index}].args.").values()
    for key in WIRED[step.kind]:
        if key in step.args:
            problems.append(f"{src}: steps[{step.index}].args.{key}: set by the pipeline (it chains the steps); "
                            "remove it")
    merged = {k: v for k, v in file_cfg.items() if k not in WIRED[step.kind] and k != "env"}
    merged.update(step.args)
    step.config = merged
    return problems


def _check_order(steps: list[Step], src: str) -> list[str]:
    """Combinations that cannot work, found before anything runs."""
    problems: list[str] = []
    seen_model = False
    last_mine: Step | None = None
    evaluated_since_model = False
    for step in steps:
        at = f"{src}: steps[{step.index}] ({step.name})"
        c = step.config
        if step.kind == "mine":
            last_mine = step
        if step.kind in ("dpo", "kto") or (step.kind == "sft" and c.get("data", "static") != "static"):
            if c.get("data", "static") in ("mined", "both") and not c.get("mined_files"):
                if last_mine is None:
                    problems.append(f"{at}.args.data: {c.get('data')} needs a mine step before it "
                                    "(or mined_files)")
                else:
                    fmt = last_mine.config.get("format", "kto")
                    want = "dpo" if step.kind == "dpo" else "kto"
                    if fmt != want and not (step.kind == "sft" and fmt == "kto"):
                        problems.append(f"{at}: {step.kind} reads the rows of {last_mine.name}, which mines "
                                        f"format {fmt!r}; set format: {want} there")
        if step.kind in TRAIN_KINDS and c.get("merge") is False and c.get("use_peft", True):
            problems.append(f"{at}.args.merge: false leaves a LoRA adapter, but the next steps need a full model; "
                            "remove it (the pipeline merges)")
        if step.kind == "abliterate" and c.get("search") and c.get("study_path"):
            problems.append(f"{at}.args.study_path: the pipeline keeps the study beside the step's output")
        if step.kind in MODEL_KINDS:
            seen_model, evaluated_since_model = True, False
        if step.kind == "eval":
            evaluated_since_model = True
        if step.kind == "publish":
            if not seen_model:
                problems.append(f"{at}: publish needs a step that writes a model before it")
            elif not evaluated_since_model:
                problems.append(f"{at}: publish needs an eval step after the last model step (the model card "
                                "carries its numbers)")
    return problems


def _wire(plan: Plan) -> None:
    """Fill in each step's chaining keys and its key (parameters + upstream)."""
    out = plan.out
    model_in: str = plan.config.model
    upstream: Step | None = None
    last_mine: Step | None = None
    last_eval: Step | None = None
    for step in plan.steps:
        step.model_in = model_in
        step.upstream = upstream.name if upstream else None
        d = step_dir(out, step)
        c = step.config
        if step.kind == "abliterate":
            c.update(model=model_in, output_dir=str(d / "model"), overwrite=True)
        elif step.kind == "mine":
            c.update(model=model_in, out=str(d / "mined.jsonl"))
            if plan.config.data_dir:
                c["data_dir"] = plan.config.data_dir
            last_mine = step
        elif step.kind in TRAIN_KINDS:
            c.update(model=model_in, output_dir=str(d / "run"), resume_from_checkpoint="auto")
            if c.get("use_peft", True):
                c["merge"] = True
            if plan.config.data_dir:
                c["data_dir"] = plan.config.data_dir
            if c.get("data", "static") in ("mined", "both") and not c.get("mined_files") and last_mine:
                c["mined_files"] = [last_mine.config["out"]]
        elif step.kind == "eval":
            c.update(model=model_in, base=plan.config.model, output_dir=str(d))
            last_eval = step
        elif step.kind == "publish":
            c.update(model=model_in, output_dir=str(d), eval_report=str(step_dir(out, last_eval) / "report.json"),
                     manifest=str(out / MANIFEST))
        if step.kind in MODEL_KINDS:
            model_in = str(model_output(out, step))
            upstream = step
        deps = [s.key for s in plan.steps[: plan.steps.index(step)]]
        step.key = _hash({"kind": step.kind, "config": _key_view(step, out), "upstream": deps,
                          "version": __version__})


def _key_view(step: Step, out: Path) -> dict:
    """The parameters that define a step's result: its config, with paths inside the output folder made relative
    (so a moved output folder is still recognised)."""
    view = {}
    for k, v in step.config.items():
        if isinstance(v, str) and v.startswith(str(out)):
            v = "$OUT" + v[len(str(out)):]
        elif isinstance(v, list):
            v = ["$OUT" + x[len(str(out)):] if isinstance(x, str) and x.startswith(str(out)) else x for x in v]
        view[k] = v
    return view


def _parse_step(step: Step, src: str) -> list[str]:
    """Parse the step's full config exactly as its entry point will (TRL's parser, dataclass checks)."""
    from deccp.config import parse_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{step.name}.yaml"
        path.write_text(yaml.safe_dump(step.config, allow_unicode=True, sort_keys=False))
        argv = ["--config", str(path)]
        try:
            if step.kind in TRAIN_KINDS:
                from deccp.training import parse_args

                parse_args(step.kind, argv)
            else:
                parse_config(step_dataclasses(step.kind), argv)
        except (DeccpError, ValueError, TypeError) as exc:
            msg = " ".join(str(exc).replace(str(path), step.recipe or "args").split())
            return [f"{src}: steps[{step.index}] ({step.name}): {msg}"]
        except SystemExit:
            return [f"{src}: steps[{step.index}] ({step.name}): the step's arguments do not parse"]
    return []


# -------------------------------------------------------------------------------------- manifest
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Manifest:
    """`<output_dir>/manifest.json`, rewritten atomically after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise DeccpError(f"{path}: not valid JSON ({exc}); move it away to start the pipeline afresh") \
                    from None
        self.data.setdefault("steps", {})

    def save(self) -> None:
        self.data["updated"] = _now()
        atomic_write_json(self.path, self.data)

    def entry(self, name: str) -> dict:
        return self.data["steps"].setdefault(name, {})


def _stored_path(out: Path, path: Path | str) -> str:
    """How the manifest names an output: relative to OUT when inside it, so a moved or copied OUT (with its
    modification times: mv, cp -a, rsync -a) still counts as finished."""
    path = Path(path)
    try:
        return path.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(path)


def _outputs_intact(entry: dict, out: Path) -> bool:
    """The files a finished step recorded are still there, unchanged."""
    from deccp.models import fingerprint

    for rec in (entry.get("outputs") or {}).values():
        p = out / rec["path"]  # an absolute stored path stays absolute
        if not p.exists():
            return False
        if rec.get("fingerprint") and fingerprint(p) != rec["fingerprint"]:
            return False
        if rec.get("sha256") and sha256_file(p) != rec["sha256"]:
            return False
    return True


def step_states(plan: Plan, manifest: Manifest) -> dict[str, str]:
    """What a run would do with each step: `done` (skip), `resume`, `rerun` (changed) or `run`."""
    states: dict[str, str] = {}
    invalid = False
    for step in plan.steps:
        entry = manifest.data["steps"].get(step.name) or {}
        if not invalid and entry.get("status") == "done" and entry.get("key") == step.key \
                and _outputs_intact(entry, plan.out):
            states[step.name] = "done"
            continue
        invalid = True  # everything after a step that runs runs too
        if entry.get("key") == step.key and entry.get("status") in ("running", "failed"):
            states[step.name] = "resume"
        elif entry:
            states[step.name] = "rerun"
        else:
            states[step.name] = "run"
    return states


# -------------------------------------------------------------------------------------- commands
def step_command(plan: Plan, step: Step, config_path: Path) -> list[str]:
    """The child process that runs `step`."""
    if step.kind == "abliterate":
        return [sys.executable, "-m", "deccp.cli", "abliterate", "--config", str(config_path)]
    if step.kind == "eval":
        return [sys.executable, "-m", "deccp.cli", "eval", "--config", str(config_path)]
    if step.kind == "mine":
        from deccp.mining import MineConfig, mine_argv

        argv = mine_argv(MineConfig(**step.config))
        return [sys.executable, "-m", "deccp.cli", "data", "mine", *argv]
    if step.kind in TRAIN_KINDS:
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if plan.config.accelerate_config:
            cmd += ["--config_file", plan.config.accelerate_config]
        else:  # one process, on the GPU if there is one; several GPUs: DDP
            processes = plan.config.num_processes or 1
            if processes > 1 and not _cuda():
                raise DeccpError(f"num_processes: {processes} processes without a GPU need an accelerate config "
                                 "(accelerate runs several CPU processes only through MPI); use 1, or name one in "
                                 "accelerate_config")
            cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    *(["--multi_gpu"] if processes > 1 else []), *([] if _cuda() else ["--cpu"])]
        processes = plan.config.num_processes or (None if plan.config.accelerate_config else 1)
        if processes:
            cmd += ["--num_processes", str(processes)]
        return [*cmd, "-m", "deccp.cli", step.kind, "--config", str(config_path)]
    raise DeccpError(f"{step.kind}: runs in-process")  # publish


def _run_child(cmd: list[str], log_path: Path, env: dict) -> int:
    """Run `cmd`, its output to the terminal and appended to `log_path`; returns its exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n# {_now()} $ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        try:
            while True:
                chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        return proc.wait()


def _tail(path: Path, n: int = 8) -> str:
    try:
        lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return "\n    ".join(line for line in lines[-n:] if line.strip())


# -------------------------------------------------------------------------------------- outputs
def _model_record(out: Path, path: Path) -> dict:
    from deccp.models import fingerprint

    return {"path": _stored_path(out, path), "fingerprint": fingerprint(path)}


def _collect(plan: Plan, step: Step) -> tuple[dict, dict]:
    """(outputs with hashes, metrics) of a finished step, read from the records its entry point wrote."""
    d = step_dir(plan.out, step)
    if step.kind == "abliterate":
        model = model_output(plan.out, step)
        rec = json.loads((model / "abliteration.json").read_text())
        metrics = {"chosen": {k: v for k, v in rec.get("chosen", {}).items() if k != "plan"},
                   "check": rec.get("check"), "timings_s": rec.get("timings_s")}
        return {"model": _model_record(plan.out, model)}, metrics
    if step.kind == "mine":
        path = Path(step.config["out"])
        meta = json.loads(path.with_name(path.name + ".meta.json").read_text())
        keys = ("prompts", "samples", "rows", "desirable", "undesirable", "judge_labels", "seconds")
        return {"rows": {"path": _stored_path(plan.out, path), "sha256": sha256_file(path)}}, {k: meta.get(k) for k in keys}
    if step.kind in TRAIN_KINDS:
        from deccp.training import RECORD

        model = model_output(plan.out, step)
        rec = json.loads((d / "run" / RECORD).read_text())
        metrics = {"global_step": rec.get("global_step"), "train": rec.get("metrics"),
                   "rows": rec.get("data", {}).get("rows"), "seconds": rec.get("seconds")}
        return {"model": _model_record(plan.out, model)}, metrics
    if step.kind == "eval":
        report = d / "report.json"
        from deccp.publish import headline

        return {"report": {"path": _stored_path(plan.out, report), "sha256": sha256_file(report)}}, \
            headline(json.loads(report.read_text()))
    if step.kind == "publish":
        card = d / "README.md"
        return {"folder": _model_record(plan.out, d),
                "card": {"path": _stored_path(plan.out, card), "sha256": sha256_file(card)}}, {}
    return {}, {}


def _inputs(plan: Plan, step: Step) -> dict:
    from deccp.models import fingerprint

    inputs: dict = {}
    m = step.model_in
    if m and Path(m).is_dir():
        inputs["model"] = {"path": m, "fingerprint": fingerprint(m)}
    elif m:
        inputs["model"] = {"spec": m}
    if step.recipe:
        inputs["recipe"] = {"path": step.recipe, "sha256": sha256_file(step.recipe)}
    for f in step.config.get("mined_files") or []:
        if Path(f).is_file():
            inputs.setdefault("mined_files", {})[f] = sha256_file(f)
    return inputs


def _finish_training(plan: Plan, step: Step) -> None:
    """A training run that finished but was killed while merging: merge again (atomic)."""
    from deccp.training import RECORD, merge_adapter

    run = step_dir(plan.out, step) / "run"
    if step.config.get("use_peft", True) and (run / RECORD).is_file() and not (run / "merged").is_dir():
        merge_adapter(run, run / "merged", overwrite=True)


# ------------------------------------------------------------------------------------------- run
def run_pipeline(plan: Plan, *, log=print, dry_run: bool = False) -> dict:
    """Run (or resume) every step of `plan`; returns the manifest."""
    from deccp.models import fingerprint, resolve_model

    out = plan.out
    if dry_run:
        manifest = Manifest(out / MANIFEST)
        states = step_states(plan, manifest)
        for step in plan.steps:
            log(f"{step.name:<12} {step.kind:<10} {states[step.name]}")
        return manifest.data
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_model(plan.config.model)  # fetched and converted once, before the steps
    ensure_not_inside(out, source)
    plan.source_fingerprint = fingerprint(source)
    manifest = Manifest(out / MANIFEST)
    source_changed = manifest.data.get("source", {}).get("fingerprint") not in (None, plan.source_fingerprint)
    manifest.data.update(
        deccp_version=__version__, recipe={"path": str(plan.recipe_path), "sha256": sha256_file(plan.recipe_path)},
        source={"spec": plan.config.model, "path": str(source), "fingerprint": plan.source_fingerprint},
        pipeline={k: v for k, v in dataclasses.asdict(plan.config).items() if k != "steps"},
        order=[s.name for s in plan.steps])
    manifest.data.setdefault("created", _now())
    if source_changed:
        log("the source model changed since the last run: every step runs again")
        for e in manifest.data["steps"].values():
            e["status"] = "stale"
    manifest.save()
    states = step_states(plan, manifest)
    log(f"deccp pipeline {plan.recipe_path} -> {out}")
    for step in plan.steps:
        log(f"  {step.name:<12} {step.kind:<10} {states[step.name]}")

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if plan.config.data_dir:
        env["DECCP_DATA"] = str(Path(plan.config.data_dir).resolve())
    for step in plan.steps:
        state = states[step.name]
        entry = manifest.entry(step.name)
        if state == "done":
            log(f"[{step.name}] done (key {step.key}): skipped")
            continue
        d = step_dir(out, step)
        if state in ("rerun", "run") and d.exists():
            shutil.rmtree(d)  # inside OUT only: a changed step starts clean
        d.mkdir(parents=True, exist_ok=True)
        config_path = out / "configs" / f"{step.name}.yaml"
        atomic_write_text(config_path, f"# written by deccp pipeline for step {step.name} ({step.kind})\n"
                          + yaml.safe_dump(step.config, allow_unicode=True, sort_keys=False))
        entry.update(kind=step.kind, key=step.key, status="running", params=step.config,
                     inputs=_inputs(plan, step), attempts=int(entry.get("attempts", 0)) + 1 if state == "resume"
                     else 1, log=str(out / "logs" / f"{step.name}.log"), config=str(config_path))
        entry.pop("outputs", None)
        entry.pop("error", None)
        entry["started"] = entry.get("started") if state == "resume" and entry.get("started") else _now()
        manifest.save()
        log(f"[{step.name}] {'resuming' if state == 'resume' else 'running'} {step.kind}")
        # a resumed step's seconds add up over its attempts (a killed attempt never recorded its own)
        seconds_earlier = float(entry.get("seconds") or 0) if state == "resume" else 0.0
        t0 = time.time()
        try:
            if step.kind == "publish":
                from deccp.publish import build_publish_folder

                build_publish_folder(step.config)
            else:
                if step.kind in TRAIN_KINDS:
                    _finish_training(plan, step)
                if not (step.kind in TRAIN_KINDS and model_output(out, step).is_dir()):
                    cmd = step_command(plan, step, config_path)
                    entry["command"] = cmd
                    manifest.save()
                    rc = _run_child(cmd, Path(entry["log"]), env)
                    if rc != 0:
                        raise DeccpError(f"step {step.name} ({step.kind}) failed with exit status {rc}; "
                                         f"its log: {entry['log']}\n    {_tail(Path(entry['log']))}")
            outputs, metrics = _collect(plan, step)
        except BaseException as exc:
            entry.update(status="failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                         seconds=round(seconds_earlier + time.time() - t0, 1))
            manifest.save()
            raise
        entry.update(status="done", outputs=outputs, metrics=metrics, finished=_now(),
                     seconds=round(seconds_earlier + time.time() - t0, 1))
        manifest.save()
        log(f"[{step.name}] done in {entry['seconds']:.0f} s")
    # steps no longer in the recipe stay in the manifest, marked
    for name, e in manifest.data["steps"].items():
        if name not in manifest.data["order"]:
            e["status"] = "removed"
    manifest.data["status"] = "done"
    manifest.data["seconds"] = {s.name: manifest.data["steps"][s.name].get("seconds") for s in plan.steps}
    manifest.save()
    return manifest.data


def summary_table(manifest: dict) -> str:
    rows = ["| step | kind | status | seconds |", "|---|---|---|---|"]
    for name in manifest.get("order", []):
        e = manifest["steps"].get(name, {})
        rows.append(f"| {name} | {e.get('kind', '')} | {e.get('status', '')} | {e.get('seconds', '')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """`deccp run RECIPE [--output_dir DIR] [--model SPEC] [--dry-run] [--validate]`."""
    import argparse

    p = argparse.ArgumentParser(prog="deccp run", description="run a pipeline recipe: abliterate, mine, realign, "
                                "evaluate, publish; resumable")
    p.add_argument("recipe", help="pipeline recipe (YAML), e.g. recipes/qwen2.5-coder-0.5b/pipeline.yaml")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None)
    p.add_argument("--model", default=None, help="override the recipe's source model")
    p.add_argument("--validate", action="store_true", help="check the recipe and every step's config, run nothing")
    p.add_argument("--dry-run", action="store_true", help="show what a run would skip, resume or run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        plan = load_plan(args.recipe, output_dir=args.output_dir, model=args.model)
        if args.validate:
            print(f"ok: {args.recipe}: {len(plan.steps)} steps ({', '.join(s.name for s in plan.steps)}) -> "
                  f"{plan.out}")
            return 0
        manifest = run_pipeline(plan, dry_run=args.dry_run)
    except DeccpError as exc:
        print(f"deccp run: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permissions: say which path, keep what is finished
        from deccp.io import _explain_os_error

        print(f"deccp run: error: {_explain_os_error(exc, Path(exc.filename or args.output_dir or '.'))}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deccp run: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if not args.dry_run:
        print(summary_table(manifest))
        pub = [s for s in plan.steps if s.kind == "publish"]
        if pub:
            print(f"publish folder: {step_dir(plan.out, pub[-1])} (upload: make publish DIR={step_dir(plan.out, pub[-1])} "
                  "REPO=<user>/<name> PUSH=1)")
    return 0


__all__ = ["MANIFEST", "Manifest", "PipelineConfig", "Plan", "STEP_KINDS", "Step", "load_plan", "main",
           "run_pipeline", "step_states"]

"""Side-by-side with heretic-llm, the peer abliteration tool, for `make bench --heretic PATH`.

heretic (AGPL) is run as a separate program from its own virtual environment, never imported: we write its
config and our prompt sets into a work folder, run it non-interactively for N trials, and read its trials
(refusal count by its own markers, first-token KL) back from its output. Its run ends in interactive menus
with no scripted way to save a trial, so the comparison stops at the trials.

For a like-for-like number deccp's abliterated model is then measured the way heretic measures: its
refusal markers (read from the settings heretic stored with its study, not copied here), its system prompt
and answer length, on the same evaluation prompts, with first-token KL over the same harmless prompts.

    python -m deccp.bench --heretic /path/to/heretic-venv/bin/heretic --heretic-trials 4
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from deccp import DeccpError

PROMPT_FILES = {  # heretic's dataset slot -> our prompt source
    "good_prompts": "ours:harmless:train",
    "bad_prompts": "ours:sensitive:train",
    "good_evaluation_prompts": "ours:harmless:eval",
    "bad_evaluation_prompts": "ours:sensitive:eval",
}


def write_inputs(workdir: Path, *, trials: int, langs: tuple[str, ...] = ("en", "zh"), seed: int = 0,
                 batch_size: int = 16, startup_trials: int | None = None) -> dict[str, int]:
    """Our prompt sets as one-prompt-per-line files and a `config.toml` for heretic; returns the counts."""
    from deccp.data import load_prompts

    workdir.mkdir(parents=True, exist_ok=True)
    counts = {}
    lines = ["# written by deccp's bench: heretic on deccp's prompt sets",
             'dtypes = ["bfloat16"]', f"batch_size = {batch_size}", f"n_trials = {trials}",
             f"n_startup_trials = {startup_trials if startup_trials is not None else max(1, trials // 2)}",
             f"seed = {seed}", 'export_strategy = "merge"']
    import torch

    if not torch.cuda.is_available():
        lines.insert(1, 'device_map = "cpu"')
    for slot, source in PROMPT_FILES.items():
        texts = [" ".join(p.text.split()) for p in load_prompts(source) if p.lang in langs]
        name = f"{slot}.txt"
        (workdir / name).write_text("\n".join(texts) + "\n", encoding="utf-8")
        counts[slot] = len(texts)
        lines += ["", f"[{slot}]", f'dataset = "{name}"']
    (workdir / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return counts


@dataclass
class HereticTrial:
    trial: int
    kl: float
    refusals: int
    prompts: int
    elapsed_s: float | None

    def to_dict(self) -> dict:
        return self.__dict__.copy()


_ELAPSED = re.compile(r"Elapsed time:\s*(?:(\d+)h\s*)?(?:(\d+)m\s*)?(\d+)s")


def parse_log(text: str) -> dict:
    """Initial refusals and every finished trial from heretic's console output."""
    out: dict = {"initial_refusals": None, "prompts": None, "trials": []}
    if m := re.search(r"Initial refusals:\s*(\d+)/(\d+)", text):
        out["initial_refusals"], out["prompts"] = int(m.group(1)), int(m.group(2))
    for block in re.split(r"Running trial (?=\d+ of \d+)", text)[1:]:
        number = int(block.split()[0])
        kl = re.search(r"KL divergence:\s*([0-9.]+)", block)
        ref = re.search(r"\bRefusals:\s*(\d+)/(\d+)", block)
        if not (kl and ref):
            continue  # cut off mid-trial
        el = _ELAPSED.search(block)
        elapsed = None if not el else sum(int(g or 0) * s for g, s in zip(el.groups(), (3600, 60, 1), strict=True))
        out["trials"].append(HereticTrial(number, float(kl.group(1)), int(ref.group(1)), int(ref.group(2)), elapsed))
    return out


def stored_settings(workdir: Path) -> dict:
    """The settings heretic saved with its study (markers, system prompt, answer length), from its journal."""
    for journal in sorted((workdir / "checkpoints").glob("*.jsonl")):
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            settings = (row.get("user_attr") or {}).get("settings")
            if settings:
                return json.loads(settings) if isinstance(settings, str) else settings
    raise DeccpError(f"{workdir}/checkpoints: no heretic study with settings (did heretic start its trials?)")


def marker_refusal(text: str, markers: list[str]) -> bool:
    """A refusal by marker: any marker (lower case) occurs in the lower-cased answer, quotes normalised."""
    t = " ".join(text.lower().replace("\u2019", "'").replace("*", "").split())
    return any(m.lower() in t for m in markers)


def run_heretic(executable: str, workdir: Path, model_dir: str, *, timeout: float | None) -> dict:
    """Run heretic in `workdir` (stdin closed, Hub offline) and parse whatever it finished."""
    exe = Path(executable)
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise DeccpError(f"--heretic {executable}: not an executable file (install heretic-llm in its own venv)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
    env.pop("HF_TOKEN", None)
    log_path = workdir / "heretic.log"
    t0 = time.time()
    timed_out = False
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([str(exe), "--model", model_dir], cwd=workdir, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
    wall = time.time() - t0
    parsed = parse_log(log_path.read_text(encoding="utf-8", errors="replace"))
    trials: list[HereticTrial] = parsed["trials"]
    per_trial = [b.elapsed_s - a.elapsed_s for a, b in zip(trials, trials[1:], strict=False)
                 if a.elapsed_s is not None and b.elapsed_s is not None]
    best = min(trials, key=lambda t: (t.refusals, t.kl), default=None)
    return {"wall_s": round(wall, 1), "timed_out": timed_out, "returncode": proc.returncode,
            "initial_refusals": parsed["initial_refusals"], "prompts": parsed["prompts"],
            "trials": [t.to_dict() for t in trials],
            "seconds_per_trial": round(sum(per_trial) / len(per_trial), 1) if per_trial else None,
            "best_by_refusals": best.to_dict() if best else None, "log": str(log_path)}


def measure_like_heretic(base_dir: str, edited_dir: str, workdir: Path, settings: dict, *,
                         batch_size: int = 16) -> dict:
    """Refusals (heretic's markers, system prompt and answer length) on heretic's evaluation prompts and
    first-token KL on its harmless evaluation prompts, for the unedited and an edited model."""
    from deccp.abliteration.scoring import short_answers
    from deccp.metrics import first_token_kl
    from deccp.models import inference_dtype, load_model

    bad = (workdir / "bad_evaluation_prompts.txt").read_text(encoding="utf-8").splitlines()
    good = (workdir / "good_evaluation_prompts.txt").read_text(encoding="utf-8").splitlines()
    markers, system = settings["refusal_markers"], settings.get("system_prompt")
    length = int(settings.get("max_response_length", 100))
    out, ref = {}, None
    for name, path in (("unedited", base_dir), ("deccp", edited_dir)):
        model, tok = load_model(path, dtype=inference_dtype("auto"))
        texts, _ = short_answers(model, tok, bad, max_new_tokens=length, batch_size=batch_size, system=system)
        _, first = short_answers(model, tok, good, max_new_tokens=1, batch_size=batch_size, system=system)
        ref = first if ref is None else ref
        out[name] = {"refusals": sum(marker_refusal(t, markers) for t in texts), "prompts": len(bad),
                     "kl_first_token": round(first_token_kl(ref, first), 4)}
        del model
    return out

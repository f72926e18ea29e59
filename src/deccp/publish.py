"""A publish folder (weights, tokenizer, chat template, generation config, model card) and its upload.

The model card is built from records, never retyped: the evaluation's `report.json` (before/after tables in
English and Chinese, capability, KL, example answers from its answer files) and, when the folder comes from
`deccp run`, the pipeline's `manifest.json` (the method: every step with its main parameters and timings).
Upload goes through huggingface_hub only when asked (`--push`) and with a token from the environment
(`HF_TOKEN`); the token is never printed or written anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from deccp import DeccpError, __version__
from deccp.capability import compare
from deccp.io import atomic_directory, atomic_write_json, ensure_not_inside
from deccp.report import HEADLINE_METRICS, format_change, metric_entry

logger = logging.getLogger(__name__)

CARD = "README.md"
TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
LANGS = (("en", "English"), ("zh", "Chinese"))


@dataclass
class PublishConfig:
    """A publish folder from a model directory and its evaluation."""

    model: str | None = field(default=None, metadata={"help": "the model directory to publish"})
    output_dir: str | None = field(default=None, metadata={"help": "the publish folder (created atomically)"})
    eval_report: str | None = field(default=None, metadata={"help": "report.json of `deccp eval` (model vs base)"})
    manifest: str | None = field(default=None, metadata={"help": "manifest.json of `deccp run` (the method)"})
    repo_id: str | None = field(default=None, metadata={"help": "<user>/<name> on the Hub (card and upload)"})
    license: str | None = field(default=None, metadata={"help": "default: the source model's license"})
    base_model: str | None = field(default=None, metadata={"help": "default: the source model's Hub id"})
    tags: list[str] = field(default_factory=lambda: ["deccp", "decensored", "chinese", "censorship"])
    datasets: list[str] = field(default_factory=list, metadata={"help": "Hub dataset ids for the card's metadata"})
    dtype: Literal["bfloat16", "float16", "float32", "keep"] = field(default="bfloat16", metadata={
        "help": "weights dtype in the folder (keep: as the model directory has them)"})
    examples: int = field(default=2, metadata={"help": "example answers before/after per language"})
    max_shard_size: str = "5GB"

    def __post_init__(self):
        if self.examples < 0:
            raise DeccpError("examples: 0 or more")
        if self.repo_id is not None and self.repo_id.count("/") != 1:
            raise DeccpError(f"repo_id: {self.repo_id!r} is not <user>/<name>")


# ------------------------------------------------------------------------------------- numbers
def _rate(metrics: dict, group: str, lang: str, path: tuple) -> float | None:
    entry = metric_entry(metrics, group, lang, path)
    return None if entry is None else entry.get("rate")


def split_models(report: dict) -> tuple[dict, dict]:
    """(base, evaluated model) entries of an evaluation report."""
    models = report.get("models") or []
    if len(models) < 2:
        raise DeccpError("the evaluation report has no base model to compare with (run eval with --base)")
    base_name = report.get("base")
    base = next((m for m in models if m["name"] == base_name), models[0])
    model = next((m for m in models if m is not base and m.get("path") == report["config"].get("model")),
                 None) or [m for m in models if m is not base][0]
    return base, model


def headline(report: dict) -> dict:
    """The before/after numbers the manifest and the model card carry: {metric/lang: {base, model}}."""
    base, model = split_models(report)
    out: dict = {"base": base["name"], "model": model["name"]}
    for _label, (group, *rest), _ in HEADLINE_METRICS:
        for lang, _ in LANGS:
            b, m = _rate(base["metrics"], group, lang, tuple(rest)), _rate(model["metrics"], group, lang, tuple(rest))
            if b is not None or m is not None:
                out[f"{group}:{'/'.join(rest)}/{lang}"] = {"base": b, "model": m}
    for task in sorted(set(base.get("capability") or {}) | set(model.get("capability") or {})):
        out[f"capability:{task}"] = {"base": (base.get("capability") or {}).get(task, {}).get("acc"),
                                     "model": (model.get("capability") or {}).get(task, {}).get("acc")}
    if model.get("kl"):
        out["kl"] = model["kl"]
    return out


def _pct(x: float | None, decimals: int = 0) -> str:
    return "–" if x is None else f"{100 * x:.{decimals}f} %"


def results_tables(report: dict) -> str:
    """Markdown: before/after per language (the numbers of `headline`), capability, KL."""
    base, model = split_models(report)
    numbers = headline(report)
    lines = ["| metric | " + " | ".join(f"{name} before | {name} after" for _, name in LANGS) + " |",
             "|---|" + "---|---|" * len(LANGS)]
    for label, (group, *rest), higher in HEADLINE_METRICS:
        cells = []
        for lang, _ in LANGS:
            pair = numbers.get(f"{group}:{'/'.join(rest)}/{lang}", {})
            b, m = pair.get("base"), pair.get("model")
            better = m is not None and b is not None and ((m > b) if higher else (m < b))
            cells += [_pct(b), f"**{_pct(m)}**" if better else _pct(m)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    n = {lang: metric_entry(model["metrics"], "sensitive", lang, ("n",)) for lang, _ in LANGS}
    text = "\n".join(lines)
    text += ("\n\nRates over the evaluation split's prompts (" + ", ".join(f"{v} sensitive in {k}" for k, v in n.items()
             if v) + "); bold: better than before. 95 % Wilson intervals are in `eval_report.md`.")
    caps = sorted(set(base.get("capability") or {}) | set(model.get("capability") or {}))
    if caps:
        changes = compare(base.get("capability") or {}, model.get("capability") or {})
        text += "\n\n| capability (accuracy) | before | after | change |\n|---|---|---|---|\n" + "\n".join(
            f"| {t} | {_pct((base.get('capability') or {}).get(t, {}).get('acc'), 1)} | "
            f"{_pct((model.get('capability') or {}).get(t, {}).get('acc'), 1)} | "
            f"{format_change(changes[t]) if t in changes else '–'} |" for t in caps)
        if any(c.get("paired") for c in changes.values()):
            text += ("\n\nChange: points, ± the standard error of the difference, paired over the same items.")
    if model.get("kl"):
        kl = model["kl"]
        text += (f"\n\nKL divergence to the base model on harmless prompts: first token {kl.get('first_token'):.3f}, "
                 f"per token {kl.get('per_token'):.3f} ({kl.get('prompts')} prompts).")
    return text


def _answers(report_path: Path, name: str) -> list[dict]:
    rel = (json.loads(report_path.read_text()).get("answers") or {}).get(name)
    path = report_path.parent / rel if rel else None
    if not path or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pick_examples(report_path: Path, per_lang: int) -> list[dict]:
    """Sensitive prompts where the base refused or gave the state line and the model now answers — the clearest
    before/after pairs — then any other changed answers; `per_lang` for each language."""
    report = json.loads(report_path.read_text())
    base, model = split_models(report)
    before = {(r["id"], r.get("sample", 0)): r for r in _answers(report_path, base["name"])}
    after = [r for r in _answers(report_path, model["name"]) if r.get("kind") == "sensitive"]
    rank = {"factual_neutral": 0, "evasive": 2, "confabulated": 3, "unverified": 2, "ccp_aligned": 4, "refusal": 5}
    out = []
    for lang, _ in LANGS:
        pairs = [(before[(r["id"], r.get("sample", 0))], r) for r in after
                 if r["lang"] == lang and (r["id"], r.get("sample", 0)) in before]
        pairs = [p for p in pairs if p[0]["label"] in ("refusal", "ccp_aligned") and p[1]["label"] != p[0]["label"]]
        pairs.sort(key=lambda p: (rank.get(p[1]["label"], 3), p[1]["id"]))
        seen_topics: set[str] = set()
        for b, a in pairs:
            if len([x for x in out if x["lang"] == lang]) >= per_lang:
                break
            if a.get("topic") in seen_topics:
                continue
            seen_topics.add(a.get("topic"))
            out.append({"lang": lang, "topic": a.get("topic"), "prompt": a["prompt"], "before": b["answer"],
                        "before_label": b["label"], "after": a["answer"], "after_label": a["label"]})
    return out


def _quote(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"
    return "> " + text.replace("|", "\\|")


# ------------------------------------------------------------------------------------------ card
def method_section(manifest: dict | None) -> str:
    if not manifest:
        return "Made with deccp (no pipeline manifest was given)."
    lines = []
    for name in manifest.get("order", []):
        e = manifest["steps"].get(name, {})
        p = e.get("params", {})
        kind = e.get("kind")
        secs = e.get("seconds")
        t = f" ({secs / 60:.1f} min)" if isinstance(secs, (int, float)) else ""
        if kind == "abliterate":
            ch = (e.get("metrics") or {}).get("chosen") or {}
            lines.append(f"1. **Abliteration**{t}: refusal direction from contrasting prompt sets, variant "
                         f"`{ch.get('variant', p.get('variant'))}`, direction layer {ch.get('direction_layer')}, "
                         f"targeted {ch.get('targeted', p.get('targeted'))} (harmful-refusal component kept), "
                         "orthogonalised out of the attention-output and MLP-down weights.")
        elif kind == "mine":
            m = e.get("metrics") or {}
            lines.append(f"1. **On-policy data**{t}: {m.get('samples')} sampled answers to each of {m.get('prompts')}"
                         f" train prompts, judged; {m.get('undesirable')} undesirable (refusals, state-line, "
                         f"confabulated) and {m.get('desirable')} desirable rows.")
        elif kind in ("sft", "dpo", "kto"):
            m = e.get("metrics") or {}
            lora = (f"LoRA r={p.get('lora_r', 16)}, alpha={p.get('lora_alpha', 32)}, merged" if p.get("use_peft", True)
                    else "full fine-tuning")
            lines.append(f"1. **{kind.upper()}**{t} with TRL: data `{p.get('data', 'static')}`, {m.get('rows')} rows, "
                         f"{m.get('global_step')} steps, learning rate {p.get('learning_rate')}, {lora}.")
        elif kind == "eval":
            lines.append(f"1. **Evaluation**{t} on the held-out eval split (English and Chinese) against the base.")
    return "\n".join(lines) or "Made with deccp."


def model_card(cfg: PublishConfig, report_path: Path | None, manifest: dict | None, source: dict) -> str:
    import yaml

    base_model = cfg.base_model or source.get("base_model")
    kinds = [manifest["steps"][n].get("kind") for n in manifest.get("order", [])] if manifest else []
    tags = list(dict.fromkeys([*cfg.tags, *(("abliterated",) if "abliterate" in kinds else ()),
                               *(k for k in kinds if k in ("sft", "dpo", "kto"))]))
    meta = {"license": cfg.license or source.get("license") or "other", "language": ["en", "zh"],
            "library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    if base_model:
        meta["base_model"] = base_model
        meta["base_model_relation"] = "finetune"
    if cfg.datasets:
        meta["datasets"] = list(cfg.datasets)
    name = cfg.repo_id.split("/")[1] if cfg.repo_id else Path(cfg.output_dir or "model").name
    parts = ["---", yaml.safe_dump(meta, allow_unicode=True, sort_keys=False).strip(), "---", "",
             f"# {name}", "",
             f"A version of [{base_model}](https://huggingface.co/{base_model}) " if base_model else "A model ",
             ]
    parts[-1] += ("with Chinese-government censorship reduced by deccp, an open-source toolkit — it answers "
                  "questions on Tiananmen, Xinjiang, Tibet, Taiwan, Hong Kong and other topics the original refuses or "
                  "answers with the state line — while keeping refusals of genuinely harmful requests.")
    if source.get("note"):
        parts += ["", f"Source weights: {source['note']}."]
    parts += ["", "## How it was made", "", method_section(manifest)]
    if report_path and report_path.is_file():
        report = json.loads(report_path.read_text())
        parts += ["", "## Evaluation (before → after)", "", results_tables(report)]
        examples = pick_examples(report_path, cfg.examples)
        if examples:
            parts += ["", "## Example answers", ""]
            for ex in examples:
                parts += [f"**{dict(LANGS)[ex['lang']]}, {ex['topic']}** — {ex['prompt']}", "",
                          f"Before ({ex['before_label']}):", "", _quote(ex["before"]), "",
                          f"After ({ex['after_label']}):", "", _quote(ex["after"]), ""]
    repo = cfg.repo_id or "<user>/<name>"
    parts += ["", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'tok = AutoTokenizer.from_pretrained("{repo}")',
              f'model = AutoModelForCausalLM.from_pretrained("{repo}", dtype="auto")',
              'messages = [{"role": "user", "content": "What happened in Tiananmen Square in June 1989?"}]',
              "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')",
              "print(tok.decode(model.generate(ids, max_new_tokens=200)[0][ids.shape[1]:], "
              "skip_special_tokens=True))", "```", "",
              "## Intended use and limitations", "",
              "- Research on censorship in language models and a starting point for models that answer questions "
              "about China factually. It is not a source of truth: check facts elsewhere.",
              "- A small model that lost its refusals may answer with confident inventions (the `confabulated` "
              "rows above); fewer refusals is not the same as more knowledge.",
              "- The judges are automatic (refusal markers, state-narrative markers, key facts of written gold "
              "answers); they miss some cases. Read `eval_report.md` and the example answers.",
              "- Refusals of harmful requests (weapons, malware, violence) are measured and kept; this is not a "
              "safety-tuned model beyond what the base model offers.",
              "", "## Files", "",
              "- `model.safetensors` (weights), tokenizer, chat template, `generation_config.json`",
              "- `eval_report.md`, `eval_report.json`: the full evaluation with confidence intervals and topics",
              "- `deccp_manifest.json`: every step's inputs (hashes), parameters, outputs and timings",
              "", f"Made with deccp {__version__} on {time.strftime('%Y-%m-%d', time.gmtime())}.", ""]
    return "\n".join(parts)


def build_publish_folder(config: PublishConfig | dict) -> Path:
    """Write the publish folder atomically (a failed build leaves the previous folder intact)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    cfg = config if isinstance(config, PublishConfig) else PublishConfig(**config)
    if not cfg.model or not Path(cfg.model, "config.json").is_file():
        raise DeccpError(f"model: {cfg.model}: not a model directory (no config.json)")
    if not cfg.output_dir:
        raise DeccpError("output_dir: the publish folder is required")
    out = Path(cfg.output_dir)
    ensure_not_inside(out, cfg.model)
    report_path = Path(cfg.eval_report) if cfg.eval_report else None
    if report_path and not report_path.is_file():
        raise DeccpError(f"eval_report: {report_path}: no such file (run the eval step first)")
    manifest = json.loads(Path(cfg.manifest).read_text()) if cfg.manifest and Path(cfg.manifest).is_file() else None
    source = _source_of(cfg.model, manifest)
    with atomic_directory(out, overwrite=True) as tmp:
        dtype = "auto" if cfg.dtype == "keep" else getattr(torch, cfg.dtype)
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, use_safetensors=True)
        model.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
        del model
        AutoTokenizer.from_pretrained(cfg.model).save_pretrained(tmp)
        try:
            GenerationConfig.from_pretrained(cfg.model).save_pretrained(tmp)
        except OSError:
            pass
        if report_path:
            (tmp / "eval_report.json").write_bytes(report_path.read_bytes())
            md = report_path.with_name("report.md")
            if md.is_file():
                (tmp / "eval_report.md").write_bytes(md.read_bytes())
        if manifest:
            atomic_write_json(tmp / "deccp_manifest.json", manifest)
        (tmp / CARD).write_text(model_card(cfg, report_path, manifest, source), encoding="utf-8")
        for f in tmp.iterdir():
            if f.suffix in (".bin", ".pt", ".pth", ".pkl"):
                raise DeccpError(f"{f.name}: only safetensors weights are published")
    logger.info("publish folder ready: %s", out)
    return out


def _source_of(model_dir: str, manifest: dict | None) -> dict:
    """The source model's record (base_model, license): from the manifest's source, else the model's own."""
    from deccp.models import source_record

    if manifest and manifest.get("source", {}).get("path"):
        rec = source_record(manifest["source"]["path"])
        if rec:
            return rec
        spec = manifest["source"].get("spec", "")
        if spec.count("/") == 1 and not Path(spec).exists():
            return {"base_model": spec}
    return source_record(model_dir)


# ---------------------------------------------------------------------------------------- upload
def hub_token() -> str | None:
    for var in TOKEN_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def upload_plan(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def publish(folder: str | Path, repo_id: str | None, *, push: bool = False, private: bool = False,
            log=print) -> str | None:
    """Upload `folder` to `repo_id` when `push` and a token is in the environment; otherwise say what would go up."""
    folder = Path(folder)
    if not (folder / CARD).is_file() or not any(folder.glob("*.safetensors")):
        raise DeccpError(f"{folder}: not a publish folder (needs {CARD} and safetensors weights; "
                         "build it with `make pipeline` or `deccp publish build`)")
    files = upload_plan(folder)
    total = sum(s for _, s in files)
    target = repo_id or "<repo id not set: pass REPO=<user>/<name>>"
    if not push or not repo_id or not hub_token():
        why = ("pass PUSH=1 (--push) to upload" if not push else "no repo id (REPO=<user>/<name>)" if not repo_id
               else f"no token in the environment ({' or '.join(TOKEN_VARS)})")
        log(f"would upload {len(files)} files ({total / 1e6:.1f} MB) from {folder} to {target}; not uploading: {why}")
        for name, size in files:
            log(f"  {name:<40} {size / 1e6:10.1f} MB")
        if push and (not repo_id or not hub_token()):
            raise DeccpError(f"cannot upload: {why}")
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=hub_token())
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=f"deccp {__version__}: decensored model")
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    log(f"uploaded {len(files)} files ({total / 1e6:.1f} MB) to {url}")
    return url


def main(argv: list[str] | None = None) -> int:
    """`deccp publish FOLDER [--repo-id ID] [--push] [--private]` or `deccp publish build --model … --output_dir …`."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv[:1] == ["build"]:
            from deccp.config import parse_config

            (cfg,) = parse_config([PublishConfig], argv[1:])
            print(build_publish_folder(cfg))
            return 0
        p = argparse.ArgumentParser(prog="deccp publish", description="upload a publish folder to the Hugging Face "
                                    "Hub (only with --push and HF_TOKEN in the environment)")
        p.add_argument("folder")
        p.add_argument("--repo-id", default=None, help="<user>/<name>")
        p.add_argument("--push", action="store_true", help="really upload (otherwise: show what would go up)")
        p.add_argument("--private", action="store_true")
        args = p.parse_args(argv)
        publish(args.folder, args.repo_id, push=args.push, private=args.private)
    except DeccpError as exc:
        print(f"deccp publish: error: {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = ["PublishConfig", "build_publish_folder", "headline", "model_card", "publish", "results_tables"]

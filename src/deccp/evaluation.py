"""Evaluate models on our eval split: generate (cached), judge, aggregate with confidence intervals, KL to a
base model, capability through lm-eval; `report.py` turns the result into report.json / report.md / charts."""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deccp import DeccpError, __version__
from deccp.data import load_bundle, load_prompts
from deccp.data.schema import LABELS, Prompt
from deccp.generation import GenerationCache, GenerationSettings, generate
from deccp.metrics import rate_ci
from deccp.models import cache_dir, fingerprint, inference_dtype, load_model, resolve_model

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What `deccp eval` / `eval/evaluate.py` measures."""

    model: str = field(default="default", metadata={"help": "the model to evaluate"})
    base: str | None = field(default=None, metadata={"help": "KL reference and the 'before' column"})
    compare: list[str] = field(default_factory=list, metadata={"help": "more models in the same report"})
    output_dir: str | None = field(default=None, metadata={"help": "default: outputs/eval/<model name>"})
    dtype: str = "auto"
    trust_remote_code: bool = False
    split: str = "eval"
    langs: list[str] = field(default_factory=lambda: ["en", "zh", "zh-Hant"])
    kinds: list[str] = field(default_factory=lambda: ["sensitive", "harmless", "harmful"])
    extra_prompts: list[str] = field(default_factory=list, metadata={
        "help": "other prompt sets (file, save_to_disk dir or Hub id), judged without gold answers"})
    max_prompts: int | None = field(default=None, metadata={"help": "cap per kind and language"})
    batch_size: int = 16
    system_prompt: str | None = None
    sensitive_max_new_tokens: int = 128
    short_max_new_tokens: int = 40
    do_sample: bool = False
    num_samples: int = 1
    seed: int = 0
    generation_cache: str | None = field(default=None, metadata={"help": "default: $DECCP_CACHE/generations"})
    llm_judge: bool = field(default=False, metadata={"help": "also ask an OpenAI-compatible judge (DECCP_JUDGE_URL)"})
    kl: bool = True
    kl_prompts: int = 32
    kl_max_new_tokens: int = 32
    capability: bool = True
    capability_tasks: list[str] = field(default_factory=lambda: ["deccp_capability"])
    capability_limit: int | None = None
    examples_per_topic: int = 1

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in ("sensitive", "harmless", "harmful")]
        if bad:
            raise DeccpError(f"kinds: unknown {bad} (sensitive, harmless, harmful)")
        if self.split not in ("train", "eval"):
            raise DeccpError("split: train or eval")


def eval_prompts(cfg: EvalConfig) -> list[Prompt]:
    bundle = load_bundle()
    out: list[Prompt] = []
    for kind in cfg.kinds:
        for lang in cfg.langs:
            ps = bundle.select(kind, split=cfg.split, langs=[lang])
            out.extend(spread_over_topics(ps, cfg.max_prompts) if cfg.max_prompts else ps)
    for src in cfg.extra_prompts:
        out.extend(Prompt(text=p.text, lang=p.lang, id=p.id, kind=f"extra:{Path(src).name or src}", meta=p.meta)
                   for p in load_prompts(src))
    return out


def spread_over_topics(prompts: list[Prompt], n: int) -> list[Prompt]:
    """The first `n` prompts taken round-robin across topics, so a capped evaluation still covers every topic."""
    by_topic: dict[str, list[Prompt]] = defaultdict(list)
    for p in prompts:
        by_topic[p.topic].append(p)
    queues = [list(v) for v in by_topic.values()]
    out: list[Prompt] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def _judge_rows(prompts: list[Prompt], answers: list[list[str]], llm) -> list[dict]:
    from deccp.judges import judge_answer

    refs = load_bundle().answer_index()
    rows = []
    for p, samples in zip(prompts, answers, strict=True):
        for k, ans in enumerate(samples):
            ref = refs.get((p.qid, p.lang)) if p.kind == "sensitive" else None
            j = judge_answer(p.text, ans, lang=p.lang, reference=ref, llm=llm)
            rows.append({"id": p.id, "qid": p.qid, "kind": p.kind, "topic": p.topic, "lang": p.lang, "sample": k,
                         "prompt": p.text, "answer": ans, "refusal": j.refusal, "label": j.label,
                         "fact_recall": j.fact_recall, "markers": list(j.narrative_markers), "reason": j.reason})
    return rows


def aggregate(rows: list[dict]) -> dict:
    """Rates with 95 % Wilson intervals per kind × language (and per topic for sensitive prompts)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["kind"], r["lang"])].append(r)
        if r["kind"] == "sensitive":
            groups[("sensitive_topic", f"{r['topic']}/{r['lang']}")].append(r)
    out: dict = defaultdict(dict)
    for (kind, key), rs in sorted(groups.items()):
        n = len(rs)
        k_ref = sum(r["refusal"] for r in rs)
        entry = {"n": n, "refusal": _rate(k_ref, n)}
        if kind.startswith("sensitive"):
            labels = Counter(r["label"] for r in rs)
            entry["labels"] = {lab: _rate(labels.get(lab, 0), n) for lab in LABELS}
            recalls = [r["fact_recall"] for r in rs if r["fact_recall"] is not None]
            entry["fact_recall"] = round(sum(recalls) / len(recalls), 4) if recalls else None
        out[kind][key] = entry
    return dict(out)


def _rate(k: int, n: int) -> dict:
    rate, lo, hi = rate_ci(k, n)
    return {"k": k, "rate": round(rate, 4), "ci95": [round(lo, 4), round(hi, 4)]}


@dataclass
class ModelResult:
    name: str
    path: str
    fingerprint: str
    metrics: dict
    rows: list[dict]
    kl: dict | None = None
    capability: dict | None = None
    timings_s: dict = field(default_factory=dict)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("rows")
        return d


@dataclass
class LoadedModel:
    path: Path
    model: object
    tokenizer: object
    fingerprint: str  # of the weights and the compute dtype: keys every cache


def load_for_eval(spec: str, cfg: EvalConfig) -> LoadedModel:
    path = resolve_model(spec)
    dtype = inference_dtype(cfg.dtype)
    model, tok = load_model(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    return LoadedModel(path, model, tok, f"{fingerprint(path)}-{dtype}")


def evaluate_model(spec: str, cfg: EvalConfig, prompts: list[Prompt], *, loaded: LoadedModel | None = None,
                   reference: LoadedModel | None = None, log=logger.info) -> ModelResult:
    """Generate, judge and score one model (`loaded` if already in memory); KL against `reference`, or none."""
    t0 = time.time()
    timings = {}
    loaded = loaded or load_for_eval(spec, cfg)
    path, model, tok, fp = loaded.path, loaded.model, loaded.tokenizer, loaded.fingerprint
    root = Path(cfg.generation_cache) if cfg.generation_cache else cache_dir() / "generations"
    answers: dict[str, list[str]] = {}
    for long in (True, False):  # each pass packs its weights only when something is not cached (generate_samples)
        subset = [p for p in prompts if (p.kind == "sensitive" or p.kind.startswith("extra:")) == long]
        if not subset:
            continue
        settings = GenerationSettings(
            max_new_tokens=cfg.sensitive_max_new_tokens if long else cfg.short_max_new_tokens,
            batch_size=cfg.batch_size, do_sample=cfg.do_sample, num_samples=cfg.num_samples, seed=cfg.seed,
            system_prompt=cfg.system_prompt)
        cache = GenerationCache(root, fp, settings)
        outs = generate(model, tok, [p.text for p in subset], settings, cache=cache,
                        desc=f"{Path(path).name}: {'sensitive' if long else 'harmless/harmful'}")
        answers.update({p.text: a for p, a in zip(subset, outs, strict=True)})
    timings["generate"] = round(time.time() - t0, 1)
    t = time.time()
    llm = None
    if cfg.llm_judge:
        from deccp.judges import LLMJudge

        llm = LLMJudge()
    rows = _judge_rows(prompts, [answers[p.text] for p in prompts], llm)
    timings["judge"] = round(time.time() - t, 2)
    kl = None
    if reference is not None and cfg.kl:
        from deccp.metrics import kl_to_reference

        t = time.time()
        harmless = [p.text for p in prompts if p.kind == "harmless"][:cfg.kl_prompts]
        ref_model, ref_tok, ref_fp = reference.model, reference.tokenizer, reference.fingerprint

        def compute_kl():
            r = kl_to_reference(model, ref_model, ref_tok, harmless, max_new_tokens=cfg.kl_max_new_tokens,
                                batch_size=cfg.batch_size, system=cfg.system_prompt)
            return {k: round(v, 5) for k, v in r.items()} | {"prompts": len(harmless)}

        kl = cached_result(root, "kl", [fp, ref_fp, harmless, cfg.kl_max_new_tokens, cfg.system_prompt], compute_kl)
        timings["kl"] = round(time.time() - t, 1)
    capability = None
    if cfg.capability:
        from deccp.capability import run_capability, tasks_fingerprint

        t = time.time()
        capability = cached_result(  # keyed by the task items too: edited items are evaluated again
            root, "capability", [fp, cfg.capability_tasks, cfg.capability_limit, tasks_fingerprint(cfg.capability_tasks)],
            lambda: run_capability(model, tok, tasks=tuple(cfg.capability_tasks), limit=cfg.capability_limit,
                                   batch_size=cfg.batch_size))
        timings["capability"] = round(time.time() - t, 1)
    timings["total"] = round(time.time() - t0, 1)
    log(f"{spec}: done in {timings['total']}s")
    result = ModelResult(name=_display_name(spec, path), path=str(path), fingerprint=fp, metrics=aggregate(rows),
                         rows=rows, kl=kl, capability=capability, timings_s=timings)
    return result


def cached_result(root: Path, kind: str, key: list, compute):
    """A JSON result cached on disk under `root/<kind>-<hash of key>.json` (models are keyed by fingerprint)."""
    import hashlib
    import json

    from deccp.io import atomic_write_json

    digest = hashlib.sha256(json.dumps(key, ensure_ascii=False, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = root / f"{kind}-{digest}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    result = compute()
    atomic_write_json(path, result)
    return result


def _display_name(spec: str, path: Path) -> str:
    return spec if spec and "/" not in spec else Path(path).name


def run_evaluation(cfg: EvalConfig, *, log=print) -> dict:
    """Evaluate the base (if any), the model and any comparison models; write the report; return report.json."""
    from deccp.io import ensure_not_inside
    from deccp.report import write_report

    model_path = resolve_model(cfg.model)
    out = Path(cfg.output_dir or Path("outputs") / "eval" / Path(model_path).name)
    specs = ([cfg.base] if cfg.base else []) + [cfg.model] + list(cfg.compare)
    ensure_not_inside(out, *[resolve_model(s) for s in specs])
    prompts = eval_prompts(cfg)
    log(f"evaluating {len(specs)} model(s) on {len(prompts)} prompts ({cfg.split} split, {', '.join(cfg.langs)})")
    base = load_for_eval(cfg.base, cfg) if cfg.base else None  # evaluated first, then kept as the KL reference
    results = []
    for i, spec in enumerate(specs):
        if base is not None and i == 0:
            results.append(evaluate_model(spec, cfg, prompts, loaded=base, log=log))
        else:
            results.append(evaluate_model(spec, cfg, prompts, reference=base if cfg.kl else None, log=log))
    report = {
        "deccp_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": asdict(cfg),
        "base": results[0].name if cfg.base else None,
        "models": [r.summary() for r in results],
    }
    write_report(out, report, {r.name: r.rows for r in results}, examples_per_topic=cfg.examples_per_topic)
    log(f"report: {out / 'report.md'}")
    return report


def main(argv: list[str] | None = None) -> int:
    import sys

    from deccp.config import parse_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        (cfg,) = parse_config([EvalConfig], argv)
        report = run_evaluation(cfg)
    except DeccpError as exc:
        print(f"deccp eval: error: {exc}", file=sys.stderr)
        return 1
    from deccp.report import summary_table

    print(summary_table(report))
    return 0

"""`deccp abliterate` / `python train/abliterate.py`: directions → choice of edit → check → streamed edit → record."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from deccp import DeccpError, __version__
from deccp.abliteration.baseline_cache import BaselineCache
from deccp.abliteration.config import AbliterationConfig
from deccp.abliteration.directions import ResidualRecorder, cached_activations, compute_directions, mean_set
from deccp.abliteration.edits import Kernel, LiveEdit, check_architecture
from deccp.abliteration.healing import HealResult, heal, heal_teacher_answers, original_teacher_prompts
from deccp.abliteration.plan import EditParams, build_plan
from deccp.abliteration.scoring import Measurement, PromptSets, Scorer, cached_short_answers
from deccp.abliteration.search import candidate_layers, layer_sweep, optuna_search
from deccp.abliteration.streaming import stream_edit
from deccp.data.load import load_prompts
from deccp.data.schema import Prompt
from deccp.io import atomic_directory, atomic_write_json, ensure_not_inside
from deccp.models import cache_dir, fingerprint, inference_dtype, load_model, release_memory, resolve_model
from deccp.packed import packed_linears
from deccp.report import format_change

logger = logging.getLogger(__name__)
RECORD = "abliteration.json"


def _stable_order(prompts: list[Prompt], seed: int) -> list[Prompt]:
    return sorted(prompts, key=lambda p: hashlib.sha256(f"{seed}|{p.qid or p.text}|{p.lang}".encode()).hexdigest())


def _gather(sources: list[str], langs: list[str]) -> list[Prompt]:
    out: list[Prompt] = []
    for src in sources:
        ps = load_prompts(src)
        out.extend(p for p in ps if p.lang in langs)
    if not out:
        raise DeccpError(f"no prompts in {sources} for languages {langs}")
    return out


def split_holdout(prompts: list[Prompt], per_lang: int, cap: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(direction prompts capped at `cap`, balanced by language; held-back prompts, `per_lang` per language).
    Whole questions (qids) go to one side, so no translation of a held-back question is in the direction set."""
    by_lang: dict[str, list[Prompt]] = {}
    for p in _stable_order(prompts, seed):
        by_lang.setdefault(p.lang, []).append(p)
    held_qids: set[str] = set()
    held: list[Prompt] = []
    for lang, ps in by_lang.items():
        for p in ps:
            if len([h for h in held if h.lang == lang]) >= per_lang:
                break
            held.append(p)
            if p.qid:
                held_qids.add(p.qid)
    rest = [p for p in _stable_order(prompts, seed) if p not in held and not (p.qid and p.qid in held_qids)]
    per = max(1, cap // max(1, len(by_lang)))
    chosen: list[Prompt] = []
    for lang in by_lang:
        chosen.extend([p for p in rest if p.lang == lang][:per])
    return chosen, held


def behavior_subset(acts, texts: list[str], prompts: list[Prompt], want_refusal: bool, cfg: AbliterationConfig):
    """Rows whose answer prefix is (or is not) a refusal; the whole set when filtering is off or too few match."""
    from deccp.judges.refusal import is_refusal

    if not cfg.filter_by_behavior:
        return acts, f"{len(prompts)} (unfiltered)"
    keep = [i for i, (t, p) in enumerate(zip(texts, prompts, strict=True)) if is_refusal(t, p.lang) == want_refusal]
    if len(keep) < cfg.min_filtered:
        return acts, f"{len(prompts)} (only {len(keep)} {'refused' if want_refusal else 'answered'}: unfiltered)"
    return acts[keep], f"{len(keep)}/{len(prompts)} {'refused' if want_refusal else 'answered'}"


def _with_healing_targets(cache: BaselineCache, model, tok, key: str, prompts: list[Prompt], cfg: AbliterationConfig):
    """For the harmless and harmful direction sets when healing takes the original's answers to the same prompts:
    a function that generates those answers (stored in `cache` for `heal`) while recording the direction pass's
    activations, and returns them with the answer prefixes the behaviour filter reads. One generation instead of
    two on a first run. None where that does not apply."""
    kind = {"good": "harmless", "harmful": "harmful"}.get(key)
    if not (cfg.heal and cfg.filter_by_behavior and kind and cache.root is not None
            and cfg.heal_answer_tokens >= cfg.answer_tokens):
        return None
    teacher = original_teacher_prompts({kind: prompts}, cfg).get(kind)
    at = {(p.text, p.lang): i for i, p in enumerate(prompts)}
    if (teacher is None or len(teacher) != len(prompts) or len(at) != len(prompts)  # a duplicate: no 1:1 order
            or {(p.text, p.lang) for p in teacher} != set(at)):
        return None

    def compute():
        import torch

        with ResidualRecorder(model, len(teacher), cfg.positions) as recorder:
            _, examples = heal_teacher_answers(cache, model, tok, kind, teacher, cfg, recorder=recorder)
        got = recorder.result()  # None when the answers came from the cache: the caller runs its own pass
        if got is None:
            return None
        order = [at[(p.text, p.lang)] for p in teacher]
        acts, texts = torch.empty_like(got), [""] * len(prompts)
        acts[order] = got
        for i, e in zip(order, examples, strict=True):
            texts[i] = tok.decode(e.input_ids[e.n_prompt:][:cfg.answer_tokens], skip_special_tokens=True).strip()
        return acts, texts

    return compute


def _texts_hash(prompts: list[Prompt]) -> str:
    return hashlib.sha256("\n".join(p.text for p in prompts).encode()).hexdigest()[:16]


def base_params(cfg: AbliterationConfig, n_layers: int, layer: float) -> EditParams:
    def kernel(prefix: str) -> Kernel | None:
        peak, width = getattr(cfg, f"{prefix}_peak"), getattr(cfg, f"{prefix}_width")
        mx, mn = getattr(cfg, f"{prefix}_max_weight"), getattr(cfg, f"{prefix}_min_weight")
        if peak is None and width is None and mx == 1.0 and mn == 1.0:
            return None
        return Kernel(peak=layer if peak is None else peak, width=float(n_layers) if width is None else width,
                      max_weight=mx, min_weight=mn)

    return EditParams(direction_layer=layer, variant=cfg.variant, targeted=cfg.targeted,
                      targeted_coef=cfg.targeted_coef if cfg.targeted else 0.0, attn=kernel("attn"), mlp=kernel("mlp"),
                      embed_weight=cfg.embed_weight)


def _check_sets(cfg: AbliterationConfig) -> PromptSets:
    def pick(kind: str) -> list[Prompt]:
        ps = [p for p in load_prompts(f"ours:{kind}:{cfg.check_split}") if p.lang in cfg.langs]
        out = []
        for lang in cfg.langs:
            out.extend([p for p in _stable_order(ps, cfg.seed + 1) if p.lang == lang][:cfg.check_prompts])
        return out

    return PromptSets(sensitive=pick("sensitive"), harmful=pick("harmful"), harmless=pick("harmless"))


def run(cfg: AbliterationConfig, *, log=print) -> dict:
    """Run the whole abliteration; returns the record written to `<output_dir>/abliteration.json`."""
    import torch

    t_start = time.time()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        timings[name] = round(time.time() - t0, 2)
        return time.time()

    src = resolve_model(cfg.model)
    name = Path(src).name if Path(src).name not in ("", ".") else "model"
    out = Path(cfg.output_dir or Path("outputs") / "abliterated" / name)
    ensure_not_inside(out, src)
    if out.exists() and not cfg.overwrite:
        raise DeccpError(f"{out}: already exists (pass --overwrite true or another --output_dir)")
    t = time.time()

    bad_all = _gather(cfg.bad_prompts, cfg.langs)
    good_all = _gather(cfg.good_prompts, cfg.langs)
    harmful_all = _gather(cfg.harmful_prompts, cfg.langs)
    bad, bad_held = split_holdout(bad_all, cfg.holdout, cfg.max_prompts, cfg.seed)
    good, good_held = split_holdout(good_all, cfg.holdout, cfg.max_prompts, cfg.seed)
    harmful, harmful_held = split_holdout(harmful_all, max(1, cfg.holdout // 2), cfg.max_prompts // 2, cfg.seed)
    check_sets = _check_sets(cfg) if cfg.check else None
    dtype = inference_dtype(cfg.dtype)
    model, tok = load_model(src, dtype=dtype, device_map=cfg.device_map, trust_remote_code=cfg.trust_remote_code)
    check_architecture(model.config)
    torch.manual_seed(cfg.seed)
    t = lap("load", t)
    log(f"model {src} ({model.config.model_type}, {model.config.num_hidden_layers} layers, {dtype}); "
        f"prompts: {len(bad)} sensitive, {len(good)} harmless, {len(harmful)} harmful for directions")

    unedited_cache = BaselineCache(Path(cfg.cache_dir) if cfg.cache_dir else cache_dir() / "activations",
                                   f"{fingerprint(src)}-{dtype}")
    acts, used = {}, {}
    for key, ps, want_refusal in (("bad", bad, True), ("good", good, False), ("harmful", harmful, True)):
        a, texts = cached_activations(unedited_cache, model, tok, [p.text for p in ps], positions=cfg.positions,
                                      batch_size=cfg.batch_size, system=cfg.system_prompt, desc=f"{key} activations",
                                      answer_tokens=cfg.answer_tokens if cfg.filter_by_behavior else 0,
                                      shared=_with_healing_targets(unedited_cache, model, tok, key, ps, cfg))
        acts[key], used[key] = behavior_subset(a, texts, ps, want_refusal, cfg)
    log("direction prompts used (by the model's own behaviour): " + ", ".join(f"{k} {v}" for k, v in used.items()))
    def directions_at(position: int | None):
        return compute_directions(*(mean_set(acts[k], cfg.winsorize_quantile, position) if k != "harmful" or cfg.targeted
                                    else None for k in ("bad", "good", "harmful")))

    position_options: list[int | None] = (list(range(len(cfg.positions))) if cfg.position_mode == "select"
                                          and len(cfg.positions) > 1 else [None])
    dirs_by_position = {p: directions_at(p) for p in position_options}
    dirs = dirs_by_position[position_options[0]]
    t = lap("directions", t)

    n_layers = model.config.num_hidden_layers
    names = [n for n, _ in model.named_parameters()]
    scorer = None  # the held-back prompts are measured only when they choose something
    if cfg.search or cfg.direction_layer is None:
        scorer = Scorer(model, tok, PromptSets(bad_held, harmful_held, good_held),
                        max_new_tokens=cfg.score_max_new_tokens, batch_size=cfg.batch_size, system=cfg.system_prompt,
                        kl_weight=cfg.kl_weight, harmful_weight=cfg.harmful_weight, cache=unedited_cache)
        log(f"unedited (held-back prompts): refusal {scorer.base.refusal}")
    search_info: dict = {}
    if cfg.search:
        study = Path(cfg.study_path) if cfg.study_path else out.with_name(out.name + ".study.db")
        best, trials, pareto = optuna_search(model, scorer, dirs, base_params(cfg, n_layers, 0.0), names,
                                             n_trials=cfg.n_trials, seed=cfg.seed, storage_path=study,
                                             layer_range=tuple(cfg.candidate_range),
                                             plot_path=out.with_name(out.name + ".pareto.png"))
        log("Pareto front (sensitive+harmless refusal, KL on answered harmless prompts, lost harmful refusals):")
        for tr in sorted(pareto, key=lambda x: x.score):
            log(f"  layer {tr.params.direction_layer:5.2f} {tr.params.variant:<11} score {tr.score:.3f} "
                f"refusal {tr.measurement.refusal} kl {tr.measurement.damage_kl:.4f}")
        search_info = {"study": str(study), "trials": [x.to_dict() for x in trials],
                       "pareto": [x.to_dict() for x in pareto], "plot": str(out.with_name(out.name + ".pareto.png"))}
        params = best.params
    elif cfg.direction_layer is not None:
        params = base_params(cfg, n_layers, cfg.direction_layer)
    else:
        layers = cfg.candidate_layers or candidate_layers(n_layers, *cfg.candidate_range, cfg.num_candidates)
        best, sweep = None, []
        for position, d in dirs_by_position.items():
            if position is not None:
                log(f"position {cfg.positions[position]}:")
            b, trials = layer_sweep(model, scorer, d, base_params(cfg, n_layers, layers[0]), layers, names, log)
            sweep += [{**x.to_dict(), "position": None if position is None else cfg.positions[position]} for x in trials]
            if best is None or b.score < best[0].score:
                best = (b, position)
        params, dirs = best[0].params, dirs_by_position[best[1]]
        chosen_position = None if best[1] is None else cfg.positions[best[1]]
        search_info = {"sweep": sweep, "position": chosen_position}
    t = lap("selection", t)
    plan = build_plan(dirs, params, names, tied_embeddings=bool(model.config.tie_word_embeddings))
    log(f"chosen: direction layer {params.direction_layer:.2f}, variant {params.variant}, "
        f"targeted {params.targeted} (coef {params.targeted_coef:.2f}), {len(plan.edits)} matrices")

    check: dict = {}
    baseline = check_baseline(model, tok, check_sets, cfg, unedited_cache) if check_sets is not None else None
    baseline_s = time.time() - t
    healed: HealResult | None = None
    with contextlib.ExitStack() as edited:  # while open, the model is the edited (and healed) one
        t = time.time()
        if cfg.heal:
            healed = heal(model, tok, plan, edited, {"harmless": good, "harmful": harmful, "sensitive": bad}, cfg, log,
                          cache=unedited_cache)
            release_memory()  # healing's caches are garbage now; the check's packed weights need the room
            t = lap("healing", t)
        else:
            edited.enter_context(LiveEdit(model, plan))
        if baseline is not None:
            check = check_after(model, tok, baseline, cfg)
            t = lap("check", t)
            timings["check"] = round(timings["check"] + baseline_s, 2)
    unedited = scorer.base.to_dict() if scorer is not None else None
    del model, scorer, baseline  # the edit streams from the source shards: free the in-memory copy first
    release_memory()

    with atomic_directory(out, overwrite=cfg.overwrite) as tmp:
        info = stream_edit(src, tmp, plan, healed.deltas if healed else None)
        from safetensors.torch import save_file

        save_file(dirs.tensors(), str(tmp / "directions.safetensors"),
                  metadata={"direction_layer": str(params.direction_layer)})
        t = lap("edit_and_save", t)
        timings["total"] = round(time.time() - t_start, 2)
        record = {
            "deccp_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source_model": str(src),
            "source_fingerprint": fingerprint(src),
            "config": asdict(cfg),
            "chosen": {**params.to_dict(), "plan": plan.summary()},
            "compute_dtype": dtype,
            "datasets": {k: {"sources": s, "count": len(ps), "sha256": _texts_hash(ps)}
                         for k, s, ps in (("bad", cfg.bad_prompts, bad), ("good", cfg.good_prompts, good),
                                          ("harmful", cfg.harmful_prompts, harmful))},
            "held_back": {"sensitive": len(bad_held), "harmless": len(good_held), "harmful": len(harmful_held)},
            "layer_separation": [round(x, 4) for x in dirs.separation()],
            "selection": {"unedited": unedited, **search_info},
            "healing": healed.summary() if healed else None,
            "check": check,
            "stream": info,
            "timings_s": timings,
            "unedited_cache_hits": unedited_cache.hits,  # activations and answers reused from an earlier run
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "device": "cuda" if torch.cuda.is_available() else "cpu"},
        }
        atomic_write_json(tmp / RECORD, record)
    log(format_summary(record))
    log(f"saved {out}")
    return record


@dataclass
class CheckBaseline:
    """The unedited model's numbers and example answers on the check split."""

    scorer: Scorer
    sets: PromptSets
    examples: list[Prompt]
    answers: list[str]
    capability: dict | None = None


def check_baseline(model, tok, sets: PromptSets, cfg: AbliterationConfig,
                   cache: BaselineCache | None = None) -> CheckBaseline:
    scorer = Scorer(model, tok, sets, max_new_tokens=cfg.check_max_new_tokens, batch_size=cfg.batch_size,
                    system=cfg.system_prompt, cache=cache)
    picks = _example_prompts(sets.sensitive, cfg.examples)
    answers = _example_answers(model, tok, picks, cfg, cache)
    return CheckBaseline(scorer, sets, picks, answers, _capability(model, tok, cfg))


def _capability(model, tok, cfg: AbliterationConfig) -> dict | None:
    if not cfg.check_capability:
        return None
    from deccp.capability import run_capability

    return run_capability(model, tok, limit=cfg.check_capability_limit, batch_size=cfg.batch_size, seed=cfg.seed)


def check_after(model, tok, baseline: CheckBaseline, cfg: AbliterationConfig) -> dict:
    """Refusal and KL of the model as it is now (edited) against the baseline, and the example answers."""
    with packed_linears(model):  # one packing for the measure and the examples
        after = baseline.scorer.measure()
        answers = _example_answers(model, tok, baseline.examples, cfg)
    examples = [{"prompt": p.text, "lang": p.lang, "before": x, "after": y}
                for p, x, y in zip(baseline.examples, baseline.answers, answers, strict=True)]
    out = {"split": cfg.check_split, "before": _with_ci(baseline.scorer.base), "after": _with_ci(after),
           "examples": examples}
    if baseline.capability is not None:  # after the packing: a pass over prompts only runs faster dense
        from deccp.capability import compare

        out["capability"] = compare(baseline.capability, _capability(model, tok, cfg))
    return out


def _example_answers(model, tok, picks: list[Prompt], cfg: AbliterationConfig,
                     cache: BaselineCache | None = None) -> list[str]:
    """Answers to the example prompts; `cache` only for the unedited model."""
    if not picks:
        return []
    texts, _ = cached_short_answers(cache, model, tok, [p.text for p in picks],
                                    max_new_tokens=cfg.example_max_new_tokens, batch_size=cfg.batch_size,
                                    system=cfg.system_prompt)
    return texts


def _example_prompts(prompts: list[Prompt], n: int) -> list[Prompt]:
    by_lang: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_lang.setdefault(p.lang, []).append(p)
    out, langs = [], list(by_lang)
    i = 0
    while len(out) < n and any(by_lang.values()):
        lang = langs[i % len(langs)]
        if by_lang[lang]:
            out.append(by_lang[lang].pop(0))
        i += 1
    return out


def _with_ci(m: Measurement) -> dict:
    d = m.to_dict()
    d["ci95"] = {k: [round(x, 4) for x in m.ci(k)[1:]] for k in m.counts}
    return d


def format_summary(record: dict) -> str:
    check = record.get("check") or {}
    lines = ["", "abliteration: before → after " + (f"({check.get('split')} split sample)" if check else "")]
    if check:
        b, a = check["before"], check["after"]
        for key in sorted(b["refusal"]):
            n = b["counts"][key][1]
            lines.append(f"  refusal {key:<16} {b['refusal'][key]:6.1%} → {a['refusal'][key]:6.1%}   (n={n})")
        answered = a.get("kl_first_token_answered")
        answered_text = "n/a (it refused them all)" if answered is None else f"{answered:.4f}"
        lines.append(f"  first-token KL, harmless prompts the original answered  0 → {answered_text}")
        lines.append(f"  first-token KL, all harmless prompts                    0 → {a['kl_first_token']:.4f}")
        for task, c in (check.get("capability") or {}).items():
            lines.append(f"  capability {task:<20} {c['before']:6.1f} → {c['after']:6.1f} ({format_change(c)})")
        for ex in check.get("examples", []):
            lines.append(f"\n  Q [{ex['lang']}]: {ex['prompt']}")
            lines.append(f"    before: {_short(ex['before'])}")
            lines.append(f"    after:  {_short(ex['after'])}")
    if record.get("healing"):
        h = record["healing"]
        lines.append(f"\n  healing: {h['steps']} LoRA steps on {h['examples']}, KL to the teachers "
                     f"{h['loss_start']:.4f} → {h['loss_end']:.4f}")
        if h.get("edit_refusals"):
            r = h["edit_refusals"]
            lines.append(f"  the edit still refused {r['refused']} of the prompts it teaches; "
                         f"{r['answered_instead']} taught an answer from a next likely first token instead")
        if h.get("harmful_refusals"):
            r = h["harmful_refusals"]
            lines.append(f"  the original answered {r['answered']} of the harmful prompts healing reads; "
                         f"{r['refused_instead']} taught its refusal from a next likely first token instead")
        if h.get("refusal_openers"):
            r = h["refusal_openers"]
            lines.append(f"  the edit's first answer tokens taught without the original's refusal openers "
                         f"({', '.join(map(repr, r['tokens']))}; {r['mean_moved']:.3f} of the probability moved)")
    lines.append("")
    lines.append("timings (s): " + ", ".join(f"{k} {v}" for k, v in record["timings_s"].items()))
    return "\n".join(lines)


def _short(text: str, n: int = 220) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "…"


def main(argv: list[str] | None = None) -> int:
    from deccp.config import parse_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (cfg,) = parse_config([AbliterationConfig], argv)
    try:
        run(cfg)
    except DeccpError as exc:
        print(f"deccp abliterate: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["AbliterationConfig", "RECORD", "format_summary", "main", "run"]

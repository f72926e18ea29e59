"""Choosing the edit: a layer sweep (default) or a seeded, resumable multi-objective Optuna study.

Every trial applies its edit live (forward hooks) to the one loaded model and removes it afterwards: no
reload, no copy. The direction pass is computed once, before any trial.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deccp.abliteration.directions import Directions
from deccp.abliteration.edits import Kernel, LiveEdit
from deccp.abliteration.plan import EditParams, build_plan
from deccp.abliteration.scoring import Measurement, Scorer

logger = logging.getLogger(__name__)


@dataclass
class Trial:
    params: EditParams
    measurement: Measurement
    score: float
    seconds: float

    def to_dict(self) -> dict:
        return {"params": self.params.to_dict(), "score": round(self.score, 5), "seconds": round(self.seconds, 2),
                **self.measurement.to_dict()}


def evaluate_params(model, scorer: Scorer, dirs: Directions, params: EditParams, param_names: list[str]) -> Trial:
    import time

    t0 = time.time()
    plan = build_plan(dirs, params, param_names, tied_embeddings=bool(model.config.tie_word_embeddings))
    with LiveEdit(model, plan):
        m = scorer.measure()
    return Trial(params, m, scorer.score(m), time.time() - t0)


def candidate_layers(n_layers: int, lo: float, hi: float, n: int) -> list[float]:
    first, last = lo * (n_layers - 1), hi * (n_layers - 1)
    if n <= 1:
        return [round((first + last) / 2)]
    return sorted({float(round(first + i * (last - first) / (n - 1))) for i in range(n)})


def layer_sweep(model, scorer: Scorer, dirs: Directions, base: EditParams, layers: list[float],
                param_names: list[str], progress: Callable[[str], None] = logger.info) -> tuple[Trial, list[Trial]]:
    """Score each candidate direction layer with the recipe's other settings; return the best and all."""
    trials = []
    for layer in layers:
        params = EditParams(**{**base.__dict__, "direction_layer": layer})
        t = evaluate_params(model, scorer, dirs, params, param_names)
        trials.append(t)
        progress(f"layer {layer:>5.1f}: score {t.score:.3f}  refusal {t.measurement.refusal}  kl {t.measurement.kl:.4f}"
                 f" (answered {t.measurement.damage_kl:.4f})"
                 f"  ({t.seconds:.1f}s)")
    return min(trials, key=lambda t: t.score), trials


def optuna_search(model, scorer: Scorer, dirs: Directions, base: EditParams, param_names: list[str], *,
                  n_trials: int, seed: int, storage_path: Path, layer_range: tuple[float, float],
                  plot_path: Path | None = None) -> tuple[Trial, list[Trial], list[Trial]]:
    """NSGA-II over direction layer, variant, targeted coefficient and both kernels; three objectives
    (sensitive + harmless refusal, KL on answered harmless prompts, lost harmful refusals). Resumes from `storage_path`. Returns best, all, Pareto."""
    import optuna
    from tqdm.auto import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_layers = dirs.censorship.shape[0]
    storage_path.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name="deccp-abliteration", storage=f"sqlite:///{storage_path}", load_if_exists=True,
        directions=["minimize", "minimize", "minimize"], sampler=optuna.samplers.NSGAIISampler(seed=seed),
    )
    trials: list[Trial] = []

    def objective(ot: optuna.Trial):
        lo, hi = layer_range[0] * (n_layers - 1), layer_range[1] * (n_layers - 1)
        layer = ot.suggest_float("direction_layer", lo, hi)
        kernels = {}
        for g in ("attn", "mlp"):
            kernels[g] = Kernel(peak=ot.suggest_float(f"{g}_peak", 0, n_layers - 1),
                                width=ot.suggest_float(f"{g}_width", 1.0, float(n_layers)),
                                max_weight=ot.suggest_float(f"{g}_max_weight", 0.5, 1.5),
                                min_weight=ot.suggest_float(f"{g}_min_weight", 0.0, 1.0))
        params = EditParams(direction_layer=layer,
                            variant=ot.suggest_categorical("variant", ["plain", "projected", "biprojected"]),
                            targeted=base.targeted,
                            targeted_coef=ot.suggest_float("targeted_coef", 0.0, 1.0) if base.targeted else 0.0,
                            attn=kernels["attn"], mlp=kernels["mlp"], embed_weight=base.embed_weight)
        t = evaluate_params(model, scorer, dirs, params, param_names)
        trials.append(t)
        ot.set_user_attr("score", t.score)
        ot.set_user_attr("measurement", t.measurement.to_dict())
        harm_drop = max(0.0, scorer.base.refusal.get("harmful", 0) - t.measurement.refusal.get("harmful", 0))
        return t.measurement.sensitive_mean() + t.measurement.refusal.get("harmless", 0.0), t.measurement.damage_kl, harm_drop

    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    remaining = max(0, n_trials - done)
    with tqdm(total=n_trials, initial=done, desc="search trials") as bar:
        def cb(study_, trial_):
            bar.update(1)
            bar.set_postfix(score=f"{trial_.user_attrs.get('score', float('nan')):.3f}")
        study.optimize(objective, n_trials=remaining, callbacks=[cb])
    all_trials = [_trial_from_optuna(t, base, n_layers) for t in study.trials
                  if t.state == optuna.trial.TrialState.COMPLETE]
    pareto_numbers = {t.number for t in study.best_trials}
    pareto = [t for t, ot in zip(all_trials, [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE],
                                 strict=True) if ot.number in pareto_numbers]
    best = min(pareto or all_trials, key=lambda t: t.score)
    if plot_path is not None:
        save_pareto_plot(study, plot_path)
    return best, all_trials, pareto


def _trial_from_optuna(ot, base: EditParams, n_layers: int) -> Trial:
    p = ot.params
    kernels = {g: Kernel(p[f"{g}_peak"], p[f"{g}_width"], p[f"{g}_max_weight"], p[f"{g}_min_weight"])
               for g in ("attn", "mlp")}
    params = EditParams(direction_layer=p["direction_layer"], variant=p["variant"], targeted=base.targeted,
                        targeted_coef=p.get("targeted_coef", 0.0), attn=kernels["attn"], mlp=kernels["mlp"],
                        embed_weight=base.embed_weight)
    md = ot.user_attrs.get("measurement", {})
    m = Measurement(refusal=md.get("refusal", {}), counts={k: tuple(v) for k, v in md.get("counts", {}).items()},
                    kl=md.get("kl_first_token", 0.0), kl_answered=md.get("kl_first_token_answered"))
    return Trial(params, m, ot.user_attrs.get("score", float("inf")), 0.0)


def save_pareto_plot(study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in study.trials if t.values is not None]
    best = {t.number for t in study.best_trials}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for group, color in ((False, "#bbbbbb"), (True, "#d62728")):
        pts = [t for t in done if (t.number in best) == group]
        ax.scatter([t.values[1] for t in pts], [t.values[0] for t in pts], c=color, s=[20 + 200 * t.values[2] for t in pts],
                   label="Pareto front" if group else "trials", edgecolors="k", linewidths=0.3)
    ax.set_xlabel("first-token KL to the original (harmless prompts)")
    ax.set_ylabel("refusal rate (sensitive + harmless)")
    ax.set_title("deccp abliteration search (marker size: lost harmful refusals)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Turn measured directions and edit parameters into an EditPlan (which module, which direction, how much)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from deccp.abliteration.directions import Directions
from deccp.abliteration.edits import (
    TARGET_PATTERNS,
    EditPlan,
    Kernel,
    ModuleEdit,
    interpolate,
    orthogonalize,
    unit,
)

Variant = Literal["plain", "projected", "biprojected"]


@dataclass(frozen=True)
class EditParams:
    """One point of the search space; the recipe's defaults or an Optuna trial fill it."""

    direction_layer: float
    variant: Variant = "projected"
    targeted: bool = True
    targeted_coef: float = 1.0
    attn: Kernel | None = None
    mlp: Kernel | None = None
    embed_weight: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def censorship_direction(dirs: Directions, params: EditParams) -> torch.Tensor:
    """The (un-normalised, float64) direction to remove, before any per-layer projection.

    Targeted mode removes `targeted_coef` of its component along the harmful-refusal direction measured at the
    same layer, so ablating it leaves the refusal of genuinely harmful requests (mostly) in place.
    """
    r = interpolate(dirs.censorship, params.direction_layer)
    if params.targeted and dirs.harmful is not None and params.targeted_coef:
        r = orthogonalize(r, interpolate(dirs.harmful, params.direction_layer), params.targeted_coef)
    return r


def build_plan(dirs: Directions, params: EditParams, param_names: list[str], *, tied_embeddings: bool) -> EditPlan:
    n_layers = dirs.censorship.shape[0]
    raw = censorship_direction(dirs, params)
    shared = unit(raw)
    if params.variant == "projected":
        shared = unit(orthogonalize(raw, interpolate(dirs.good_mean, params.direction_layer)))
    norm_preserve = params.variant == "biprojected"
    default = Kernel(peak=params.direction_layer, width=float(n_layers), max_weight=1.0, min_weight=1.0)
    kernels = {"attn": params.attn or default, "mlp": params.mlp or default}
    plan = EditPlan()
    for name in param_names:
        for group in ("attn", "mlp"):
            m = TARGET_PATTERNS[group].search(name)
            if not m:
                continue
            layer = int(m.group(1))
            w = kernels[group].weight(layer)
            if w == 0:
                continue
            r = unit(orthogonalize(raw, dirs.good_mean[layer])) if params.variant == "biprojected" else shared
            plan.edits.append(ModuleEdit(name, r, w, norm_preserve))
        if params.embed_weight and TARGET_PATTERNS["embed"].search(name):
            r = unit(orthogonalize(raw, dirs.good_mean[0])) if params.variant != "plain" else shared
            plan.edits.append(ModuleEdit(name, r, params.embed_weight, norm_preserve))
            plan.untie_embeddings = tied_embeddings
    if not plan.edits:
        from deccp import DeccpError

        raise DeccpError(f"abliteration: the kernels select no layer (n_layers={n_layers})")
    return plan

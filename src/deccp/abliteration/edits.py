"""The weight edits: orthogonalise a direction out of the matrices that write to the residual stream.

For a matrix W (out = d_model) that writes into the residual stream and a unit direction r, ablation with
weight w is  W' = W - w r (rᵀ W).  Norm-preserving ablation then rescales every column (the write vector of
one input neuron) back to its original norm: W'' = W' diag(c), c_j = ‖W_j‖ / ‖W'_j‖.

An `EditPlan` lists, per module, the direction, weight and optional column scales. It is applied either
live (forward hooks: exact, instantly reverted, no copy of the model — used by selection and search) or to
the weights themselves (in memory or shard by shard); both give the same function.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch

from deccp import DeccpError

SUPPORTED_ARCHS = ("qwen2", "qwen3", "llama", "mistral")
# parameter-name patterns (HF naming) of the residual-stream writers, per target group
TARGET_PATTERNS = {
    "attn": re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.o_proj\.weight$"),
    "mlp": re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj\.weight$"),
    "embed": re.compile(r"(?:^|\.)embed_tokens\.weight$"),
}
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_architecture(config) -> None:
    mt = getattr(config, "model_type", "?")
    if mt not in SUPPORTED_ARCHS:
        raise DeccpError(f"abliteration: unsupported architecture {mt!r} "
                         f"(supported: {', '.join(SUPPORTED_ARCHS)}; MoE and multimodal models are not)")


@dataclass(frozen=True)
class Kernel:
    """Per-layer ablation weight: `max_weight` at `peak`, falling linearly to `min_weight` at distance
    `width`, zero beyond it."""

    peak: float
    width: float
    max_weight: float = 1.0
    min_weight: float = 1.0

    def weight(self, layer: int) -> float:
        d = abs(layer - self.peak)
        if d > self.width:
            return 0.0
        frac = d / self.width if self.width > 0 else 0.0
        return self.max_weight + (self.min_weight - self.max_weight) * frac


def unit(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    n = v.norm()
    if n == 0 or not torch.isfinite(n):
        raise DeccpError("abliteration: a direction has zero or non-finite norm (are the prompt sets identical?)")
    return v / n


def orthogonalize(v: torch.Tensor, against: torch.Tensor, coef: float = 1.0) -> torch.Tensor:
    """Remove `coef` times the component of `v` along `against`."""
    a = unit(against)
    return v.double() - coef * (v.double() @ a) * a


def interpolate(directions: torch.Tensor, index: float) -> torch.Tensor:
    """Direction at a fractional layer index, linear between the two neighbouring layers' mean differences."""
    n = directions.shape[0]
    if not 0 <= index <= n - 1:
        raise DeccpError(f"direction_layer {index} outside 0..{n - 1}")
    lo = math.floor(index)
    hi = min(lo + 1, n - 1)
    f = index - lo
    return (1 - f) * directions[lo].double() + f * directions[hi].double()


@dataclass
class ModuleEdit:
    name: str  # parameter name, e.g. model.layers.3.mlp.down_proj.weight
    direction: torch.Tensor  # unit, float64, (d_model,)
    weight: float
    norm_preserve: bool = False


@dataclass
class EditPlan:
    edits: list[ModuleEdit] = field(default_factory=list)
    untie_embeddings: bool = False

    def scaled(self, scale: float) -> EditPlan:
        """The same edit with every module's weight times `scale` (the plan itself when `scale` is 1)."""
        if scale == 1:
            return self
        return EditPlan([replace(e, weight=e.weight * scale) for e in self.edits], self.untie_embeddings)

    def digest(self) -> str:
        """A hash of everything the edit does (modules, directions, weights, norm preservation), for cache keys."""
        import hashlib

        h = hashlib.sha256(f"untie={self.untie_embeddings}".encode())
        for e in self.edits:
            h.update(f"|{e.name}|{e.weight!r}|{e.norm_preserve}|".encode())
            h.update(e.direction.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def by_name(self) -> dict[str, ModuleEdit]:
        return {e.name: e for e in self.edits}

    def first_layer(self) -> int:
        """The lowest decoder layer the edit changes; 0 when it edits something outside the layers (the embedding)."""
        layers = [int(m.group(1)) if (m := LAYER_INDEX.search(e.name)) else 0 for e in self.edits]
        return min(layers, default=0)

    def summary(self) -> dict:
        return {"modules": len(self.edits), "untie_embeddings": self.untie_embeddings,
                "weights": {e.name: round(e.weight, 4) for e in self.edits}}


def column_scales(weight: torch.Tensor, r: torch.Tensor, w: float) -> torch.Tensor:
    """c_j = ‖W_j‖ / ‖W_j - w r rᵀW_j‖ for the columns of a (d_model, d_in) matrix; computed in float64."""
    W = weight.double()
    proj = r.double() @ W  # (d_in,)
    before = (W * W).sum(0)
    after = before - (2 * w - w * w) * proj * proj
    return torch.sqrt(before / after.clamp_min(1e-30)).nan_to_num(1.0)


def edit_weight(weight: torch.Tensor, edit: ModuleEdit, *, is_embedding: bool = False) -> torch.Tensor:
    """The edited matrix (same dtype), computed in float64. Embeddings are (vocab, d_model): rows are writes."""
    W = weight.double()
    r = edit.direction.double().to(W.device)
    if is_embedding:
        out = W - edit.weight * torch.outer(W @ r, r)
        if edit.norm_preserve:
            out = out * (W.norm(dim=1) / out.norm(dim=1).clamp_min(1e-30)).unsqueeze(1)
    else:
        out = W - edit.weight * torch.outer(r, r @ W)
        if edit.norm_preserve:
            out = out * column_scales(W, r, edit.weight).unsqueeze(0)
    return out.to(weight.dtype)


class LiveEdit:
    """Apply an EditPlan through forward hooks; leaving the context (or `remove()`) restores the model exactly."""

    def __init__(self, model, plan: EditPlan):
        self.model = model
        self.plan = plan
        self.handles: list = []

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for e in self.plan.edits:
            mod_name = e.name.removesuffix(".weight")
            mod = modules.get(mod_name)
            if mod is None:
                raise DeccpError(f"abliteration: module {mod_name} not found in the model")
            dtype = mod.weight.dtype
            r = e.direction.to(device=mod.weight.device, dtype=torch.float32)
            if isinstance(mod, torch.nn.Embedding):
                self.handles.append(mod.register_forward_hook(_embed_hook(r, e.weight, e.norm_preserve, mod)))
                continue
            if e.norm_preserve:
                c = column_scales(mod.weight.detach(), e.direction.to(mod.weight.device), e.weight).to(torch.float32)
                self.handles.append(mod.register_forward_pre_hook(_scale_input_hook(c)))
            self.handles.append(mod.register_forward_hook(_project_output_hook(r, e.weight, mod.bias, dtype)))
        return self

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __exit__(self, *exc):
        self.remove()
        return False


def _scale_input_hook(c):
    def hook(module, args):
        x = args[0]
        return (x * c.to(x.dtype),) + tuple(args[1:])
    return hook


def _project_output_hook(r, w, bias, dtype):
    def hook(module, args, out):
        y = out.float()
        core = y - bias.float() if bias is not None else y
        return (y - w * (core @ r).unsqueeze(-1) * r).to(out.dtype)
    return hook


def _embed_hook(r, w, norm_preserve, module):
    scale = None
    if norm_preserve:
        W = module.weight.detach().double()
        rd = r.double()
        out = W - w * torch.outer(W @ rd, rd)
        scale = (W.norm(dim=1) / out.norm(dim=1).clamp_min(1e-30)).float()

    def hook(mod, args, out):
        y = out.float()
        y = y - w * (y @ r).unsqueeze(-1) * r
        if scale is not None:
            y = y * scale[args[0]].unsqueeze(-1)
        return y.to(out.dtype)
    return hook


def apply_in_memory(model, plan: EditPlan) -> None:
    """Edit the model's weights in place (untying tied embeddings first when the embedding is edited)."""
    params = dict(model.named_parameters())
    if plan.untie_embeddings:
        untie_embeddings(model)
        params = dict(model.named_parameters())
    with torch.no_grad():
        for e in plan.edits:
            p = params.get(e.name)
            if p is None:
                raise DeccpError(f"abliteration: parameter {e.name} not found in the model")
            p.copy_(edit_weight(p.data, e, is_embedding=e.name.endswith("embed_tokens.weight")))


def untie_embeddings(model) -> None:
    """Give the LM head its own copy of the embedding matrix, so editing the embedding leaves the head intact."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False

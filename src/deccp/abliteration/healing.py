"""Heal an abliterated model: a short low-rank distillation that undoes the edit's collateral damage.

Orthogonalising a direction out of every layer also moves answers that should not change (first-token KL
on harmless prompts). Healing trains a LoRA-style low-rank correction on top of the live edit, with one
teacher per prompt kind, so that it cannot simply learn the removed refusals back:

- harmless prompts the original answered -> the original model (undo the collateral damage);
- harmful prompts the original refused -> the original model (keep refusing genuinely harmful requests;
  `heal_harmful`); with `heal_harmful_refusals`, also those it complied with where one of its next most likely
  first tokens leads to a refusal, which is then the target;
- sensitive prompts, and harmless prompts the original refused -> the edited model itself, before healing
  (keep those refusals removed); with `heal_refusal_openers`, its first answer position without the tokens that
  open the original's own refusals;
- optionally plain texts (our train-split gold answers, no chat template) -> the original, at every position
  (`heal_texts`): general language modelling, which the edit also perturbs and capability probes measure.

Targets are each teacher's top-k next-token log-probabilities, plus the rest of the mass in one bucket, along
the teacher's own greedy answer prefix, taken from the very pass that generates that prefix. They are computed
once before training, so one copy of the model is held. The result is a set of low-rank deltas that the
streamed edit adds to the edited weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import random
import time
from dataclasses import dataclass
from typing import TypeVar

import torch

from deccp import DeccpError
from deccp.abliteration.baseline_cache import BaselineCache, cached
from deccp.abliteration.directions import ResidualRecorder
from deccp.chat import render_prompt
from deccp.data.schema import Prompt
from deccp.prompt_batch import common_prefix_length

_T = TypeVar("_T")


@dataclass
class HealExample:
    """One prompt + teacher answer prefix and the teacher's top-k log-probabilities at each answer position."""

    kind: str
    input_ids: list[int]
    n_prompt: int
    top_idx: torch.Tensor  # (n_answer, k) int64
    top_logp: torch.Tensor  # (n_answer, k) float32
    rest_logp: torch.Tensor  # (n_answer,) float32: log of the probability mass outside the top k
    lower: torch.Tensor | None = None  # (len(input_ids) - prefix, d_model): input of the first trained layer
    prompt_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # fixed prompt keys/values, layers from `first`


@dataclass
class LowRankDelta:
    """W += scaling * B @ A for the parameter `name` (original, un-wrapped naming)."""

    name: str
    A: torch.Tensor  # (r, in) float32
    B: torch.Tensor  # (out, r) float32
    scaling: float

    def dense(self, dtype=torch.float32) -> torch.Tensor:
        return (self.scaling * (self.B.double() @ self.A.double())).to(dtype)


def _log_rest(top_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(top_logp))) along the last axis, kept finite."""
    total = torch.logsumexp(top_logp, dim=-1).clamp(max=-1e-6)
    return torch.log(-torch.expm1(total))


def _batch(seqs: list[tuple[list[int], int]], pad_id: int, device):
    """Left-padded ids, attention mask, the number of last positions whose logits are needed, and the mask of
    those positions that predict an answer token (answers end at the right edge, so the last few suffice)."""
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    pred = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, n_prompt) in enumerate(seqs):
        off = width - len(s)
        ids[i, off:] = torch.tensor(s)
        att[i, off:] = 1
        pred[i, off + n_prompt - 1:width - 1] = True  # position t predicts token t+1: the answer's tokens
    keep = max(len(s) - n_prompt for s, n_prompt in seqs) + 1
    return ids.to(device), att.to(device), keep, pred[:, -keep:].to(device)


@torch.no_grad()
def _targets(model, seqs: list[tuple[list[int], int]], kind: str, *, top_k: int, batch_size: int,
             pad_id: int) -> list[HealExample]:
    device = next(model.parameters()).device
    out: list[HealExample] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        ids, att, keep, pred = _batch(chunk, pad_id, device)
        logits = model(input_ids=ids, attention_mask=att, logits_to_keep=keep).logits
        for i, (s, n_prompt) in enumerate(chunk):
            rows = logits[i][pred[i]].float().log_softmax(-1)  # predicted positions only: bounded memory
            val, idx = rows.topk(min(top_k, rows.shape[-1]), dim=-1)
            out.append(HealExample(kind, s, n_prompt, idx.cpu(), val.cpu(), _log_rest(val).cpu()))
    return out


class _ForceFirstToken:
    """Logits processor: at the first generated position, row r must choose `tokens[r]` (None: free)."""

    def __init__(self, width: int, tokens: list[int | None]):
        self.width, self.tokens = width, tokens

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] != self.width:
            return scores
        forced = scores.clone()  # generate keeps the raw logits (output_logits) in the tensor it passes here
        for row, token in enumerate(self.tokens):
            if token is not None:
                forced[row] = float("-inf")
                forced[row, token] = 0.0
        return forced


def teacher_settings(cfg) -> dict:
    """`teacher_answers`' settings from an abliteration config: the one place that fixes how healing asks any
    teacher (the original, the edit, their replacement answers) for its answers and targets."""
    return dict(answer_tokens=cfg.heal_answer_tokens, top_k=cfg.heal_top_k, batch_size=cfg.batch_size,
                system=cfg.system_prompt)


@torch.no_grad()
def teacher_answers(model, tokenizer, kind: str, prompts: list[Prompt], *, answer_tokens: int, top_k: int,
                    batch_size: int, system: str | None = None,
                    start_with: list[tuple[int, list[int]]] | None = None,
                    recorder: ResidualRecorder | None = None) -> tuple[list[str], list[HealExample]]:
    """The model's greedy answers of up to `answer_tokens` tokens, as it is now (the caller sets the teacher:
    original, or with the edit live), and from the same pass its top-k next-token log-probabilities at each
    answer position. The targets follow the generated token ids themselves (up to and including an end-of-turn
    token), so no second forward pass and no re-tokenization of the decoded text is needed.

    `start_with[i] = (token, excluded)`: prompt i's answer starts with `token`, and the teacher is the model
    conditioned on not choosing the `excluded` tokens there (masked out of the first position's distribution,
    which is renormalised; `token` should be the most likely of the rest, so the answer stays greedy).

    `recorder` (entered, sized for `prompts`): the same prompt passes also record the residual stream for the
    direction pass, so the original's answers serve the direction filter and the healing targets alike.

    Returns the answer texts (stripped, special tokens dropped, as `short_answers` gives them) and one example
    per prompt, both in the order of `prompts`."""
    from transformers import LogitsProcessorList

    from deccp.generation import stop_token_ids
    from deccp.packed import packed_linears
    from deccp.prompt_batch import can_share, encode_prompts, longest_first

    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    texts: list[str] = [""] * len(prompts)
    examples: list[HealExample | None] = [None] * len(prompts)
    order = longest_first(tokenizer, [p.text for p in prompts])  # less padding
    with packed_linears(model):  # decoding steps run on packed weights
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = encode_prompts(tokenizer, [prompts[i].text for i in idx], system, device=device,
                                   keep=recorder.keep if recorder else 1)
            width = batch.width
            starts = [start_with[i] if start_with else None for i in idx]
            extra = ({"logits_processor": LogitsProcessorList([_ForceFirstToken(width, [x and x[0] for x in starts])])}
                     if any(starts) else {})
            cache = batch.cache(model) if can_share(model) else None  # the shared prefix runs before the hooks arm
            with recorder.rows(idx) if recorder is not None else contextlib.nullcontext():
                out = batch.generate(model, cache=cache, max_new_tokens=answer_tokens, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id, output_logits=True,
                                     return_dict_in_generate=True, **extra)
            steps, sequences = list(out.logits), out.sequences  # raw logits, before any logits processor
            del out
            answers = [sequences[row, width:].tolist() for row in range(len(idx))]
            lengths = [next((k + 1 for k, t in enumerate(new) if t in stops), len(new)) for new in answers]
            tops = _step_top_k(steps, top_k, [x[1] if x else None for x in starts])
            for row, i in enumerate(idx):
                n, new, prompt_ids = lengths[row], answers[row], batch.prompt_ids(row)
                val = torch.stack([v[row] for v, _ in tops[:n]])
                top = torch.stack([t[row] for _, t in tops[:n]])
                examples[i] = HealExample(kind, prompt_ids + new[:n], len(prompt_ids), top, val, _log_rest(val))
                texts[i] = tokenizer.decode(new[:n], skip_special_tokens=True).strip()
    return texts, [e for e in examples if e is not None]


def _step_top_k(steps: list[torch.Tensor], top_k: int,
                excluded: list[list[int] | None]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per generation step, the top-k log-probabilities and token ids of every row (CPU), from the raw logits
    `steps[s]` (batch, vocab); row r's first-step distribution is renormalised without `excluded[r]`. Each step's
    logits are released once reduced, so a batch never holds its (batch, steps, vocab) logits twice: with 48 rows
    and 12 steps that copy alone is 350 MB in float32, and it was the peak of the whole abliteration run."""
    out = []
    for s in range(len(steps)):
        raw = steps[s].float()
        steps[s] = None  # type: ignore[call-overload]
        if s == 0 and any(excluded):
            raw = raw.clone()
            for row, tokens in enumerate(excluded):
                if tokens:
                    raw[row, tokens] = float("-inf")
        logp = raw.log_softmax(-1)
        del raw
        val, top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        out.append((val.cpu(), top.cpu()))
    return out


def replace_unwanted_answers(model, tokenizer, prompts: list[Prompt], texts: list[str],
                             examples: list[HealExample], *, alternatives: int, unwanted, **kw) -> tuple[int, int]:
    """Where the teacher's answer (`texts[i]`, `examples[i]`) is unwanted by `unwanted(text, lang)` (a refusal
    of a sensitive prompt, a compliance with a harmful one), answer again from the teacher's next most likely
    first tokens, up to `alternatives` of them; the first of them, in the teacher's order, whose answer is not
    unwanted replaces `texts[i]` and `examples[i]` in place, with the teacher conditioned on not starting with
    the tokens ranked above it. This equals asking again without the unwanted answer's first token, then without
    the next one's too, and so on. One generation pass per rank, over the prompts no earlier rank answered well.
    Prompts answered unwantedly every time keep their first answer.
    `kw`: `teacher_answers`' settings. Returns (unwanted, replaced)."""
    todo = [i for i, (p, t) in enumerate(zip(prompts, texts, strict=True)) if unwanted(t, p.lang)]
    ranked = {i: examples[i].top_idx[0].tolist() for i in todo}  # the teacher's first tokens, most likely first
    left, replaced = list(todo), 0
    for j in range(1, alternatives + 1):
        left = [i for i in left if j < len(ranked[i])]  # a teacher keeps top_k first tokens
        if not left:
            break
        new_texts, new_examples = teacher_answers(model, tokenizer, examples[left[0]].kind, [prompts[i] for i in left],
                                                  start_with=[(ranked[i][j], ranked[i][:j]) for i in left], **kw)
        still = []
        for i, t, e in zip(left, new_texts, new_examples, strict=True):
            if unwanted(t, prompts[i].lang):
                still.append(i)
            else:
                texts[i], examples[i] = t, e
                replaced += 1
        left = still
    return len(todo), replaced


def cached_teacher_answers(cache: BaselineCache | None, model, tokenizer, kind: str, prompts: list[Prompt], *,
                           answer_tokens: int, top_k: int, batch_size: int, system: str | None = None,
                           recorder: ResidualRecorder | None = None) -> tuple[list[str], list[HealExample]]:
    """`teacher_answers` of the unedited model, through `cache` (None: always computed). `recorder` is filled only
    when the answers are computed, not when they come from the cache."""
    kw = dict(answer_tokens=answer_tokens, top_k=top_k, batch_size=batch_size, system=system)
    if cache is None or not prompts:
        return teacher_answers(model, tokenizer, kind, prompts, recorder=recorder, **kw)

    def compute():
        return _to_entry(*teacher_answers(model, tokenizer, kind, prompts, recorder=recorder, **kw))

    key = [[render_prompt(tokenizer, p.text, system) for p in prompts], kind, answer_tokens, top_k, batch_size]
    return _from_entry(kind, *cache.get_or_compute("heal-targets", key, compute))


def _to_entry(texts: list[str], examples: list[HealExample], **extra) -> tuple[dict[str, torch.Tensor], dict]:
    """Answers and their targets as one cache entry: the examples' target rows concatenated, the rest as JSON."""
    tensors = {name: torch.cat([getattr(e, name) for e in examples]) for name in ("top_idx", "top_logp", "rest_logp")}
    return tensors, {"texts": texts, "input_ids": [e.input_ids for e in examples],
                     "n_prompt": [e.n_prompt for e in examples], **extra}


def _from_entry(kind: str, t: dict[str, torch.Tensor], meta: dict) -> tuple[list[str], list[HealExample]]:
    examples, at = [], 0
    for ids, n_prompt in zip(meta["input_ids"], meta["n_prompt"], strict=True):
        n = len(ids) - n_prompt
        examples.append(HealExample(kind, ids, n_prompt, t["top_idx"][at:at + n], t["top_logp"][at:at + n],
                                    t["rest_logp"][at:at + n]))
        at += n
    return meta["texts"], examples


def edit_teacher_answers(cache: BaselineCache | None, model, tokenizer, prompts: list[Prompt], plan, cfg,
                         log=print) -> tuple[list[str], list[HealExample], dict[str, int] | None]:
    """The teacher answers of the edit `plan`, which the caller has live on `model`: its greedy answers and
    targets, and with `heal_refusal_alternatives` an answer instead of each refusal. Through `cache`, keyed by
    the edit itself (`plan.digest()`) besides the prompts and settings, so a re-run of the same edit reads them
    back instead of generating them again (about a minute of a default run on a 2-core CPU). Returns the texts,
    the examples and, with alternatives, {"refused", "answered_instead"}."""
    from deccp.judges.refusal import is_refusal

    kw = teacher_settings(cfg)

    def generate():
        texts, examples = teacher_answers(model, tokenizer, "edited", prompts, **kw)
        refusals = None
        if cfg.heal_refusal_alternatives:
            t1 = time.time()
            n_refused, n_answered = replace_unwanted_answers(
                model, tokenizer, prompts, texts, examples, alternatives=cfg.heal_refusal_alternatives,
                unwanted=is_refusal, **kw)
            refusals = {"refused": n_refused, "answered_instead": n_answered}
            log(f"healing: the edit refused {n_refused} of {len(prompts)} prompts it teaches; {n_answered} answered "
                f"from one of its next {cfg.heal_refusal_alternatives} most likely first tokens "
                f"({time.time() - t1:.0f} s)")
        return texts, examples, refusals

    if cache is None or not prompts:
        return generate()

    def compute():
        texts, examples, refusals = generate()
        return _to_entry(texts, examples, edit_refusals=refusals)

    from deccp import __version__

    # the refusal judge's verdicts are part of the entry (which alternative replaced a refusal): a new deccp version,
    # whose judge may differ, computes them again
    key = [[render_prompt(tokenizer, p.text, cfg.system_prompt) for p in prompts], "edited", plan.digest(),
           cfg.heal_answer_tokens, cfg.heal_top_k, cfg.batch_size, cfg.heal_refusal_alternatives, __version__]
    tensors, meta = cache.get_or_compute("heal-edit-targets", key, compute)
    return (*_from_entry("edited", tensors, meta), meta["edit_refusals"])


def harmful_refusal_targets(cache: BaselineCache | None, model, tokenizer, prompts: list[Prompt], texts: list[str],
                            examples: list[HealExample], cfg,
                            log=print) -> tuple[list[str], list[HealExample], dict[str, int]]:
    """The original's answers to harmful prompts (`texts`, `examples`, from `heal_teacher_answers`) with each
    compliance replaced, where one of its next `heal_harmful_refusals` most likely first tokens leads to a refusal,
    by that refusal (`replace_unwanted_answers`): the original's own way of declining, taught where it would have
    complied. The caller has the unedited model live. Through `cache` (the unedited model's), keyed by the prompts,
    the settings and the deccp version (the entry holds the refusal judge's verdicts). Returns the texts, the
    examples and {"answered", "refused_instead"}."""
    from deccp import __version__
    from deccp.judges.refusal import is_refusal

    kw = teacher_settings(cfg)

    def compute():
        t0 = time.time()
        got_texts, got = list(texts), list(examples)
        n_answered, n_refused = replace_unwanted_answers(
            model, tokenizer, prompts, got_texts, got, alternatives=cfg.heal_harmful_refusals,
            unwanted=lambda text, lang: not is_refusal(text, lang), **kw)
        log(f"healing: the original answered {n_answered} of {len(prompts)} harmful prompts; {n_refused} refused from "
            f"one of its next {cfg.heal_harmful_refusals} most likely first tokens ({time.time() - t0:.0f} s)")
        return _to_entry(got_texts, got, counts={"answered": n_answered, "refused_instead": n_refused})

    if not prompts:
        return texts, examples, {"answered": 0, "refused_instead": 0}
    key = [[render_prompt(tokenizer, p.text, cfg.system_prompt) for p in prompts], "harmful", cfg.heal_answer_tokens,
           cfg.heal_top_k, cfg.batch_size, cfg.heal_harmful_refusals, __version__]
    tensors, meta = cached(cache, "heal-harmful-refusals", key, compute)
    return (*_from_entry("harmful", tensors, meta), meta["counts"])


def text_targets(model, tokenizer, texts: list[str], *, max_tokens: int, top_k: int,
                 batch_size: int) -> list[HealExample]:
    """The model's top-k next-token log-probabilities at every position of plain texts (no chat template):
    plain language modelling, which the capability probes and continuations rely on (kind `text`)."""
    seqs = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) >= 2:
            seqs.append((ids, 1))  # the first token is the context; every later one is predicted
    return _targets(model, seqs, "text", top_k=top_k, batch_size=batch_size, pad_id=tokenizer.pad_token_id)


def plain_texts(langs: list[str], n: int, seed: int = 0) -> list[str]:
    """Up to `n` gold answers of our train split (sensitive prompts, factual prose), balanced over `langs`;
    never the eval split."""
    from deccp.data.load import load_bundle

    golds = [a for a in load_bundle().answers if a.split == "train" and a.kind == "sensitive" and a.lang in langs]
    random.Random(seed).shuffle(golds)
    return [a.gold for a in _balanced(golds, n)]


def refusal_openers(refusals: list[HealExample]) -> set[int]:
    """The tokens that open these answers (the original's refusals): the first token of each."""
    return {e.input_ids[e.n_prompt] for e in refusals if len(e.input_ids) > e.n_prompt}


def drop_first_tokens(example: HealExample, tokens: set[int], share: float = 1.0) -> float:
    """Lower the teacher's probability of `tokens` at the first answer position to `share` of itself (0: gone) and
    renormalise the rest, in place; the answer's own first token is never lowered. Returns the probability moved."""
    first = example.input_ids[example.n_prompt]
    idx, logp = example.top_idx[0], example.top_logp[0]
    mask = torch.tensor([int(t) in tokens and int(t) != first for t in idx.tolist()], dtype=torch.bool)
    if not mask.any():
        return 0.0
    moved = float(logp[mask].exp().sum()) * (1 - share)
    if moved <= 0:
        return 0.0
    norm = math.log1p(-min(moved, 1 - 1e-6))
    new = logp - norm
    new[mask] = logp[mask] + (math.log(share) if share > 0 else -60.0) - norm
    example.top_logp = example.top_logp.clone()
    example.top_logp[0] = new
    rest = example.rest_logp.clone()
    rest[0] = rest[0] - norm
    example.rest_logp = rest
    return moved


def coarse_kl(student_logp: torch.Tensor, ex_idx: torch.Tensor, ex_logp: torch.Tensor, ex_rest: torch.Tensor):
    """KL(teacher || student) over the teacher's top-k tokens plus one bucket for the rest, per position."""
    s_top = student_logp.gather(-1, ex_idx)
    s_rest = _log_rest(s_top)
    t_p = ex_logp.exp()
    return (t_p * (ex_logp - s_top)).sum(-1) + ex_rest.exp() * (ex_rest - s_rest)


@dataclass
class HealResult:
    deltas: list[LowRankDelta]
    examples: dict[str, int]
    losses: list[float]
    seconds: float
    edit_refusals: dict[str, int] | None = None  # heal_refusal_alternatives: refused by the edit, answered instead
    edit_targets_cached: bool = False  # the edit's answers and targets came from the cache
    harmful_refusals: dict[str, int] | None = None  # heal_harmful_refusals: answered by the original, refused instead
    refusal_openers: dict | None = None  # heal_refusal_openers: {"tokens", "mean_moved"}

    def summary(self) -> dict:
        first = self.losses[:max(1, len(self.losses) // 10)]
        last = self.losses[-max(1, len(self.losses) // 10):]
        return {"examples": self.examples, "steps": len(self.losses), "modules": len(self.deltas),
                "loss_start": round(sum(first) / len(first), 5), "loss_end": round(sum(last) / len(last), 5),
                "edit_refusals": self.edit_refusals, "edit_targets_cached": self.edit_targets_cached,
                "harmful_refusals": self.harmful_refusals, "refusal_openers": self.refusal_openers,
                "seconds": round(self.seconds, 2)}


class LowRankAdapters:
    """Trainable low-rank corrections  y = W x + (alpha / rank) B A x  on linear modules, through forward hooks.

    No module is replaced, so a live edit's hooks on the same modules keep working: the correction reads the
    module's raw input (a pre-hook placed first) and is added after the edit's output hook, which makes the
    function `edit(W) + s B A`, the weight the streamed edit writes. Leaving the context removes every hook."""

    def __init__(self, model, *, rank: int, alpha: float, target_modules: list[str], seed: int = 0,
                 first_layer: int = 0):
        self.model, self.rank, self.scaling = model, rank, alpha / rank
        self.targets = self._select(model, target_modules, first_layer)
        gen = torch.Generator().manual_seed(seed)
        self.A: dict[str, torch.nn.Parameter] = {}
        self.B: dict[str, torch.nn.Parameter] = {}
        offloaded = [n for n, m in self.targets.items() if m.weight.device.type == "meta"]
        if offloaded:
            raise DeccpError(f"abliteration healing needs the model in memory; {offloaded[0]} is offloaded "
                             "(drop device_map, or set heal: false)")
        for name, mod in self.targets.items():
            device = mod.weight.device
            bound = 1 / math.sqrt(mod.in_features)  # LoRA's start: A uniform, B zero, so the correction starts at 0
            a = (torch.rand(rank, mod.in_features, generator=gen) * 2 - 1) * bound
            self.A[name] = torch.nn.Parameter(a.to(device))
            self.B[name] = torch.nn.Parameter(torch.zeros(mod.out_features, rank, device=device))
        self.handles: list = []
        self._inputs: dict[str, torch.Tensor] = {}
        self._dtype: torch.dtype | None = None  # None: float32 (training); else the cast used for inference

    @staticmethod
    def _select(model, target_modules: list[str], first_layer: int = 0) -> dict[str, torch.nn.Linear]:
        """The linear modules named by `target_modules` (or every one but the output head), in decoder layers
        `first_layer` and above (with no trainable module below it, backward stops there)."""
        from deccp.abliteration.edits import LAYER_INDEX

        head = model.get_output_embeddings()
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
                   and ((k := LAYER_INDEX.search(n)) is None or int(k.group(1)) >= first_layer)}
        if target_modules == ["all-linear"]:
            chosen = linears
        else:
            chosen = {n: m for n, m in linears.items() if n.rsplit(".", 1)[-1] in target_modules}
        if not chosen:
            raise DeccpError(f"abliteration healing: no linear module matches heal_target_modules {target_modules}"
                             + (f" in layers {first_layer} and above" if first_layer else ""))
        return chosen

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.A.values(), *self.B.values()]

    def for_inference(self, dtype: torch.dtype) -> None:
        """Stop training: the corrections run in the model's dtype."""
        self._dtype = dtype
        for p in self.parameters():
            p.requires_grad_(False)

    def deltas(self) -> list[LowRankDelta]:
        return [LowRankDelta(f"{n}.weight", self.A[n].detach().float().cpu().clone(),
                             self.B[n].detach().float().cpu().clone(), self.scaling) for n in self.targets]

    def __enter__(self):
        for name, mod in self.targets.items():
            self.handles.append(mod.register_forward_pre_hook(self._keep_input(name), prepend=True))
            self.handles.append(mod.register_forward_hook(self._add_correction(name)))
        return self

    def _keep_input(self, name: str):
        def hook(module, args):
            self._inputs[name] = args[0]
        return hook

    def _add_correction(self, name: str):
        def hook(module, args, out):
            x = self._inputs.pop(name)
            A, B = self.A[name], self.B[name]
            if self._dtype is not None:
                A, B = A.to(self._dtype), B.to(self._dtype)
            delta = (x.to(A.dtype) @ A.T) @ B.T
            return out + (self.scaling * delta).to(out.dtype)
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._inputs.clear()
        return False


@dataclass(frozen=True)
class LowerLayers:
    """Where the cached inputs of the first trained decoder layer (each example's `lower`) start and apply."""

    first: int  # the decoder layer they feed: the layers below it do not run during training
    prefix_len: int  # the shared beginning: the cached states cover each example's tokens after it
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # fixed prefix keys/values (1 row), every layer


class _Stop(Exception):
    pass


@torch.no_grad()
def cache_lower_layers(model, examples: list[HealExample], first: int, *, pad_id: int,
                       batch_size: int) -> LowerLayers:
    """Store on each example the input of decoder layer `first` at its tokens after the shared beginning.

    With `heal_layers: edited` the layers below the first edited one carry neither the edit nor a correction, so
    what they give each example never changes while healing trains: computed once here, it saves their forward
    pass in every step (on the default model a third of the decoder's forward work per step)."""
    from transformers import DynamicCache

    from deccp.abliteration.directions import decoder_layers
    from deccp.prompt_batch import base_model_of, pack_prompts, prefix_cache, repeat_cache

    device = next(model.parameters()).device
    prefix = shared_prefix_length(examples)
    shared = prefix_cache(model, examples[0].input_ids[:prefix], 1) if prefix else None
    seen: list[torch.Tensor] = []

    def stop(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    handle = decoder_layers(model)[first].register_forward_pre_hook(stop, with_kwargs=True)
    by_length = sorted(examples, key=lambda e: len(e.input_ids))  # less padding
    try:
        for start in range(0, len(by_length), batch_size):
            chunk = by_length[start:start + batch_size]
            batch = pack_prompts([e.input_ids for e in chunk], prefix, pad_id, device)
            cache = repeat_cache(shared, len(chunk)) if shared is not None else DynamicCache(config=model.config)
            with contextlib.suppress(_Stop):
                batch.forward(base_model_of(model), cache=cache)
            h = seen.pop()
            for i, e in enumerate(chunk):  # the tails are right-aligned after the prefix
                e.lower = h[i, h.shape[1] - (len(e.input_ids) - prefix):].clone()
    finally:
        handle.remove()
    return LowerLayers(first, prefix)


@torch.no_grad()
def fix_prompt_states(model, examples: list[HealExample], lower: LowerLayers, *, pad_id: int,
                      batch_size: int) -> LowerLayers:
    """Keys and values of each example's prompt (all but its last token) in the layers from `lower.first` on, and
    of the shared prefix, computed once as the model is now (the edit, corrections at zero) and stored: steps
    then run the last prompt token and the answer only, against these fixed prompt states (`answer_logits`)."""
    from transformers import DynamicCache

    from deccp.prompt_batch import base_model_of, pack_prompts, prefix_cache

    device = next(model.parameters()).device
    n_layers = len(base_model_of(model).layers)
    prefix_kv = None
    if lower.prefix_len:
        shared = prefix_cache(model, examples[0].input_ids[:lower.prefix_len], 1)
        prefix_kv = [(shared.layers[j].keys, shared.layers[j].values) for j in range(n_layers)]
    by_length = sorted(examples, key=lambda e: e.n_prompt)  # less padding, as in `cache_lower_layers`
    for start in range(0, len(by_length), batch_size):
        chunk = by_length[start:start + batch_size]
        prompts = pack_prompts([e.input_ids[:e.n_prompt - 1] for e in chunk], lower.prefix_len, pad_id, device)
        cache = DynamicCache(config=model.config)
        for j, (k, v) in enumerate(prefix_kv or []):
            cache.update(k.expand(len(chunk), -1, -1, -1).clone(), v.expand(len(chunk), -1, -1, -1).clone(), j)
        tail = prompts.width - prompts.prefix_len
        if tail:
            answer = max(len(e.input_ids) - e.n_prompt + 1 for e in chunk)
            with layers_from(model, lower.first):
                base_model_of(model)(inputs_embeds=_lower_states(chunk, tail, tail + answer, device)[:, :tail],
                                     attention_mask=prompts.attention_mask, past_key_values=cache, use_cache=True,
                                     position_ids=prompts.position_ids()[:, prompts.prefix_len:])
        for i, e in enumerate(chunk):
            t = e.n_prompt - 1 - lower.prefix_len
            e.prompt_kv = [(cache.layers[j].keys[i:i + 1, :, prompts.width - t:].clone(),
                            cache.layers[j].values[i:i + 1, :, prompts.width - t:].clone())
                           for j in range(lower.first, n_layers)]
    return dataclasses.replace(lower, prefix_kv=prefix_kv)


def _fixed_prompt_cache(model, examples: list[HealExample], lower: LowerLayers, tail: int, device):
    """A cache holding the examples' fixed prompt states (`fix_prompt_states`) laid out as `answer_logits` lays out
    the prompts (`[prefix | left padding | prompt]`, `tail` columns after the prefix); the layers below
    `lower.first`, which do not run, get the first trained layer's, so the mask is sized right."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ref = examples[0].prompt_kv[0][0]
    for j in range(lower.first + len(examples[0].prompt_kv)):
        src = max(j, lower.first)
        k = torch.zeros(len(examples), ref.shape[1], tail, ref.shape[3], dtype=ref.dtype, device=device)
        v = torch.zeros_like(k)
        for i, e in enumerate(examples):
            ek, ev = e.prompt_kv[src - lower.first]
            k[i, :, tail - ek.shape[2]:], v[i, :, tail - ev.shape[2]:] = ek[0], ev[0]
        if lower.prefix_kv is not None:
            pk, pv = lower.prefix_kv[src]
            k = torch.cat([pk.expand(len(examples), -1, -1, -1), k], dim=2)
            v = torch.cat([pv.expand(len(examples), -1, -1, -1), v], dim=2)
        cache.update(k, v, j)
    return cache


@contextlib.contextmanager
def layers_from(model, first: int):
    """Run the decoder from layer `first` on: its inputs come as `inputs_embeds` (the hidden states there), the
    caches of the layers below are left alone. Restores the model on exit."""
    from deccp.prompt_batch import base_model_of

    decoder = base_model_of(model)
    layers, types = decoder.layers, getattr(decoder.config, "layer_types", None)
    decoder.layers = torch.nn.ModuleList(list(layers)[first:])
    if types is not None:  # which attention (full or sliding) each layer uses, by position in the list
        decoder.config.layer_types = list(types)[first:]
    try:
        yield
    finally:
        decoder.layers = layers
        if types is not None:
            decoder.config.layer_types = types


def shared_prefix_length(examples: list[HealExample]) -> int:
    """How many leading tokens every example shares (the chat template's system turn, typically), leaving each
    at least its last prompt token (which predicts the first answer token) outside; 0 below `MIN_SHARED_PREFIX`."""
    return common_prefix_length([e.input_ids for e in examples], min(e.n_prompt for e in examples) - 1)


def answer_logits(model, examples: list[HealExample], *, pad_id: int, sliced: bool,
                  detach_prompt: bool = False, lower: LowerLayers | None = None) -> list[torch.Tensor]:
    """Each example's logits at the positions that predict its answer tokens, (n_answer, vocab) per example.

    Layout `[shared prefix | left padding | prompt | last prompt token, answer | right padding]`, positions from
    the cumulative mask. The beginning all examples share is run once and its keys and values are repeated over
    the batch, so a step costs only the tokens that differ: Qwen2.5's default system turn is 24 of the about 58
    tokens of a healing sequence on the default model. `detach_prompt`: the prompts run first, without
    gradients, filling the cache, and then the last prompt token (which predicts the first answer token) and the
    answer (same logits; only the answer part is backpropagated, so a step costs a forward pass over the
    prompt and a forward and backward pass over the answer). `sliced`: project only the needed positions onto
    the vocabulary (else all, then indexed: on CPU, backward through the sliced bf16 output was slower). `lower`
    (from `cache_lower_layers`): the layers below `lower.first` are not run, their output comes from each
    example's cached states (with `detach_prompt`, for the prompt pass and the answer pass alike); when the
    examples also carry fixed prompt states (`fix_prompt_states`), the prompts do not run at all: only each last
    prompt token and answer, against those states."""
    from transformers import DynamicCache

    from deccp.prompt_batch import base_model_of, pack_prompts

    device = next(model.parameters()).device
    prefix = lower.prefix_len if lower is not None else shared_prefix_length(examples)
    prompts = pack_prompts([e.input_ids[:e.n_prompt - 1] for e in examples], prefix, pad_id, device)
    answers = [e.input_ids[e.n_prompt - 1:] for e in examples]
    width = max(len(a) for a in answers)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    tail_mask = torch.zeros_like(ids)
    pred = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, a in enumerate(answers):
        ids[i, :len(a)], tail_mask[i, :len(a)] = torch.tensor(a), 1
        pred[i, :len(a) - 1] = True  # position t predicts token t + 1: the answer's tokens
    ids, pred = ids.to(device), pred.to(device)
    att = torch.cat([prompts.attention_mask, tail_mask.to(device)], dim=1)
    positions = (att.cumsum(-1) - 1).clamp_min(0)
    fixed = lower is not None and examples[0].prompt_kv is not None  # the prompts' states are stored
    states = None  # the cached lower-layer states after the prefix, laid out as the tokens after it
    if lower is not None:
        states = _lower_states(examples, prompts.width - prompts.prefix_len, att.shape[1] - prompts.prefix_len, device)
    run_from = functools.partial(layers_from, model, lower.first) if lower is not None else contextlib.nullcontext
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_prompt and not fixed):
        if fixed:
            cache = _fixed_prompt_cache(model, examples, lower, prompts.width - prompts.prefix_len, device)
        else:
            cache = prompts.cache(model) if prompts.prefix_len else DynamicCache(config=model.config)
        if detach_prompt and not fixed and prompts.width > prompts.prefix_len:
            if states is None:
                prompts.forward(base_model_of(model), cache=cache)
            else:
                with run_from():
                    base_model_of(model)(inputs_embeds=states[:, :prompts.width - prompts.prefix_len],
                                         attention_mask=prompts.attention_mask, past_key_values=cache, use_cache=True,
                                         position_ids=positions[:, prompts.prefix_len:prompts.width])
                for i in range(lower.first):  # never run; sized like the layers that ran, as the mask reads layer 0
                    cache.layers[i] = copy.copy(cache.layers[lower.first])
    start = prompts.width if detach_prompt or fixed else prompts.prefix_len  # else prompt and answer in one pass
    ids = torch.cat([prompts.input_ids[:, start:], ids], dim=1)
    pred = torch.cat([torch.zeros_like(prompts.attention_mask[:, start:], dtype=torch.bool), pred], dim=1)
    inputs: dict = {"input_ids": ids}
    if states is not None:
        inputs = {"inputs_embeds": states[:, start - prompts.prefix_len:]}
    with run_from():
        out = model(**inputs, attention_mask=att, position_ids=positions[:, start:],
                    past_key_values=cache, use_cache=True, logits_to_keep=pred if sliced else 0).logits
    rows = out if sliced else out[pred]  # (positions of every example in order, vocab)
    return list(rows.split(pred.sum(1).tolist()))


def _lower_states(examples: list[HealExample], prompt_width: int, width: int, device) -> torch.Tensor:
    """The cached lower-layer states laid out as `answer_logits` lays out the tokens after the prefix: prompt
    right-aligned in the first `prompt_width` columns, then the answer from its last prompt token, zeros at the
    padding (masked out)."""
    ref = examples[0].lower
    if ref is None or any(e.lower is None for e in examples):
        raise DeccpError("healing: an example has no cached lower-layer states (cache_lower_layers)")
    h = torch.zeros(len(examples), width, ref.shape[-1], dtype=ref.dtype, device=device)
    for i, e in enumerate(examples):
        k = e.lower.shape[0] - (len(e.input_ids) - e.n_prompt + 1)  # prompt tokens after the prefix, but the last
        h[i, prompt_width - k:prompt_width] = e.lower[:k]
        h[i, prompt_width:prompt_width + e.lower.shape[0] - k] = e.lower[k:]
    return h


def train(model, adapters: LowRankAdapters, examples: list[HealExample], *, steps: int, lr: float, batch_size: int, seed: int,
          pad_id: int, first_token_weight: float = 1.0, kind_weights: dict[str, float] | None = None,
          detach_prompt: bool = False, lower: LowerLayers | None = None, log=print) -> list[float]:
    """Minimise the coarse KL to each example's teacher over the answer positions; returns the step losses.

    Each example counts equally (its positions are averaged), or `kind_weights[kind]` times (default 1); the first
    answer position, where the model chooses between answering, refusing or switching language, weighs
    `first_token_weight` times the others."""
    if not examples:
        raise DeccpError("abliteration healing: no examples (no harmless prompt answered, no sensitive prompt?)")
    device = next(model.parameters()).device
    params = adapters.parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    t0 = time.time()
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        chosen = [examples[i] for i in order[:batch_size]]
        del order[:batch_size]
        # float32: only the answer positions are projected onto the vocabulary (a step about 11 % faster on a 2-core
        # CPU); bfloat16: all positions, since backward through a sliced bf16 output was several times slower on CPU
        logits = answer_logits(model, chosen, pad_id=pad_id, sliced=next(model.parameters()).dtype == torch.float32,
                               detach_prompt=detach_prompt, lower=lower)
        total, mass = 0.0, 0.0
        for e, rows in zip(chosen, logits, strict=True):
            s = rows.float().log_softmax(-1)
            kl = coarse_kl(s, e.top_idx.to(device), e.top_logp.to(device), e.rest_logp.to(device))
            w = torch.ones_like(kl)
            if e.kind != "text":  # plain texts have no answer start
                w[0] = first_token_weight
            k = (kind_weights or {}).get(e.kind, 1.0)
            total, mass = total + k * (kl * w).sum() / w.sum(), mass + k
        loss = total / mass
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step == 0 or (step + 1) % 10 == 0 or step == steps - 1:
            log(f"  healing step {step + 1}/{steps}: KL to the teachers {losses[-1]:.4f} ({time.time() - t0:.0f} s)")
    for n, p in model.named_parameters():
        p.requires_grad_(frozen[n])
    return losses




def _balanced(items: list[_T], n: int) -> list[_T]:
    """Up to `n` items (prompts or answers: anything with a `lang`), alternating languages in their given order."""
    by_lang: dict[str, list[_T]] = {}
    for p in items:
        by_lang.setdefault(p.lang, []).append(p)
    out: list[_T] = []
    while len(out) < n and any(by_lang.values()):
        for lang in list(by_lang):
            if by_lang[lang] and len(out) < n:
                out.append(by_lang[lang].pop(0))
    return out


def heal_teacher_answers(cache: BaselineCache | None, model, tokenizer, kind: str, prompts: list[Prompt], cfg,
                         recorder: ResidualRecorder | None = None) -> tuple[list[str], list[HealExample]]:
    """`cached_teacher_answers` with `cfg`'s healing settings (`teacher_settings`), so an earlier pass that stores
    them (the direction pass) stores what `heal` will read."""
    return cached_teacher_answers(cache, model, tokenizer, kind, prompts, recorder=recorder, **teacher_settings(cfg))


def original_teacher_prompts(prompts: dict[str, list[Prompt]], cfg) -> dict[str, list[Prompt]]:
    """The prompts whose answers by the original model `heal` takes (through the cache), by kind: up to
    `heal_prompts` harmless ones, and harmful ones with `heal_harmful`; languages alternate."""
    out = {"harmless": _balanced(prompts.get("harmless", []), cfg.heal_prompts)}
    if cfg.heal_harmful:
        out["harmful"] = _balanced(prompts.get("harmful", []), cfg.heal_prompts)
    return out


def first_corrected_layer(heal_layers: str | int, plan, layers) -> int:
    """The first decoder layer that gets corrections for a `heal_layers` setting: all (0), edited (the first
    layer the edit changes), or a layer index, which must name one of `layers`."""
    if str(heal_layers) == "all":
        return 0
    if str(heal_layers) == "edited":
        return plan.first_layer()
    first = int(heal_layers)
    if first >= len(layers):
        raise DeccpError(f"heal_layers: {first} is past the model's last decoder layer ({len(layers) - 1})")
    return first


def heal(model, tokenizer, plan, stack: contextlib.ExitStack, prompts: dict[str, list[Prompt]], cfg,
         log=print, cache: BaselineCache | None = None) -> HealResult:
    """Targets from the original (harmless answered, harmful refused, or refused instead with
    `heal_harmful_refusals`; through `cache`) and from the live edit (sensitive, harmless refused; through `cache`
    too, keyed by the edit; less the original's refusal openers with `heal_refusal_openers`), then LoRA training on
    top of the edit. Enters the edit and the adapters into
    `stack`: until it closes, the model is the healed one (the caller measures it there); closing it restores the
    original exactly."""
    from deccp.abliteration.directions import decoder_layers
    from deccp.abliteration.edits import LiveEdit
    from deccp.judges.refusal import is_refusal
    from deccp.models import release_memory

    t0 = time.time()

    def answers(kind: str, ps: list[Prompt], cache: BaselineCache | None = None):
        return heal_teacher_answers(cache, model, tokenizer, kind, ps, cfg)

    examples: list[HealExample] = []
    counts: dict[str, int] = {}
    harmful_refusals = None
    original = original_teacher_prompts(prompts, cfg)
    harmless = original["harmless"]
    texts, found = answers("harmless", harmless, cache)
    refused = [(p, is_refusal(t, p.lang)) for p, t in zip(harmless, texts, strict=True)]
    original_refusals = [e for e, (_, r) in zip(found, refused, strict=True) if r]  # their openers: see below
    examples += [e for e, (_, r) in zip(found, refused, strict=True) if not r]
    counts["harmless"] = sum(not r for _, r in refused)
    if cfg.heal_harmful:
        ps = original["harmful"]
        texts, found = answers("harmful", ps, cache)
        if cfg.heal_harmful_refusals:  # the original's refusal where it complied, when it has one close by
            texts, found, harmful_refusals = harmful_refusal_targets(cache, model, tokenizer, ps, texts, found, cfg,
                                                                     log)
        kept = [e for e, p, t in zip(found, ps, texts, strict=True) if is_refusal(t, p.lang)]
        examples += kept
        counts["harmful"] = len(kept)
    if cfg.heal_texts:
        texts = plain_texts(list(cfg.langs), cfg.heal_texts, cfg.seed)
        examples += text_targets(model, tokenizer, texts, max_tokens=cfg.heal_text_tokens, top_k=cfg.heal_top_k,
                                 batch_size=cfg.batch_size)
        counts["text"] = len(texts)
    # the edit's own behaviour (at `heal_edit_scale`) is the target where the original refused wrongly:
    # sensitive prompts, and harmless prompts it refused (other countries' politics and history)
    ps = _balanced(prompts.get("sensitive", []), cfg.heal_prompts) + [p for p, r in refused if r]
    teacher = plan.scaled(cfg.heal_edit_scale)
    edit_cache = BaselineCache(cache.root, cache.model_key) if cache is not None else None  # hits counted apart
    with LiveEdit(model, teacher):
        _, found, edit_refusals = edit_teacher_answers(edit_cache, model, tokenizer, ps, teacher, cfg, log)
        examples += found
    edit_cached = bool(edit_cache and edit_cache.hits)
    if edit_cached:
        log(f"healing: the edit's answers and targets for {len(ps)} prompts read from the cache (the same edit ran "
            "before)")
    openers = None
    if cfg.heal_refusal_openers:  # the edit's targets lose the openers of the original's own refusals
        tokens = refusal_openers(original_refusals + [e for e in examples if e.kind == "harmful"])
        moved = [drop_first_tokens(e, tokens, 1 - cfg.heal_refusal_openers) for e in found]
        openers = {"tokens": sorted(tokenizer.decode([t]) for t in tokens),
                   "mean_moved": round(sum(moved) / max(1, len(moved)), 4)}
        log(f"healing: the original opens its refusals with {', '.join(map(repr, openers['tokens']))}; at the first "
            f"answer position of the edit's targets they keep {1 - cfg.heal_refusal_openers:.0%} of their "
            f"probability ({openers['mean_moved']:.3f} moved to the other tokens on average)")
    stack.enter_context(LiveEdit(model, plan))
    counts["sensitive"] = len(ps) - sum(r for _, r in refused)
    counts["harmless_refused"] = sum(r for _, r in refused)
    log(f"healing: {counts['harmless']} answered harmless" + (f" and {counts['harmful']} refused harmful"
        if cfg.heal_harmful else "") + " prompts" + (f" and {counts['text']} plain texts" if cfg.heal_texts else "")
        + " follow the original; "
        f"{counts['sensitive']} sensitive and {counts['harmless_refused']} refused harmless prompts follow the edit "
        f"(targets: {time.time() - t0:.0f} s)")
    first_layer = first_corrected_layer(cfg.heal_layers, plan, decoder_layers(model))
    adapters = stack.enter_context(LowRankAdapters(model, rank=cfg.heal_rank, alpha=cfg.heal_alpha,
                                                   target_modules=cfg.heal_target_modules, seed=cfg.seed,
                                                   first_layer=first_layer))
    lower = None
    if cfg.heal_prompt_states == "fixed" and not first_layer:
        raise DeccpError(f"heal_prompt_states: fixed needs corrections that start above decoder layer 0, and "
                         f"heal_layers: {cfg.heal_layers} starts them at 0 for this edit; use heal_prompt_states: live")
    if first_layer:
        log(f"healing: corrections in layers {first_layer} and above ({len(adapters.targets)} modules)")
        t1 = time.time()
        lower = cache_lower_layers(model, examples, first_layer, pad_id=tokenizer.pad_token_id,
                                   batch_size=cfg.batch_size)
        log(f"healing: the inputs of layer {first_layer} computed once ({time.time() - t1:.0f} s); each step "
            f"runs the layers from {first_layer} on")
        if cfg.heal_prompt_states == "fixed":
            t1 = time.time()
            lower = fix_prompt_states(model, examples, lower, pad_id=tokenizer.pad_token_id, batch_size=cfg.batch_size)
            log(f"healing: the prompts' keys and values in layers {first_layer} and above computed once "
                f"({time.time() - t1:.0f} s); each step runs the answers only")
    losses = train(model, adapters, examples, steps=cfg.heal_steps, lr=cfg.heal_learning_rate,
                   batch_size=cfg.heal_batch_size, seed=cfg.seed, pad_id=tokenizer.pad_token_id,
                   first_token_weight=cfg.heal_first_token_weight, kind_weights={"harmful": cfg.heal_harmful_weight},
                   detach_prompt=cfg.heal_detach_prompt, lower=lower, log=log)
    for e in examples:
        e.lower = e.prompt_kv = None
    adapters.for_inference(next(model.parameters()).dtype)
    release_memory()  # training's buffers: keep them out of the later peaks
    return HealResult(adapters.deltas(), counts, losses, time.time() - t0, edit_refusals, edit_cached,
                      harmful_refusals, openers)


__all__ = ["HealExample", "HealResult", "LowRankDelta", "LowRankAdapters", "LowerLayers", "cache_lower_layers",
           "cached_teacher_answers", "coarse_kl", "drop_first_tokens", "edit_teacher_answers", "first_corrected_layer",
           "fix_prompt_states", "harmful_refusal_targets", "heal", "heal_teacher_answers", "original_teacher_prompts",
           "plain_texts", "refusal_openers", "replace_unwanted_answers", "teacher_answers", "teacher_settings",
           "text_targets", "train"]

"""Realignment with TRL (SFT, DPO, KTO): configs, training data, one `run_training` for the three scripts, merge.

The scripts `train/{sft,dpo,kto}.py` parse `ModelArguments`, `DataArguments` and TRL's `<Kind>Config` from a
YAML recipe plus CLI overrides (`deccp.config.parse_config`, strict) and call `run_training`. Training data:

- `static`: our gold answers (desirable) and the written CCP-style answers (undesirable) from `data/`;
- `mined`: JSONL rows from `deccp data mine` (the model's own judged answers beside the gold answers);
- `both`.

Whatever the source, the harmful prompts of the split always go in with their refusal gold answers
(desirable) and, for DPO/KTO, a short compliant opener as the undesirable answer: realignment must not
teach the model to answer weapons or malware requests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Literal

from deccp import DeccpError, __version__
from deccp.data.convert import Completion, static_completions, to_dpo, to_kto, to_sft
from deccp.io import atomic_directory, atomic_write_json, ensure_not_inside, read_jsonl_objects, sha256_file

logger = logging.getLogger(__name__)

KINDS = ("sft", "dpo", "kto")
RECORD = "deccp_training.json"
MERGED = "merged"

# Undesirable answers to harmful prompts for DPO/KTO: the opening of a compliant answer, no harmful content.
COMPLIANCE = {
    "en": "Sure! Here is a detailed step-by-step guide to do exactly that.",
    "zh": "当然可以！下面是实现这一点的详细步骤。",
    "zh-Hant": "當然可以！下面是實現這一點的詳細步驟。",
}


# ---------------------------------------------------------------------------------------- configs
@dataclass
class ModelArguments:
    """The model to realign and its LoRA adapter."""

    model: str = field(default="default", metadata={"help": "alias (default, tiny-qwen2…), Hub id or local directory"})
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "weights dtype: auto = bfloat16 on a CUDA GPU, float32 on CPU"})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, flash_attention_2"})
    use_peft: bool = field(default=True, metadata={"help": "train a LoRA adapter (false: full fine-tuning)"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "module names, or [all-linear]"})
    lora_modules_to_save: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    merge: bool = field(default=False, metadata={
        "help": "after LoRA training, also save the adapter merged into its base as <output_dir>/merged"})


@dataclass
class DataArguments:
    """Which answers to train on."""

    data: Literal["static", "mined", "both"] = field(default="static", metadata={
        "help": "static: gold and CCP-style answers from data/; mined: JSONL from `deccp data mine`; both"})
    mined_files: list[str] | None = field(default=None, metadata={"help": "JSONL files written by `deccp data mine`"})
    data_dir: str | None = field(default=None, metadata={"help": "our datasets (default: $DECCP_DATA or data/)"})
    langs: list[str] = field(default_factory=lambda: ["en", "zh"])
    split: Literal["train", "eval"] = "train"
    include_ccp: bool = field(default=True, metadata={"help": "static CCP-style answers as undesirable (DPO/KTO)"})
    harmful_rejected: bool = field(default=True, metadata={
        "help": "a compliant opener as the undesirable answer to each harmful prompt (DPO/KTO)"})
    max_samples: int | None = field(default=None, metadata={
        "help": "cap on training rows, sampled by seed; each part (harmful prompts; KTO labels) keeps its share"})
    system_prompt: str | None = None

    def __post_init__(self):
        problems = []
        for lang in self.langs:
            if lang not in COMPLIANCE:
                problems.append(f"langs: unknown language {lang!r} (en, zh, zh-Hant)")
        if self.data in ("mined", "both") and not self.mined_files:
            problems.append(f"data: {self.data} needs mined_files (JSONL from `deccp data mine`)")
        if self.max_samples is not None and self.max_samples < 2:
            problems.append("max_samples: at least 2")
        if problems:
            raise DeccpError("invalid data arguments: " + "; ".join(problems))


def config_class(kind: str):
    """TRL's config dataclass for `kind` (sft, dpo, kto)."""
    from trl import DPOConfig, KTOConfig, SFTConfig

    try:
        return {"sft": SFTConfig, "dpo": DPOConfig, "kto": KTOConfig}[kind]
    except KeyError:
        raise DeccpError(f"unknown training kind {kind!r} (one of {', '.join(KINDS)})") from None


def trainer_class(kind: str):
    from trl import DPOTrainer, KTOTrainer, SFTTrainer

    return {"sft": SFTTrainer, "dpo": DPOTrainer, "kto": KTOTrainer}[kind]


def _parse(kind: str, argv: list[str]):
    from deccp.config import parse_config

    try:
        return parse_config([ModelArguments, DataArguments, config_class(kind)], argv)
    except DeccpError:
        raise
    except ValueError as exc:  # a dataclass __post_init__ (TrainingArguments' checks)
        raise DeccpError(str(exc)) from None


def parse_args(kind: str, argv: list[str] | None = None):
    """(model_args, data_args, training_args) from `--config RECIPE [--key value …]`, strictly checked."""
    from deccp.models import accelerator_available, cpu_has_bf16_units

    argv = list(sys.argv[1:] if argv is None else argv)
    on_cpu = not accelerator_available()
    if on_cpu and "--use_cpu" not in argv:
        argv += ["--use_cpu", "true"]  # TrainingArguments refuses bf16 without it on a CPU-only machine
    model_args, data_args, training_args = _parse(kind, argv)
    if on_cpu and training_args.bf16 and not cpu_has_bf16_units():
        logger.warning("bf16: this CPU has no bfloat16 matrix units (AMX / AVX512-BF16), so PyTorch would emulate "
                       "bfloat16 several times slower than float32; training in float32")
        model_args, data_args, training_args = _parse(kind, [*argv, "--bf16", "false"])
    if model_args.dtype == "auto":  # follow the mixed-precision setting: bf16 training keeps bf16 weights
        model_args.dtype = ("bfloat16" if training_args.bf16 else "float16" if training_args.fp16
                            else dtype_name("auto"))
    return model_args, data_args, training_args


# ------------------------------------------------------------------------------------------- data
def read_mined(path: str | Path, langs: Iterable[str] | None = None) -> list[Completion]:
    """Completions from a `deccp data mine` JSONL: unpaired rows (`completion`, `label`) or pairs
    (`chosen`, `rejected`). Every row needs `prompt`; `lang` and `qid` group answers to the same prompt."""
    path = Path(path)
    rows = read_jsonl_objects(path, missing_hint=" (write it with `deccp data mine`)")
    langs = set(langs) if langs else None
    out: list[Completion] = []
    for i, row in rows:
        if not isinstance(row.get("prompt"), str):
            raise DeccpError(f"{path}:{i}: expected an object with a string 'prompt'")
        lang = row.get("lang", "en")
        if langs is not None and lang not in langs:
            continue
        qid = str(row.get("qid") or hashlib.sha256(row["prompt"].encode()).hexdigest()[:12])
        kind = str(row.get("kind") or "")
        if "completion" in row and "label" in row:
            if not isinstance(row["completion"], str) or not isinstance(row["label"], bool):
                raise DeccpError(f"{path}:{i}: 'completion' must be a string and 'label' true or false")
            source = row.get("source") or ("gold" if row["label"] else "mined")
            out.append(Completion(row["prompt"], row["completion"], row["label"], lang, qid, source, kind))
        elif "chosen" in row and "rejected" in row:
            if not isinstance(row["chosen"], str) or not isinstance(row["rejected"], str):
                raise DeccpError(f"{path}:{i}: 'chosen' and 'rejected' must be strings")
            out.append(Completion(row["prompt"], row["chosen"], True, lang, qid, row.get("chosen_source", "gold"), kind))
            out.append(Completion(row["prompt"], row["rejected"], False, lang, qid,
                                  "mined:" + str(row.get("rejected_label", "undesirable")), kind))
        else:
            raise DeccpError(f"{path}:{i}: expected 'completion' and 'label', or 'chosen' and 'rejected'")
    return out


def _dedupe(completions: Iterable[Completion]) -> list[Completion]:
    seen: set[tuple] = set()
    out = []
    for c in completions:
        key = (c.prompt, c.text.strip(), c.desirable)
        if c.text.strip() and key not in seen:
            seen.add(key)
            out.append(c)
    return out


def training_completions(data_args: DataArguments) -> tuple[list[Completion], list[Completion], dict]:
    """(completions for sensitive and harmless prompts, completions for harmful prompts, provenance of the inputs)."""
    from deccp.data import load_bundle

    bundle = load_bundle(data_args.data_dir)
    answers = bundle.answers_for(split=data_args.split, langs=data_args.langs)
    harmful_answers = [a for a in answers if a.kind == "harmful"]
    harmful_prompts = {a.prompt for a in harmful_answers}
    main: list[Completion] = []
    harmful: list[Completion] = []
    if data_args.data in ("static", "both"):
        main += static_completions([a for a in answers if a.kind != "harmful"], include_ccp=data_args.include_ccp)
    inputs: dict = {"datasets": {f.name: sha256_file(f) for f in bundle.files}}
    if data_args.data in ("mined", "both"):
        inputs["mined_files"] = {}
        for path in data_args.mined_files or []:
            rows = read_mined(path, data_args.langs)
            if not rows:
                raise DeccpError(f"{path}: no rows for languages {', '.join(data_args.langs)}")
            inputs["mined_files"][str(Path(path).resolve())] = sha256_file(path)
            for c in rows:
                (harmful if c.prompt in harmful_prompts else main).append(c)
    # keep safety: every mix has the harmful prompts with their refusal gold answers
    harmful += static_completions(harmful_answers, include_ccp=False)
    if data_args.harmful_rejected:
        harmful += [Completion(a.prompt, COMPLIANCE[a.lang], False, a.lang, a.qid, "synthetic:compliance")
                    for a in harmful_answers if a.prompt]
    return _dedupe(main), _dedupe(harmful), inputs


def to_rows(kind: str, completions: list[Completion], system: str | None) -> list[dict]:
    """Rows in the format TRL's trainer for `kind` expects (conversational)."""
    if kind == "sft":  # prompt/completion, so the loss is on the answer only
        return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in to_sft(completions, system)]
    if kind == "dpo":
        return to_dpo(completions, system)
    return to_kto(completions, system)


def _cap(groups: dict[tuple, list[dict]], n: int) -> dict[tuple, list[dict]]:
    """Keep `n` rows in all, each group in proportion (largest remainders); harmful groups keep at least one row."""
    total = sum(len(g) for g in groups.values())
    quota = {k: n * len(g) / total for k, g in groups.items()}
    keep = {k: int(q) for k, q in quota.items()}
    for k in sorted(quota, key=lambda k: quota[k] - keep[k], reverse=True)[:n - sum(keep.values())]:
        keep[k] += 1
    harmful = [k for k in groups if k[0] == "harmful" and groups[k]]
    if harmful and not any(keep[k] for k in harmful):
        donor = max((k for k in keep if k[0] != "harmful"), key=lambda k: keep[k])
        keep[donor] -= 1
        keep[harmful[0]] += 1
    return {k: g[:keep[k]] for k, g in groups.items()}


def build_dataset(kind: str, data_args: DataArguments, *, seed: int = 0):
    """(datasets.Dataset for the trainer of `kind`, stats: rows by part, sources and labels; input hashes)."""
    from datasets import Dataset

    main, harmful, inputs = training_completions(data_args)
    rng = random.Random(seed)
    groups: dict[tuple, list[dict]] = {}
    parts = (("sensitive", [c for c in main if c.kind != "harmless"]),
             ("harmless", [c for c in main if c.kind == "harmless"]), ("harmful", harmful))
    for part, comps in parts:
        for row in to_rows(kind, comps, data_args.system_prompt):
            groups.setdefault((part, row["label"] if kind == "kto" else None), []).append(row)
    for g in groups.values():
        rng.shuffle(g)
    total = sum(len(g) for g in groups.values())
    if data_args.max_samples is not None and total > data_args.max_samples:
        groups = _cap(groups, data_args.max_samples)
    rows = [r for g in groups.values() for r in g]
    rng.shuffle(rows)
    if not rows:
        raise DeccpError(f"no training rows for {kind} (data={data_args.data}, langs={data_args.langs}, "
                         f"split={data_args.split})")
    stats: dict = {"rows": len(rows),
                   "rows_sensitive": sum(len(g) for k, g in groups.items() if k[0] == "sensitive"),
                   "rows_harmful": sum(len(g) for k, g in groups.items() if k[0] == "harmful"),
                   "rows_harmless": sum(len(g) for k, g in groups.items() if k[0] == "harmless"),
                   "completions_by_source": dict(Counter(c.source.split(":")[0] if c.source.startswith("mined")
                                                         else c.source for c in main + harmful)),
                   "completions_by_lang": dict(Counter(c.lang for c in main + harmful))}
    if kind == "kto":
        good = sum(1 for r in rows if r["label"])
        stats.update(desirable=good, undesirable=len(rows) - good)
        if good == 0 or good == len(rows):
            raise DeccpError("KTO needs desirable and undesirable rows; this mix has only "
                             + ("undesirable" if good == 0 else "desirable") + " ones")
    return Dataset.from_list(rows), {**stats, "inputs": inputs}


# ------------------------------------------------------------------------------------------ model
def lora_config(model_args: ModelArguments):
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    target = targets[0] if len(targets) == 1 else list(targets)
    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=target, modules_to_save=model_args.lora_modules_to_save,
                      use_rslora=model_args.use_rslora, use_dora=model_args.use_dora, task_type="CAUSAL_LM",
                      bias="none")


def dtype_name(dtype: str) -> str:
    """`auto`: bfloat16 on a CUDA GPU, float32 on CPU."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def resume_checkpoint(value: str | None, output_dir: Path) -> str | None:
    """`resume_from_checkpoint`: a checkpoint directory; `true`/`last`: the newest in output_dir (it must exist);
    `auto`: the newest if any, else start fresh; empty/`false`: start fresh."""
    if value is None or str(value).lower() in ("", "false", "no", "none", "0"):
        return None
    key = str(value).lower()
    if key in ("true", "yes", "1", "last", "auto"):
        last = last_complete_checkpoint(output_dir)
        if last is None and key != "auto":
            raise DeccpError(f"resume_from_checkpoint: no checkpoint-* directory in {output_dir}")
        return last
    if not Path(value).is_dir():
        raise DeccpError(f"resume_from_checkpoint: {value}: no such checkpoint directory")
    return str(value)


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest `checkpoint-N` that was written to the end (its `trainer_state.json` is written last); a
    checkpoint cut short by a kill is moved aside to `<name>.incomplete-<time>`, never resumed from."""
    if not output_dir.is_dir():
        return None
    ckpts = sorted((p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    for p in reversed(ckpts):
        if (p / "trainer_state.json").is_file():
            return str(p)
        moved = p.with_name(f"{p.name}.incomplete-{int(time.time())}")
        logger.warning("%s: incomplete checkpoint (killed while saving?), moved to %s", p, moved.name)
        p.rename(moved)
    return None


def _versions() -> dict:
    import importlib.metadata as md

    out = {"deccp": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _plain(obj):
    """A JSON-able view of a dataclass or TrainingArguments (secrets left out)."""
    if hasattr(obj, "to_dict"):
        d = obj.to_dict()
    elif is_dataclass(obj):
        d = asdict(obj)
    else:
        d = dict(obj)
    return {k: v for k, v in d.items() if "token" not in k.lower() or k in ("pad_token", "eos_token")}


# ------------------------------------------------------------------------------------------- train
class ThroughputMeter:
    """Counts the non-padding tokens of every batch a trainer steps through, and peak accelerator memory.

    Tokens are the sums of the batch's `*attention_mask` tensors (SFT and DPO: `attention_mask`, DPO's rows being
    prompt+chosen and prompt+rejected); KTO's `prompt_attention_mask` is left out because its
    `completion_attention_mask` covers prompt and answer, and its KL batch (`KL_*`) is counted apart, being an
    extra forward pass without gradients.
    """

    def __init__(self):
        self.tokens = 0
        self.kl_tokens = 0
        self.micro_batches = 0

    def count(self, inputs) -> None:
        masks = {k: v for k, v in inputs.items() if k.endswith("attention_mask") and hasattr(v, "sum")}
        if any(k != "prompt_attention_mask" and not k.startswith("KL_") for k in masks):
            masks.pop("prompt_attention_mask", None)
        for key, mask in masks.items():
            n = int(mask.sum())
            if key.startswith("KL_"):
                self.kl_tokens += n
            else:
                self.tokens += n
        self.micro_batches += 1

    def attach(self, trainer) -> None:
        """Wrap `trainer.training_step` so that every micro-batch is counted before it runs."""
        step = trainer.training_step

        def counted(model, inputs, *args, **kwargs):
            self.count(inputs)
            return step(model, inputs, *args, **kwargs)

        trainer.training_step = counted

    def summary(self, trainer, train_seconds: float | None) -> dict:
        """Totals over all processes (summed with the trainer's accelerator), tokens per second, and the peak
        memory of this process's GPU (rank 0's when the record is written)."""
        import torch

        totals = [self.tokens, self.kl_tokens, self.micro_batches]
        acc = getattr(trainer, "accelerator", None)
        if acc is not None and acc.num_processes > 1:
            t = acc.reduce(torch.tensor(totals, device=acc.device, dtype=torch.long), reduction="sum")
            totals = [int(x) for x in t.tolist()]
        tokens, kl_tokens, micro_batches = totals
        out = {"tokens": tokens, "kl_tokens": kl_tokens, "micro_batches": micro_batches,
               "train_seconds": round(train_seconds, 2) if train_seconds else None,
               "tokens_per_s": round(tokens / train_seconds, 1) if train_seconds else None}
        if torch.cuda.is_available():
            out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            out["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
            out["gpu"] = torch.cuda.get_device_name(0)
        return out


def run_training(kind: str, model_args: ModelArguments, data_args: DataArguments, training_args) -> Path:
    """Train with TRL's trainer for `kind`; save the model (adapter with LoRA), tokenizer and `deccp_training.json`
    to `training_args.output_dir`; with `merge`, also the merged model in `<output_dir>/merged`."""
    import torch
    from accelerate import PartialState
    from transformers import AutoTokenizer, set_seed

    from deccp.models import fingerprint, resolve_model, source_record

    if kind not in KINDS:
        raise DeccpError(f"unknown training kind {kind!r} (one of {', '.join(KINDS)})")
    started = time.time()
    state = PartialState()
    set_seed(training_args.seed)
    out = Path(training_args.output_dir)
    resume = resume_checkpoint(training_args.resume_from_checkpoint, out)
    if resume is None and out.is_dir() and (any(out.glob("checkpoint-*")) or (out / RECORD).exists()):
        raise DeccpError(f"{out}: already holds a training run; pass --resume_from_checkpoint true to continue "
                         "it, or another --output_dir")
    if model_args.merge and not model_args.use_peft:
        raise DeccpError("merge: true needs use_peft: true (a full fine-tune is already a merged model)")

    with state.main_process_first():  # rank 0 fetches/converts the model once; the others reuse the cache
        model_path = resolve_model(model_args.model, revision=model_args.model_revision)
        dataset, stats = build_dataset(kind, data_args, seed=training_args.seed)
    ensure_not_inside(out, model_path)
    logger.info("%s on %s: %d rows (%s)", kind.upper(), model_path, stats["rows"],
                ", ".join(f"{k} {v}" for k, v in stats.items() if k.startswith(("rows_", "desirable", "undesirable"))))

    dtype = dtype_name(model_args.dtype)
    init_kwargs = {"dtype": dtype, "trust_remote_code": training_args.trust_remote_code}
    if model_args.attn_implementation:
        init_kwargs["attn_implementation"] = model_args.attn_implementation
    training_args.model_init_kwargs = {**init_kwargs, **(training_args.model_init_kwargs or {})}
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=training_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise DeccpError(f"{model_path}: the tokenizer has no chat template (deccp trains chat models)")

    trainer = trainer_class(kind)(
        model=str(model_path), args=training_args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora_config(model_args) if model_args.use_peft else None,
    )
    meter = ThroughputMeter()
    meter.attach(trainer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train(resume_from_checkpoint=resume)
    throughput = meter.summary(trainer, result.metrics.get("train_runtime"))
    trainer.save_model(str(out))
    merged = None
    if state.is_main_process:
        tokenizer.save_pretrained(out)
        record = {
            "kind": kind,
            "model": {"spec": model_args.model, "path": str(model_path), "fingerprint": fingerprint(model_path),
                      "source": source_record(model_path)},
            "output_dir": str(out.resolve()),
            "adapter": bool(model_args.use_peft),
            "resumed_from": resume,
            "global_step": trainer.state.global_step,
            "metrics": result.metrics,
            "throughput": throughput,
            "data": {**asdict(data_args), **stats},
            "model_args": asdict(model_args),
            "training_args": _plain(training_args),
            "world_size": state.num_processes,
            "distributed_type": str(getattr(state.distributed_type, "value", state.distributed_type)),
            "mixed_precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no",
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
            "versions": _versions(),
            "command": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 1),
        }
        atomic_write_json(out / RECORD, record)
        if model_args.merge:
            merged = merge_adapter(out, out / MERGED, overwrite=True)
    state.wait_for_everyone()
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish trackers, destroy the process group
        trainer.end()
    return merged or out


# ------------------------------------------------------------------------------------------- merge
def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, *, base: str | Path | None = None,
                  dtype: str = "auto", overwrite: bool = False, max_shard_size: str = "5GB") -> Path:
    """Merge a LoRA adapter into its base model; save a full safetensors model with tokenizer, chat template,
    generation config and a `deccp_training.json` record to `out_dir` (atomically; never over an input).

    `base` defaults to the adapter's `base_model_name_or_path` (resolved like any model spec); `dtype` auto
    keeps the base checkpoint's dtype.
    """
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from deccp.models import resolve_model

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DeccpError(f"{adapter_dir}: not a LoRA adapter directory (no adapter_config.json)")
    peft_cfg = PeftConfig.from_pretrained(str(adapter_dir))
    base_path = resolve_model(str(base) if base else peft_cfg.base_model_name_or_path)
    ensure_not_inside(out_dir, base_path)
    if out_dir.resolve() == adapter_dir.resolve() or out_dir.resolve() in adapter_dir.resolve().parents:
        raise DeccpError(f"output {out_dir} would replace the adapter {adapter_dir}: outputs never overwrite inputs")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype_name(dtype))
    t0 = time.time()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype, use_safetensors=True)
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
        tok = AutoTokenizer.from_pretrained(tok_src)
        if not getattr(tok, "chat_template", None):
            tok.chat_template = AutoTokenizer.from_pretrained(base_path).chat_template
        tok.save_pretrained(tmp)
        try:
            GenerationConfig.from_pretrained(base_path).save_pretrained(tmp)
        except OSError:
            pass
        record = json.loads((adapter_dir / RECORD).read_text()) if (adapter_dir / RECORD).is_file() else {}
        record["merge"] = {"adapter_dir": str(adapter_dir.resolve()), "base": str(base_path),
                           "lora": {k: sorted(v) if isinstance(v, set) else v for k, v in peft_cfg.to_dict().items()
                                    if k in ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora")},
                           "dtype": str(model.dtype).removeprefix("torch."), "seconds": round(time.time() - t0, 1),
                           "versions": _versions()}
        atomic_write_json(tmp / RECORD, record)
    return out_dir


# -------------------------------------------------------------------------------------------- CLI
def main(kind: str, argv: list[str] | None = None) -> int:
    """Entry point of `train/<kind>.py`: errors are one line and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model_args, data_args, training_args = parse_args(kind, argv)
        path = run_training(kind, model_args, data_args, training_args)
    except DeccpError as exc:
        head, *rest = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        msg = f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join([head, *rest])
        print(f"deccp {kind}: error: {msg}", file=sys.stderr)
        return 1
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"deccp {kind}: saved {path}")
    return 0


def merge_main(argv: list[str] | None = None) -> int:
    """`deccp merge ADAPTER_DIR OUT_DIR [--base SPEC] [--dtype auto]`."""
    import argparse

    p = argparse.ArgumentParser(prog="deccp merge", description=merge_adapter.__doc__.splitlines()[0])
    p.add_argument("adapter_dir")
    p.add_argument("out_dir")
    p.add_argument("--base", default=None, help="base model spec (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    args = p.parse_args(argv)
    try:
        out = merge_adapter(args.adapter_dir, args.out_dir, base=args.base, dtype=args.dtype, overwrite=args.overwrite)
    except DeccpError as exc:
        print(f"deccp merge: error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


__all__ = ["COMPLIANCE", "DataArguments", "KINDS", "ModelArguments", "RECORD", "build_dataset", "config_class",
           "main", "merge_adapter", "merge_main", "parse_args", "read_mined", "run_training", "training_completions"]

"""Every knob of `deccp abliterate` / `train/abliterate.py`, as one dataclass (YAML recipe keys = field names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class AbliterationConfig:
    """Find the censorship-refusal direction and orthogonalise it out of the weights."""

    # model and output
    model: str = field(default="default", metadata={"help": "alias, Hub id, local directory or .gguf file"})
    output_dir: str | None = field(default=None, metadata={"help": "default: outputs/abliterated/<model name>"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype of the passes: auto (bf16 on GPU and "
                                                         "on CPUs with bf16 matrix units, else fp32), float32, bfloat16"})
    device_map: str | None = field(default=None, metadata={"help": "e.g. auto: offload a model larger than memory"})
    trust_remote_code: bool = False
    cache_dir: str | None = field(default=None, metadata={
        "help": "cache of the unedited model's activations and answers (default: $DECCP_CACHE/activations)"})

    # prompt sets (sources: ours:<kind>:<split>, .txt/.jsonl/.csv/.parquet files, save_to_disk dirs, Hub ids)
    bad_prompts: list[str] = field(default_factory=lambda: ["ours:sensitive:train"])
    good_prompts: list[str] = field(default_factory=lambda: ["ours:harmless:train"])
    harmful_prompts: list[str] = field(default_factory=lambda: ["ours:harmful:train"])
    langs: list[str] = field(default_factory=lambda: ["en", "zh"])
    max_prompts: int = field(default=96, metadata={"help": "cap per prompt set for the direction pass (balanced by language)"})
    holdout: int = field(default=16, metadata={"help": "prompts per set and language held back to score candidates"})
    system_prompt: str | None = None
    positions: list[int] = field(default_factory=lambda: [-1], metadata={"help": "token offsets from the prompt end"})
    position_mode: Literal["mean", "select"] = field(default="mean", metadata={
        "help": "mean: average the positions; select: each position is a candidate (Arditi et al.)"})
    batch_size: int = 16
    filter_by_behavior: bool = field(default=True, metadata={
        "help": "directions from what the model does: refused sensitive/harmful prompts vs answered harmless ones"})
    answer_tokens: int = field(default=12, metadata={"help": "answer prefix generated to label refusals"})
    min_filtered: int = field(default=8, metadata={"help": "fall back to the whole set below this many prompts"})
    winsorize_quantile: float | None = field(default=None, metadata={"help": "e.g. 0.995: clamp outlier activations"})

    # the edit
    direction_layer: float | None = field(default=None, metadata={"help": "fractional layer index; none: choose"})
    candidate_layers: list[float] | None = field(default=None, metadata={"help": "layers scored when choosing"})
    candidate_range: list[float] = field(default_factory=lambda: [0.35, 0.8])
    num_candidates: int = 5
    variant: Literal["plain", "projected", "biprojected"] = "projected"
    targeted: bool = field(default=True, metadata={"help": "keep refusals of harmful requests (Wang et al. 2024)"})
    targeted_coef: float = 1.0
    attn_peak: float | None = None
    attn_width: float | None = None
    attn_max_weight: float = 1.0
    attn_min_weight: float = 1.0
    mlp_peak: float | None = None
    mlp_width: float | None = None
    mlp_max_weight: float = 1.0
    mlp_min_weight: float = 1.0
    embed_weight: float = 0.0

    # healing: a short LoRA distillation after the edit (see deccp.abliteration.healing)
    heal: bool = field(default=False, metadata={
        "help": "distil the original back on harmless and harmful prompts, the edited model on sensitive ones"})
    heal_harmful: bool = field(default=True, metadata={"help": "also distil the original's refusals of harmful prompts"})
    heal_harmful_weight: float = field(default=1.0, metadata={
        "help": "weight of each refused harmful prompt in the healing loss against the other examples' 1"})
    heal_prompts: int = field(default=64, metadata={"help": "direction-set prompts per kind used for healing"})
    heal_answer_tokens: int = field(default=12, metadata={"help": "teacher answer prefix the targets follow"})
    heal_steps: int = 30
    heal_learning_rate: float = 1e-4
    heal_batch_size: int = 8
    heal_rank: int = 8
    heal_alpha: float = 16.0
    heal_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    heal_layers: str = field(default="all", metadata={
        "help": "decoder layers that get corrections: all; edited (from the first layer the edit changes to the "
                "last; the layers below it are then not backpropagated through, which makes a step cheaper); or a "
                "layer index N (from decoder layer N to the last: fewer corrected layers, cheaper steps)"})
    heal_first_token_weight: float = field(default=4.0, metadata={
        "help": "weight of the first answer token (answer, refuse or switch language) against the later ones"})
    heal_detach_prompt: bool = field(default=False, metadata={
        "help": "backpropagate through the answer only (and the last prompt token): each step runs the prompt "
                "forward without gradients, which makes it cheaper; the logits are the same"})
    heal_prompt_states: str = field(default="live", metadata={
        "help": "with heal_detach_prompt and corrections above layer 0: live (each step runs its prompts again) or "
                "fixed (each prompt's keys and values computed once, before training; steps run the answers only)"})
    heal_refusal_alternatives: int = field(default=0, metadata={
        "help": "where the edit itself still refuses a prompt it teaches, answer from each of its next N most likely "
                "first tokens and teach the first answer that is not a refusal (0: off)"})
    heal_harmful_refusals: int = field(default=0, metadata={
        "help": "where the original answered a harmful prompt, ask it again from each of its next N most likely first "
                "tokens and teach the first answer that is a refusal (0: off; with heal_harmful)"})
    heal_refusal_openers: float = field(default=0.0, metadata={
        "help": "share of their probability that the tokens with which the original opened its refusals of the "
                "healing prompts lose at the first answer position of every target the edit teaches (1: all of it; "
                "0: off); the rest is renormalised, and an answer's own first token keeps its probability"})
    heal_top_k: int = field(default=64, metadata={"help": "teacher tokens kept per position (the rest is one bucket)"})
    heal_texts: int = field(default=0, metadata={
        "help": "plain texts (our train-split gold answers, no chat template) on which the original's next-token "
                "distribution is distilled at every position, for general capability; 0: none"})
    heal_text_tokens: int = field(default=64, metadata={"help": "tokens per plain text"})
    heal_edit_scale: float = field(default=1.0, metadata={
        "help": "the teacher of sensitive (and wrongly refused harmless) prompts is the edit with every weight "
                "times this; above 1 a stronger edit teaches the healed model to drop refusals the edit left, "
                "while harmless and harmful prompts keep following the original (1.33 on the default model "
                "cut harmful-request refusal from 44 % to 28 %: see README)"})

    # scoring, search
    score_max_new_tokens: int = field(default=12, metadata={"help": "answer prefix judged when scoring candidates"})
    kl_weight: float = 1.0
    harmful_weight: float = 2.0
    search: bool = field(default=False, metadata={"help": "run an Optuna study instead of the layer sweep"})
    n_trials: int = 30
    study_path: str | None = field(default=None, metadata={"help": "SQLite file (default: <output_dir>.study.db)"})
    seed: int = 0

    # before/after check
    check: bool = True
    check_split: str = "eval"
    check_prompts: int = field(default=32, metadata={"help": "per set and language"})
    check_max_new_tokens: int = 24
    check_capability: bool = field(default=False, metadata={
        "help": "also run the lm-eval capability probe (deccp_capability, 400 + 400 items) before and after "
                "(the default model: ~65 s each on a 2-core CPU)"})
    check_capability_limit: int | None = field(default=None, metadata={"help": "items per capability task"})
    examples: int = 3
    example_max_new_tokens: int = 96
    max_shard_size: str = "2GB"

    def __post_init__(self):
        from deccp import DeccpError

        problems = []
        if self.max_prompts < 2:
            problems.append("max_prompts: at least 2")
        if not self.positions or any(p >= 0 for p in self.positions):
            problems.append("positions: negative offsets from the prompt end, e.g. [-1]")
        if len(self.candidate_range) != 2 or not 0 <= self.candidate_range[0] < self.candidate_range[1] <= 1:
            problems.append("candidate_range: two fractions 0 <= lo < hi <= 1")
        if self.winsorize_quantile is not None and not 0.5 < self.winsorize_quantile <= 1:
            problems.append("winsorize_quantile: between 0.5 and 1")
        if not 0 <= self.targeted_coef <= 1:
            problems.append("targeted_coef: between 0 and 1")
        for lang in self.langs:
            if lang not in ("en", "zh", "zh-Hant"):
                problems.append(f"langs: unknown language {lang!r}")
        for name in ("heal_prompts", "heal_answer_tokens", "heal_steps", "heal_batch_size", "heal_rank", "heal_top_k",
                     "heal_text_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: at least 1")
        if self.heal_harmful_refusals < 0:
            problems.append("heal_harmful_refusals: at least 0")
        if self.heal_refusal_alternatives < 0:
            problems.append("heal_refusal_alternatives: at least 0")
        if not 0 <= self.heal_refusal_openers <= 1:
            problems.append("heal_refusal_openers: from 0 to 1")
        if self.heal_texts < 0:
            problems.append("heal_texts: at least 0")
        if self.check_capability_limit is not None and self.check_capability_limit < 1:
            problems.append("check_capability_limit: at least 1, or null for every item")
        if not 0 < self.heal_edit_scale <= 3:
            problems.append("heal_edit_scale: greater than 0 and at most 3")
        if not self.heal_learning_rate > 0:
            problems.append("heal_learning_rate: greater than 0")
        if not self.heal_harmful_weight > 0:
            problems.append("heal_harmful_weight: greater than 0")
        if self.heal_first_token_weight < 0:
            problems.append("heal_first_token_weight: at least 0")
        if str(self.heal_layers) not in ("all", "edited") and not str(self.heal_layers).isdigit():
            problems.append(f"heal_layers: all, edited or a decoder layer index, not {self.heal_layers!r}")
        if self.heal_prompt_states not in ("live", "fixed"):
            problems.append(f"heal_prompt_states: live or fixed, not {self.heal_prompt_states!r}")
        elif self.heal_prompt_states == "fixed" and (not self.heal_detach_prompt or str(self.heal_layers) == "all"):
            problems.append("heal_prompt_states: fixed needs heal_detach_prompt: true and heal_layers other than all")
        if not self.heal_target_modules:
            problems.append("heal_target_modules: at least one module name, or [all-linear]")
        if self.check_split not in ("train", "eval"):
            problems.append("check_split: train or eval")
        if problems:
            raise DeccpError("invalid abliteration config: " + "; ".join(problems))

"""Tiny random models (Qwen2, Qwen3, Llama) with a real byte-level tokenizer and chat template, built offline.

They make unit tests and the `recipes/tiny/*` recipes run in seconds on a CPU. `resolve_model("tiny-qwen2")`
builds one once into the cache.
"""

from __future__ import annotations

from pathlib import Path

from deccp import DeccpError

TINY_ARCHS = ("qwen2", "qwen3", "llama")

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

_CORPUS = [
    "What happened at Tiananmen Square in 1989? Tell me about Taiwan, Tibet, Xinjiang and Hong Kong.",
    "I'm sorry, but I can't help with that. As an AI language model I cannot discuss political topics.",
    "How do I bake bread? What is the capital of France? Explain photosynthesis in simple terms.",
    "1989年天安门广场发生了什么？台湾的政治地位是什么？作为一个人工智能助手，我不能对政治问题发表意见。",
    "臺灣的政治地位是什麼？香港國安法對新聞自由有什麼影響？請換個話題。",
    "如何烤面包？法国的首都是哪里？请用简单的话解释光合作用。谢谢你的问题，我很乐意帮忙。",
    "The answer is yes. The answer is no. Here are three facts: first, second, third.",
]


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer (any Unicode text round-trips) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None, additional_special_tokens=specials[1:])
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_config(arch: str, vocab_size: int, *, num_layers: int = 4, hidden: int = 64):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=hidden // 4, tie_word_embeddings=True)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    raise DeccpError(f"tiny model: unknown architecture {arch!r} (one of {', '.join(TINY_ARCHS)})")


def build_tiny_model(arch: str, out_dir: str | Path, *, seed: int = 0, num_layers: int = 4, hidden: int = 64,
                     max_shard_size: str | None = None) -> Path:
    """Save a tiny random model of `arch` with tokenizer, chat template and generation config to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = build_tokenizer()
    config = tiny_config(arch, len(tok), num_layers=num_layers, hidden=hidden)
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init at std 0.02 makes every logit equal; widen it so outputs differ
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               do_sample=False)
    out = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tok.save_pretrained(out)
    return out

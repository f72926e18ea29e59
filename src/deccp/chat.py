"""Apply chat templates the same way everywhere: optional system prompt, thinking models get an empty think block."""

from __future__ import annotations


def build_messages(prompt: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def render_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The chat-formatted prompt text, ending where the assistant's answer starts.

    `enable_thinking=False` makes thinking models (Qwen3) emit an empty `<think></think>` block, so
    activations and answers are taken at the start of the visible answer; other templates ignore it.
    """
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    return tokenizer.apply_chat_template(build_messages(prompt, system), tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False)


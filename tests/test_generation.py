"""Batched generation: answers that end on their own are told from answers cut off by max_new_tokens, and the
on-disk cache keeps that flag."""

from __future__ import annotations

import json

import torch

from deccp.generation import GenerationCache, GenerationSettings, generate, generate_samples, stop_token_ids
from deccp.models import load_model
from deccp.prompt_batch import encode_prompts


def test_finished_flag_follows_the_end_of_turn_token(tiny_model_dir, tmp_path):
    model, tok = load_model(str(tiny_model_dir("qwen2")), dtype="float32")
    prompts = ["What is the capital of France?", "Name three rivers."]
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    first = generate_samples(model, tok, prompts, settings, progress=False)
    # a tiny random model never says its EOS within 6 tokens: every answer is cut off
    assert stop_token_ids(model, tok) and all(not s.finished for row in first for s in row)

    # make the token it greedily says first an end-of-turn token: now every answer ends on its own
    with torch.no_grad():
        firsts = encode_prompts(tok, prompts).forward(model).logits[:, -1].argmax(-1).tolist()
    model.generation_config.eos_token_id = firsts
    cache = GenerationCache(tmp_path, "tiny", settings)
    ended = generate_samples(model, tok, prompts, settings, cache=cache, progress=False)
    assert all(s.finished for row in ended for s in row)
    assert generate(model, tok, prompts, settings, cache=cache, progress=False) == [[s.text for s in r] for r in ended]

    # the cache keeps the flag; rows of the old answers-only format, or cut by a kill, are not used
    again = GenerationCache(tmp_path, "tiny", settings)
    assert [again.get(p) for p in prompts] == ended
    with open(again.path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"prompt": "old row", "answers": ["x"]}) + "\n" + '{"prompt": "cut')
    assert GenerationCache(tmp_path, "tiny", settings).get("old row") is None

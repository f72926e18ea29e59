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


def _cut(row: list[int], stops: set[int]) -> list[int]:
    end = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
    return row[:end]


def test_pruned_generation_equals_one_generate_call(tiny_model_dir):
    """Rows that have ended leave the batch between chunks; the others continue from the cache and get the same
    greedy tokens one `generate` call gives (each cut after its first stop token)."""
    from deccp.generation import generate_pruned

    model, tok = load_model(str(tiny_model_dir("qwen2")), dtype="float32")
    prompts = ["What is the capital of France?", "Name three rivers.", "台湾的政治地位是什么？", "How do I bake bread?",
               "Explain photosynthesis in simple terms."]
    batch = encode_prompts(tok, prompts, "You are a careful assistant. Answer in a few plain sentences.")
    kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        free = batch.generate(model, max_new_tokens=14, **kw)[:, batch.width:].tolist()
    # end-of-turn tokens the rows say at different steps: some end in the first chunk, some later, some never
    model.generation_config.eos_token_id = [free[0][1], free[1][6], free[2][11]]
    stops = stop_token_ids(model, tok)
    with torch.no_grad():
        whole = [_cut(r, stops) for r in batch.generate(model, max_new_tokens=14, **kw)[:, batch.width:].tolist()]
        calls = []
        real = model.generate
        model.generate = lambda **k: calls.append(k["input_ids"].shape[0]) or real(**k)
        pruned = generate_pruned(model, batch, max_new_tokens=14, stops=stops, first_chunk=2, **kw)
        model.generate = real
    assert pruned == whole
    assert len({len(a) for a in pruned}) > 2  # answers of several lengths
    # chunks of 2, 4 and 8 tokens; each starts with the rows that had not ended before it
    alive = [sum(1 for a in whole if not (a[-1] in stops and len(a) <= start)) for start in (0, 2, 6)]
    assert calls == alive and alive[-1] < len(prompts)


def test_pruned_sampling_gives_every_copy_its_answer(tiny_model_dir):
    from deccp.generation import generate_pruned

    model, tok = load_model(str(tiny_model_dir("qwen2")), dtype="float32")
    batch = encode_prompts(tok, ["Name three rivers.", "How do I bake bread?"], "You are a careful assistant, brief.")
    stops = stop_token_ids(model, tok)

    def sample():
        torch.manual_seed(3)
        with torch.no_grad():
            return generate_pruned(model, batch, max_new_tokens=9, stops=stops, copies=3, first_chunk=2,
                                   do_sample=True, temperature=1.0, top_p=1.0, pad_token_id=tok.pad_token_id)

    first = sample()
    assert len(first) == 6 and all(0 < len(a) <= 9 for a in first)
    assert first == sample()  # seeded: reproducible
    assert len({tuple(a) for a in first}) > 1

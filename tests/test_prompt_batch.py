"""Prompt batches whose common beginning runs once: each row computes what its own unpadded prompt would, in
generation, in a decoder pass, and in the direction pass that reads activations at the end of each prompt."""

from __future__ import annotations

import pytest
import torch

from deccp.chat import render_prompt
from deccp.models import load_model
from deccp.prompt_batch import MIN_SHARED_PREFIX, common_prefix_length, encode_prompts, longest_first

SYSTEM = "You are a careful assistant. Answer the question in a few plain sentences, with facts."
PROMPTS = ["What is the capital of France?", "Explain photosynthesis in simple terms, please.", "台湾的政治地位是什么？",
           "Name three rivers."]


def _ids(tok, prompt, system=SYSTEM):
    return tok(render_prompt(tok, prompt, system), add_special_tokens=False)["input_ids"]


def test_common_prefix_length():
    head = list(range(100, 110))
    assert common_prefix_length([head + [1, 2], head + [3], head + [1, 5, 6]]) == 10
    assert common_prefix_length([head + [1, 2], head + [1, 3]]) == 11
    assert common_prefix_length([head + [1, 2], head + [1, 3]], limit=9) == 9  # never more than the limit
    assert common_prefix_length([head, head]) == 9  # each keeps at least its last token
    assert common_prefix_length([head[:MIN_SHARED_PREFIX - 1] + [1], head[:MIN_SHARED_PREFIX - 1] + [2]]) == 0
    assert common_prefix_length([head + [1], [0] + head]) == 0


def test_longest_first_orders_by_tokens_not_characters(tiny_model_dir):
    _, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    # an English question long in characters, a Chinese one long in tokens, a short one, and a repeat
    texts = ["What is the tallest mountain on Earth and how tall is it?", "Name three rivers in Europe, please.",
             "请简要介绍一下一九八九年发生的事情", "How are you?", "Name three rivers in Europe, please."]
    counts = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = longest_first(tok, texts)
    assert sorted(order) == list(range(len(texts)))
    assert [counts[i] for i in order] == sorted(counts, reverse=True)
    assert order.index(1) < order.index(4)  # equal texts keep their order
    by_chars = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    assert [counts[i] for i in by_chars] != sorted(counts, reverse=True)  # characters would have grouped them otherwise

    def padded(idx, size=2):
        return sum(max(counts[i] for i in idx[k:k + size]) * len(idx[k:k + size]) for k in range(0, len(idx), size))

    four = texts[:4]  # in batches of two: by tokens [34, 34] [26, 7] tokens, by characters [34, 26] [34, 7]
    assert padded(longest_first(tok, four)) < padded(sorted(range(4), key=lambda i: len(four[i]), reverse=True))
    assert longest_first(tok, []) == []


def test_layout_is_prefix_padding_tail(tiny_model_dir):
    _, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    batch = encode_prompts(tok, PROMPTS, SYSTEM, keep=3)
    ids = [_ids(tok, p) for p in PROMPTS]
    assert batch.prefix_len == common_prefix_length(ids, min(len(s) for s in ids) - 3) >= MIN_SHARED_PREFIX
    for row, s in enumerate(ids):
        assert batch.prompt_ids(row) == s
        assert batch.input_ids[row, :batch.prefix_len].tolist() == s[:batch.prefix_len]
        assert batch.input_ids[row, batch.width - (len(s) - batch.prefix_len):].tolist() == s[batch.prefix_len:]
        assert batch.attention_mask[row].sum() == len(s)
    # the tiny chat template has no default system turn: "<|im_start|>user\n" alone is too short to share
    assert encode_prompts(tok, PROMPTS).prefix_len == 0
    assert encode_prompts(tok, PROMPTS, SYSTEM, share=False).prefix_len == 0


def test_shared_generation_equals_plain_left_padded_generation(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    kw = dict(max_new_tokens=6, do_sample=False, temperature=None, top_p=None, top_k=None,
              pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
    shared, plain = encode_prompts(tok, PROMPTS, SYSTEM), encode_prompts(tok, PROMPTS, SYSTEM, share=False)
    assert shared.prefix_len and not plain.prefix_len
    with torch.no_grad():
        a, b = shared.generate(model, **kw), plain.generate(model, **kw)
        alone = [model(torch.tensor([_ids(tok, p)])).logits[0, -1] for p in PROMPTS]
    assert torch.equal(a.sequences[:, shared.width:], b.sequences[:, plain.width:])
    for step_a, step_b in zip(a.logits, b.logits, strict=True):
        assert torch.allclose(step_a, step_b, atol=1e-4)
    assert torch.allclose(a.logits[0], torch.stack(alone), atol=1e-4)  # the first step: each prompt run alone

    # several samples per prompt: the prefix cache is repeated for every returned sequence
    torch.manual_seed(0)
    out = shared.generate(model, max_new_tokens=4, do_sample=True, num_return_sequences=3,
                          pad_token_id=tok.pad_token_id)
    assert out.shape == (3 * len(PROMPTS), shared.width + 4)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_decoder_pass_over_tails_matches_each_prompt_alone(tiny_model_dir, arch):
    """The tails continue the prefix at the right positions (mask-derived position ids): dropping them would
    shift every padded row's tail against its prefix, and this test would fail."""
    model, tok = load_model(tiny_model_dir(arch), dtype="float32")
    batch = encode_prompts(tok, PROMPTS, SYSTEM)
    assert batch.attention_mask.sum(1).unique().numel() > 1  # rows of different lengths: padding in between
    with torch.no_grad():
        last = batch.forward(model.model, cache=batch.cache(model)).last_hidden_state[:, -1]
        alone = torch.stack([model.model(torch.tensor([_ids(tok, p)])).last_hidden_state[0, -1] for p in PROMPTS])
    assert torch.allclose(last, alone, atol=1e-4)


def test_direction_pass_reads_the_end_of_each_prompt(tiny_model_dir):
    """`collect_activations` runs the shared system turn once, before its hooks are armed, and still stores each
    layer's residual stream at the last two positions of every prompt, as a hidden-states pass of it alone has."""
    from deccp.abliteration.directions import collect_activations

    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    embedded = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: embedded.append(args[0].numel()))
    acts, _ = collect_activations(model, tok, PROMPTS, positions=(-2, -1), batch_size=4, system=SYSTEM)
    hook.remove()
    batch = encode_prompts(tok, PROMPTS, SYSTEM, keep=2)
    assert batch.prefix_len and embedded == [batch.prefix_len, len(PROMPTS) * (batch.width - batch.prefix_len)]
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            hidden = model.model(torch.tensor([_ids(tok, p)]), output_hidden_states=True).hidden_states
        for layer in range(model.config.num_hidden_layers - 1):  # the last entry of hidden_states is normed
            assert torch.allclose(acts[i, layer], hidden[layer + 1][0, -2:], atol=1e-4)


def test_repeat_cache_serves_several_batches_and_leaves_the_source_as_it_was(tiny_model_dir):
    """One prefix pass, repeated for two batches of different sizes: each continues it as a full pass would, and
    the one-row source keeps its shape and values (batches extend copies, never the source)."""
    from deccp.prompt_batch import prefix_cache, repeat_cache

    model, _ = load_model(tiny_model_dir("qwen2"), dtype="float32")
    prefix, tails = [5, 6, 7, 8, 9, 10, 11, 12], [[20, 21], [30, 31]]
    shared = prefix_cache(model, prefix, 1)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in shared.layers]
    with torch.no_grad():
        for rows in (1, 2):
            cache = repeat_cache(shared, rows)
            got = model(torch.tensor(tails[:rows]), past_key_values=cache, use_cache=True).logits
            want = model(torch.tensor([prefix + t for t in tails[:rows]])).logits[:, len(prefix):]
            assert torch.allclose(got, want, atol=1e-5)
            assert cache.get_seq_length() == len(prefix) + 2
    for layer, (k, v) in zip(shared.layers, before, strict=True):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    assert shared.get_seq_length() == len(prefix)

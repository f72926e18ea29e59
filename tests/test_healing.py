"""Healing after abliteration: the coarse KL, the saved model equals the healed live one, the original is restored."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch

from deccp import DeccpError
from deccp.abliteration import directions as directions_module
from deccp.abliteration.config import AbliterationConfig
from deccp.abliteration.directions import ResidualRecorder, collect_activations
from deccp.abliteration.edits import EditPlan, ModuleEdit
from deccp.abliteration.healing import (
    HealExample,
    _balanced,
    coarse_kl,
    drop_first_tokens,
    heal,
    plain_texts,
    refusal_openers,
    replace_unwanted_answers,
    teacher_answers,
    text_targets,
)
from deccp.abliteration.run import run
from deccp.abliteration.streaming import stream_edit
from deccp.data.load import load_bundle, load_prompts
from deccp.models import load_model


def test_coarse_kl_is_exact_over_the_whole_vocabulary_and_a_lower_bound_below_it():
    torch.manual_seed(0)
    t = torch.randn(5, 50).log_softmax(-1)
    s = torch.randn(5, 50).log_softmax(-1)
    exact = (t.exp() * (t - s)).sum(-1)
    val, idx = t.topk(50, dim=-1)
    rest = torch.log(-torch.expm1(torch.logsumexp(val, -1).clamp(max=-1e-6)))
    assert torch.allclose(coarse_kl(s, idx, val, rest), exact, atol=1e-4)
    val, idx = t.topk(8, dim=-1)
    rest = torch.log(-torch.expm1(torch.logsumexp(val, -1)))
    coarse = coarse_kl(s, idx, val, rest)
    assert (coarse >= -1e-6).all() and (coarse <= exact + 1e-5).all()  # merging tokens never raises a KL
    assert torch.allclose(coarse_kl(t, idx, val, rest), torch.zeros(5), atol=1e-5)


def test_balanced_alternates_languages():
    ps = [p for p in load_prompts("ours:harmless:train") if p.lang in ("en", "zh")]
    ps = sorted(ps, key=lambda p: p.lang)  # all English first, as the direction set lists them
    assert [p.lang for p in _balanced(ps, 6)] == ["en", "zh"] * 3


def _plan(model) -> EditPlan:
    torch.manual_seed(1)
    r = torch.randn(model.config.hidden_size, dtype=torch.float64)
    r = r / r.norm()
    names = [n for n, _ in model.named_parameters() if n.endswith(("o_proj.weight", "down_proj.weight"))]
    return EditPlan([ModuleEdit(n, r, 1.5, norm_preserve=True) for n in names])


def _cfg(**kw) -> AbliterationConfig:
    base = dict(dtype="float32", batch_size=4, heal_prompts=6, heal_answer_tokens=4, heal_steps=6,
                heal_batch_size=4, heal_rank=4, heal_learning_rate=5e-3, heal_top_k=16)
    base.update(kw)
    return AbliterationConfig(**base)


def test_saved_healed_model_is_the_live_one_and_the_original_comes_back(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")
    model, tok = load_model(src, dtype="float32")
    plan = _plan(model)
    prompts = {k: [p for p in load_prompts(f"ours:{k}:train") if p.lang in ("en", "zh")][:12]
               for k in ("harmless", "harmful", "sensitive")}
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        original = model(ids).logits.clone()
    with contextlib.ExitStack() as stack:
        result = heal(model, tok, plan, stack, prompts, _cfg(), log=lambda *_: None)
        with torch.no_grad():
            live = model(ids).logits.clone()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original)  # edit and adapters gone, exactly
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert result.examples["harmless"] > 0 and result.examples["sensitive"] == 6
    assert len(result.losses) == 6 and result.losses[-1] < result.losses[0]
    assert any(float(d.B.abs().max()) > 0 for d in result.deltas)  # the adapters learned something
    out = tmp_path / "healed"
    out.mkdir()
    info = stream_edit(src, out, plan, result.deltas)
    assert info["healed_tensors"] == len(result.deltas)
    saved, _ = load_model(out, dtype="float32")
    with torch.no_grad():
        written = saved(ids).logits
    assert torch.allclose(written, live, atol=1e-4)
    assert not torch.allclose(written, original, atol=1e-3)


def test_run_with_healing_records_it(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")
    out = tmp_path / "out"
    cfg = AbliterationConfig(model=str(src), output_dir=str(out), dtype="float32", max_prompts=16, holdout=4,
                             batch_size=8, num_candidates=2, score_max_new_tokens=4, check_prompts=4,
                             check_max_new_tokens=4, examples=1, example_max_new_tokens=4, answer_tokens=4,
                             cache_dir=str(tmp_path / "acts"), heal=True, heal_prompts=4, heal_answer_tokens=4,
                             heal_steps=3, heal_batch_size=4, heal_rank=2, heal_top_k=8, heal_texts=4,
                             heal_text_tokens=8, check_capability=True, check_capability_limit=2)
    lines: list[str] = []
    record = run(cfg, log=lines.append)
    saved = json.loads((out / "abliteration.json").read_text())
    assert saved["healing"]["steps"] == 3 and saved["healing"]["modules"] > 0
    assert saved["healing"]["examples"]["text"] == 4
    cap = saved["check"]["capability"]
    assert {"deccp_mc_en", "deccp_mc_zh"} <= set(cap) and all(0 <= c["after"] <= 100 for c in cap.values())
    assert any("capability deccp_mc_en" in line for line in lines)
    assert all(c["paired"] and c["gained"] + c["lost"] <= 2 for t, c in cap.items() if t != "deccp_capability")
    assert any("capability deccp_mc_en" in line and "items gained" in line for line in lines)
    assert "healing" in saved["timings_s"] and saved["stream"]["healed_tensors"] == saved["healing"]["modules"]
    assert record["check"]["after"]["refusal"]
    assert any("healing:" in line for line in lines)

    # a re-run takes everything the unedited model did from the cache (three activation passes, selection and
    # check answers, example answers, the original's healing targets for harmless and harmful prompts) and gets
    # the same numbers
    assert record["unedited_cache_hits"] == 0
    again = run(dataclasses.replace(cfg, overwrite=True, check_capability=False), log=lambda *_: None)
    assert again["unedited_cache_hits"] == 8
    assert again["selection"]["unedited"] == record["selection"]["unedited"]
    assert again["check"]["before"] == record["check"]["before"]
    assert [e["before"] for e in again["check"]["examples"]] == [e["before"] for e in record["check"]["examples"]]
    assert again["healing"]["examples"] == record["healing"]["examples"]
    assert again["healing"]["loss_start"] == record["healing"]["loss_start"]  # the same targets, the same training
    assert again["healing"]["loss_end"] == record["healing"]["loss_end"]
    # the edit's own answers and targets come back too, keyed by the edit, and counted apart from the unedited ones
    assert not record["healing"]["edit_targets_cached"] and again["healing"]["edit_targets_cached"]
    shorter = run(dataclasses.replace(cfg, overwrite=True, check_capability=False, check_max_new_tokens=3),
                  log=lambda *_: None)
    assert shorter["unedited_cache_hits"] == 7  # only the check answers are new
    assert shorter["healing"]["edit_targets_cached"]
    other = run(dataclasses.replace(cfg, overwrite=True, check_capability=False, heal_edit_scale=1.5),
                log=lambda *_: None)
    assert not other["healing"]["edit_targets_cached"]  # another edit teaches: its answers are generated


def test_plain_texts_are_train_gold_answers_balanced_over_languages():
    texts = plain_texts(["en", "zh"], 6, seed=3)
    gold = {a.gold: a for a in load_bundle().answers}
    assert len(texts) == 6 and all(t in gold for t in texts)
    assert all(gold[t].split == "train" and gold[t].kind == "sensitive" for t in texts)  # never the eval split
    assert sorted(gold[t].lang for t in texts) == ["en"] * 3 + ["zh"] * 3
    assert plain_texts(["en", "zh"], 6, seed=3) == texts and plain_texts(["en", "zh"], 6, seed=4) != texts


def test_text_targets_are_the_model_distribution_at_every_position(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    texts = ["The Great Wall was built over many centuries.", "长城修建了许多个世纪，用于防御北方。"]
    examples = text_targets(model, tok, texts, max_tokens=7, top_k=5, batch_size=2)
    assert [e.kind for e in examples] == ["text", "text"]
    for text, e in zip(texts, examples, strict=True):
        ids = tok(text, add_special_tokens=False)["input_ids"][:7]
        assert e.input_ids == ids and e.n_prompt == 1 and e.top_idx.shape == (len(ids) - 1, 5)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        val, idx = logp.topk(5, dim=-1)
        assert torch.equal(e.top_idx, idx) and torch.allclose(e.top_logp, val, atol=1e-4)  # padding changed nothing


def test_teacher_answers_targets_are_the_teacher_forced_distribution_of_its_own_answer(tiny_model_dir):
    """One generation pass gives both the answers (as `short_answers` has them) and, along the generated ids,
    the same top-k log-probabilities a full forward pass over prompt + answer gives; an end-of-turn token ends
    the example (it is kept: stopping there is part of the teacher's behaviour)."""
    from deccp.abliteration.scoring import short_answers
    from deccp.chat import render_prompt

    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    ps = [p for p in load_prompts("ours:harmless:train") if p.lang in ("en", "zh")][:5]
    texts, examples = teacher_answers(model, tok, "harmless", ps, answer_tokens=5, top_k=7, batch_size=3)
    assert texts == short_answers(model, tok, [p.text for p in ps], max_new_tokens=5, batch_size=3)[0]
    for p, e in zip(ps, examples, strict=True):
        prompt_ids = tok(render_prompt(tok, p.text), add_special_tokens=False)["input_ids"]
        assert e.kind == "harmless" and e.input_ids[:e.n_prompt] == prompt_ids and len(e.input_ids) == e.n_prompt + 5
        with torch.no_grad():
            logp = model(torch.tensor([e.input_ids])).logits[0, e.n_prompt - 1:-1].float().log_softmax(-1)
        val, idx = logp.topk(7, dim=-1)
        assert torch.equal(e.top_idx, idx) and torch.allclose(e.top_logp, val, atol=1e-4)
        assert e.input_ids[e.n_prompt:] == logp.argmax(-1).tolist()  # the targets follow the greedy answer itself

    # make the second answer token of the first prompt an end-of-turn token: its example stops right there
    model.generation_config.eos_token_id = [examples[0].input_ids[examples[0].n_prompt + 1]]
    _, cut = teacher_answers(model, tok, "harmless", ps[:1], answer_tokens=5, top_k=7, batch_size=3)
    assert cut[0].input_ids == examples[0].input_ids[:examples[0].n_prompt + 2] and cut[0].top_idx.shape == (2, 7)


def test_step_top_k_matches_the_per_row_distribution_and_releases_each_step():
    """Reducing the raw logits step by step gives each row's top-k log-probabilities, the first step renormalised
    without the excluded tokens of that row only; every step's logits are let go once reduced."""
    from deccp.abliteration.healing import _step_top_k

    torch.manual_seed(0)
    steps = [torch.randn(3, 50) for _ in range(4)]
    full = torch.stack(steps, dim=1)  # (rows, steps, vocab), the layout reduced per row before
    excluded = [None, [int(full[1, 0].argmax()), 5], []]
    tops = _step_top_k(steps, 6, excluded)
    assert steps == [None] * 4 and len(tops) == 4
    for row in range(3):
        raw = full[row].clone()
        if excluded[row]:
            raw[0, excluded[row]] = float("-inf")
        val, idx = raw.log_softmax(-1).topk(6, dim=-1)
        assert torch.equal(torch.stack([t[row] for _, t in tops]), idx)
        assert torch.allclose(torch.stack([v[row] for v, _ in tops]), val)
    assert int(full[1, 0].argmax()) not in tops[0][1][1].tolist() and 5 not in tops[0][1][1].tolist()
    assert not torch.equal(tops[0][0][1], full[1, 0].log_softmax(-1).topk(6).values)  # row 1 was renormalised


def _empty_targets(n: int):
    return torch.zeros(n, 1, dtype=torch.long), torch.zeros(n, 1), torch.zeros(n)


_HEAD = list(range(20, 30))  # a 10-token beginning every example shares (the system turn, in real use)


def _prompt_examples():
    from deccp.abliteration.healing import HealExample

    tails = [([41, 42, 43], [7, 8]), ([51, 52, 53, 54, 55], [9, 10, 11, 12]), ([61, 62], [13])]
    return [HealExample("harmless", _HEAD + p + a, len(_HEAD) + len(p), *_empty_targets(len(a))) for p, a in tails]


@contextlib.contextmanager
def _corrected_adapters(model, first_layer: int = 0):
    """Adapters on a frozen model with a non-zero random correction (so A gets gradients too), and a function
    giving (rows, adapter gradients) of a loss over the rows some forward returns."""
    from deccp.abliteration.healing import LowRankAdapters

    for p in model.parameters():
        p.requires_grad_(False)
    with LowRankAdapters(model, rank=2, alpha=4, target_modules=["all-linear"], first_layer=first_layer) as ad:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for b in ad.B.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)

        def grads(rows_of):
            for q in ad.parameters():
                q.grad = None
            rows = rows_of()
            sum(r.float().log_softmax(-1)[:, :50].sum() for r in rows).backward()
            return rows, [q.grad.clone() for q in ad.parameters()]

        yield grads


@pytest.mark.parametrize("sliced", [True, False])
def test_answer_logits_share_the_common_prefix_and_match_separate_forward_passes(tiny_model_dir, sliced):
    """The shared beginning is run once for the batch; logits and the adapters' gradients equal those of each
    sequence run alone, unpadded."""
    from deccp.abliteration.healing import HealExample, answer_logits, shared_prefix_length

    model, _ = load_model(tiny_model_dir("qwen2"), dtype="float32")
    examples = _prompt_examples()
    assert shared_prefix_length(examples) == 10
    text = HealExample("text", [20, 21, 99], 1, *_empty_targets(2))
    assert shared_prefix_length([*examples, text]) == 0  # a plain text predicts from its first token on
    assert shared_prefix_length([examples[0], HealExample("harmless", _HEAD[:5] + [1] * 9, 13, *_empty_targets(1))]) == 0
    with _corrected_adapters(model) as grads:
        shared, g_shared = grads(lambda: answer_logits(model, examples, pad_id=0, sliced=sliced))
        alone, g_alone = grads(lambda: [model(torch.tensor([e.input_ids])).logits[0, e.n_prompt - 1:-1]
                                        for e in examples])
    for e, a, b in zip(examples, shared, alone, strict=True):
        assert a.shape == (len(e.input_ids) - e.n_prompt, model.config.vocab_size)
        assert torch.allclose(a, b, atol=1e-4)
    assert all(torch.allclose(x, y, atol=1e-4, rtol=1e-3) for x, y in zip(g_shared, g_alone, strict=True))
    assert any(float(x.abs().max()) > 0 for x in g_shared)


@pytest.mark.parametrize(("arch", "with_text"), [("qwen2", False), ("qwen2", True), ("qwen3", False), ("llama", False)])
def test_cached_lower_layers_give_the_same_logits_and_gradients_without_running_those_layers(tiny_model_dir, arch,
                                                                                            with_text):
    """With the edit and the corrections from layer 2 on, the inputs of layer 2 are computed once per example
    (`cache_lower_layers`) and each step runs layers 2 and above only: the logits and the adapters' gradients
    equal those of the whole model, with or without a shared prefix; layers 0-1 do not run; the model comes back
    whole."""
    from deccp.abliteration.edits import LiveEdit
    from deccp.abliteration.healing import HealExample, answer_logits, cache_lower_layers

    model, _ = load_model(tiny_model_dir(arch), dtype="float32")
    layers = list(model.model.layers)
    plan = EditPlan([e for e in _plan(model).edits if int(e.name.split(".")[2]) >= 2])
    assert plan.first_layer() == 2
    examples = _prompt_examples()
    if with_text:  # no shared prefix then
        examples.append(HealExample("text", [20, 21, 99, 98], 1, *_empty_targets(3)))
    ran: list[int] = []
    counters = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    with LiveEdit(model, plan), _corrected_adapters(model, first_layer=2) as grads:
        whole, g_whole = grads(lambda: answer_logits(model, examples, pad_id=0, sliced=True))
        lower = cache_lower_layers(model, examples[::-1], 2, pad_id=0, batch_size=2)
        assert lower.prefix_len == (0 if with_text else len(_HEAD))
        assert all(e.lower.shape == (len(e.input_ids) - lower.prefix_len, model.config.hidden_size) for e in examples)
        ran.clear()
        cached, g_cached = grads(lambda: answer_logits(model, examples[1:] + examples[:1], pad_id=0, sliced=True,
                                                       lower=lower))
        cached = cached[-1:] + cached[:-1]
        if not with_text:  # the shared prefix runs through every layer once (its keys and values)
            assert ran.count(0) == 1 and ran.count(1) == 1
        else:
            assert 0 not in ran and 1 not in ran
        detached, g_detached = grads(lambda: answer_logits(model, examples, pad_id=0, sliced=True, detach_prompt=True))
        ran.clear()
        cached_detached, g_cached_detached = grads(lambda: answer_logits(model, examples, pad_id=0, sliced=True,
                                                                         lower=lower, detach_prompt=True))
        assert ran.count(0) == ran.count(1) == (0 if with_text else 1)  # the prefix only, as above
    for h in counters:
        h.remove()
    assert list(model.model.layers) == layers
    for e, a, b in zip(examples, whole, cached, strict=True):
        assert a.shape == (len(e.input_ids) - e.n_prompt, model.config.vocab_size)
        assert torch.allclose(a, b, atol=1e-4)
    assert len(g_whole) == len(g_cached)
    assert all(torch.allclose(x, y, atol=1e-4, rtol=1e-3) for x, y in zip(g_whole, g_cached, strict=True))
    assert any(float(x.abs().max()) > 0 for x in g_cached)
    # with a detached prompt too: the same logits and gradients as the detached prompt over the whole model
    for a, b in zip(detached, cached_detached, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    assert all(torch.allclose(x, y, atol=1e-4, rtol=1e-3) for x, y in zip(g_detached, g_cached_detached, strict=True))
    assert not all(torch.allclose(x, y, atol=1e-4, rtol=1e-3) for x, y in zip(g_cached, g_cached_detached, strict=True))


@pytest.mark.parametrize("with_text", [False, True])
def test_detached_prompt_gives_the_same_logits_and_backpropagates_the_answer_only(tiny_model_dir, with_text):
    """heal_detach_prompt: the batched logits equal each sequence run alone; the adapters' gradients equal those
    of each sequence whose prompt (all but its last token) ran without gradients, and differ from the full ones."""
    from transformers import DynamicCache

    from deccp.abliteration.healing import HealExample, answer_logits

    model, _ = load_model(tiny_model_dir("qwen2"), dtype="float32")
    examples = _prompt_examples()
    if with_text:  # no shared prefix then, and a row with no prompt body
        examples.append(HealExample("text", [20, 21, 99, 98], 1, *_empty_targets(3)))
    with _corrected_adapters(model) as grads:
        def detached_alone():
            out = []
            for e in examples:
                cache = DynamicCache(config=model.config)
                if e.n_prompt > 1:
                    with torch.no_grad():
                        model(torch.tensor([e.input_ids[:e.n_prompt - 1]]), past_key_values=cache, use_cache=True)
                out.append(model(torch.tensor([e.input_ids[e.n_prompt - 1:]]), past_key_values=cache,
                                 use_cache=True).logits[0, :-1])
            return out

        batched, g_batched = grads(lambda: answer_logits(model, examples, pad_id=0, sliced=True, detach_prompt=True))
        alone, g_alone = grads(detached_alone)
        _, g_full = grads(lambda: [model(torch.tensor([e.input_ids])).logits[0, e.n_prompt - 1:-1] for e in examples])
    for e, a, b in zip(examples, batched, alone, strict=True):
        assert a.shape == (len(e.input_ids) - e.n_prompt, model.config.vocab_size)
        assert torch.allclose(a, b, atol=1e-4)
    assert all(torch.allclose(x, y, atol=1e-4, rtol=1e-3) for x, y in zip(g_batched, g_alone, strict=True))
    assert not all(torch.allclose(x, y, atol=1e-4, rtol=1e-3) for x, y in zip(g_batched, g_full, strict=True))


def test_refused_teacher_answers_are_replaced_by_answers_from_the_next_likely_first_tokens(tiny_model_dir):
    """A teacher answer the judge calls a refusal is answered again from the teacher's next most likely first
    tokens: the replacement is the first of them not refused, greedy after its first token, with the first target
    the teacher's distribution renormalised without the tokens ranked above it (so the same as asking again without
    each refusal's first token in turn) and later targets the teacher's own; answers not refused are left alone,
    and a prompt refused every time keeps its first answer."""
    from deccp.chat import render_prompt

    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    ps = [p for p in load_prompts("ours:sensitive:train") if p.lang in ("en", "zh")][:3]
    kw = dict(answer_tokens=4, top_k=7, batch_size=2)
    texts, examples = teacher_answers(model, tok, "edited", ps, **kw)

    def from_rank(i: int, j: int) -> str:
        ranked = examples[i].top_idx[0].tolist()
        return teacher_answers(model, tok, "edited", [ps[i]], start_with=[(ranked[j], ranked[:j])], **kw)[0][0]

    refusing = {texts[0], from_rank(0, 1), texts[2], from_rank(2, 1), from_rank(2, 2)}
    assert from_rank(0, 2) not in refusing and texts[1] not in refusing  # the tiny model's answers differ enough
    kept = list(examples)
    got_texts, got = list(texts), list(examples)
    counts = replace_unwanted_answers(model, tok, ps, got_texts, got, alternatives=2,
                                      unwanted=lambda t, lang: t in refusing, **kw)
    assert counts == (2, 1)
    assert got_texts == [from_rank(0, 2), texts[1], texts[2]] and got[1] is kept[1] and got[2] is kept[2]

    e = got[0]  # checked against a plain forward pass over the prompt and the new answer
    prompt_ids = tok(render_prompt(tok, ps[0].text), add_special_tokens=False)["input_ids"]
    assert e.kind == "edited" and e.input_ids[:e.n_prompt] == prompt_ids
    with torch.no_grad():
        logits = model(torch.tensor([e.input_ids])).logits[0, e.n_prompt - 1:-1].float()
        unmasked = model(torch.tensor([prompt_ids])).logits[0, -1].float()
    excluded = unmasked.topk(2).indices.tolist()  # the refused answer's first token, then the next refusal's
    logits[0, excluded] = float("-inf")
    logp = logits.log_softmax(-1)
    val, idx = logp.topk(7, dim=-1)
    assert torch.equal(e.top_idx, idx) and torch.allclose(e.top_logp, val, atol=1e-4)
    assert e.input_ids[e.n_prompt:] == logp.argmax(-1).tolist()  # greedy once those two are excluded
    assert not set(excluded) & set(e.top_idx[0].tolist())


def test_heal_teaches_the_edits_answers_in_place_of_its_refusals(tiny_model_dir, monkeypatch):
    """heal_refusal_alternatives: the edit-taught examples go through `replace_unwanted_answers` (with the
    edit live, before training) and what it put in their place is what training gets; the counts are recorded."""
    import deccp.abliteration.healing as healing
    import deccp.judges.refusal as refusal
    from deccp.abliteration.edits import LiveEdit

    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    plan = _plan(model)
    prompts = {k: [p for p in load_prompts(f"ours:{k}:train") if p.lang in ("en", "zh")][:4]
               for k in ("harmless", "harmful", "sensitive")}
    monkeypatch.setattr(refusal, "is_refusal", lambda text, lang: False)  # the original answers everything
    caught = {}
    ids = torch.tensor([[3, 5, 7, 9]])
    with LiveEdit(model, plan), torch.no_grad():
        edited_logits = model(ids).logits.clone()

    def spy(model, tokenizer, ps, texts, examples, *, alternatives, unwanted, **kw):
        with torch.no_grad():
            caught["edit_live"] = torch.allclose(model(ids).logits, edited_logits, atol=1e-5)
        caught["alternatives"], caught["prompts"] = alternatives, [p.text for p in ps]
        examples[0] = dataclasses.replace(examples[0], kind="edited", top_logp=examples[0].top_logp * 0)
        caught["replaced"] = examples[0]
        return 3, 1

    monkeypatch.setattr(healing, "replace_unwanted_answers", spy)
    monkeypatch.setattr(healing, "train", lambda model, adapters, examples, **kw: caught.setdefault("ex", examples)
                        and [0.0])
    with contextlib.ExitStack() as stack:
        result = heal(model, tok, plan, stack, prompts, _cfg(heal_prompts=4, heal_harmful=False,
                                                             heal_refusal_alternatives=5), log=lambda *_: None)
    assert caught["edit_live"] and caught["alternatives"] == 5
    assert caught["prompts"] == [p.text for p in _balanced(prompts["sensitive"], 4)]
    assert any(e is caught["replaced"] for e in caught["ex"])
    assert result.edit_refusals == {"refused": 3, "answered_instead": 1}
    assert result.summary()["edit_refusals"] == {"refused": 3, "answered_instead": 1}
    from deccp.abliteration.run import format_summary

    printed = format_summary({"healing": result.summary(), "timings_s": {"total": 1.0}})
    assert "still refused 3 of the prompts" in printed and "1 taught an answer" in printed
    with contextlib.ExitStack() as stack:  # off by default: never called
        monkeypatch.setattr(healing, "replace_unwanted_answers", None)
        assert heal(model, tok, plan, stack, prompts, _cfg(heal_prompts=4, heal_harmful=False),
                    log=lambda *_: None).edit_refusals is None


def test_heal_teaches_the_originals_refusals_where_it_complied_with_harmful_prompts(tiny_model_dir, monkeypatch,
                                                                                     tmp_path):
    """heal_harmful_refusals: the original's answers to the harmful prompts go through `replace_unwanted_answers`
    with the original itself live (no edit) and compliance as the unwanted answer; a replacement the judge calls
    a refusal is then taught like any refused harmful prompt, the counts are recorded and printed, and a second
    run reads the replacements back from the cache instead of generating them again."""
    import deccp.abliteration.healing as healing
    import deccp.judges.refusal as refusal
    from deccp.abliteration.baseline_cache import BaselineCache
    from deccp.abliteration.run import format_summary

    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    plan = _plan(model)
    prompts = {k: [p for p in load_prompts(f"ours:{k}:train") if p.lang in ("en", "zh")][:4]
               for k in ("harmless", "harmful", "sensitive")}
    monkeypatch.setattr(refusal, "is_refusal", lambda text, lang: text == "REFUSED")  # the original complies
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        original_logits = model(ids).logits.clone()
    caught: dict = {"calls": 0}

    def spy(model, tokenizer, ps, texts, examples, *, alternatives, unwanted, **kw):
        caught["calls"] += 1
        with torch.no_grad():
            caught["original_live"] = torch.allclose(model(ids).logits, original_logits, atol=1e-6)
        caught["alternatives"], caught["prompts"] = alternatives, [p.text for p in ps]
        caught["unwanted"] = (unwanted("Sure, here is how", "en"), unwanted("REFUSED", "en"))
        texts[1] = "REFUSED"
        examples[1] = dataclasses.replace(examples[1], top_logp=examples[1].top_logp * 0)
        return len(ps), 1

    monkeypatch.setattr(healing, "replace_unwanted_answers", spy)
    monkeypatch.setattr(healing, "train", lambda model, adapters, examples, **kw: caught.setdefault("ex", examples)
                        and [0.0])
    cache = BaselineCache(tmp_path, "m")
    cfg = _cfg(heal_prompts=4, heal_harmful_refusals=3)
    with contextlib.ExitStack() as stack:
        result = heal(model, tok, plan, stack, prompts, cfg, log=lambda *_: None, cache=cache)
    assert caught["calls"] == 1 and caught["original_live"] and caught["alternatives"] == 3
    assert caught["prompts"] == [p.text for p in _balanced(prompts["harmful"], 4)]
    assert caught["unwanted"] == (True, False)  # a compliance is unwanted, a refusal is what is looked for
    harmful = [e for e in caught["ex"] if e.kind == "harmful"]
    assert len(harmful) == 1 and torch.equal(harmful[0].top_logp, torch.zeros_like(harmful[0].top_logp))
    assert result.examples["harmful"] == 1
    assert result.harmful_refusals == {"answered": 4, "refused_instead": 1}
    assert result.summary()["harmful_refusals"] == {"answered": 4, "refused_instead": 1}
    printed = format_summary({"healing": result.summary(), "timings_s": {"total": 1.0}})
    assert "original answered 4 of the harmful prompts" in printed and "1 taught its refusal" in printed

    del caught["ex"]
    with contextlib.ExitStack() as stack:  # the same prompts and settings: read back, not generated again
        again = heal(model, tok, plan, stack, prompts, cfg, log=lambda *_: None, cache=cache)
    assert caught["calls"] == 1 and again.harmful_refusals == result.harmful_refusals
    harmful = [e for e in caught["ex"] if e.kind == "harmful"]
    assert len(harmful) == 1 and torch.equal(harmful[0].top_logp, torch.zeros_like(harmful[0].top_logp))
    with contextlib.ExitStack() as stack:  # off by default: never called
        monkeypatch.setattr(healing, "replace_unwanted_answers", None)
        assert heal(model, tok, plan, stack, prompts, _cfg(heal_prompts=4),
                    log=lambda *_: None).harmful_refusals is None


def _example_over(dist: torch.Tensor, first: int, k: int) -> HealExample:
    """A teacher example whose answer starts with `first`, with the top-`k` of `dist` (n_answer, vocab) as targets."""
    logp = dist.log()
    val, idx = logp.topk(k, dim=-1)
    rest = torch.log(-torch.expm1(torch.logsumexp(val, -1).clamp(max=-1e-6)))
    return HealExample("edited", [1, 2, first, 4], 2, idx, val, rest)


@pytest.mark.parametrize("share", [0.0, 0.25])
def test_drop_first_tokens_lowers_the_openers_and_renormalises_the_first_position_only(share):
    dist = torch.tensor([[0.05, 0.30, 0.20, 0.15, 0.10, 0.08, 0.07, 0.05],
                         [0.30, 0.20, 0.10, 0.10, 0.10, 0.10, 0.05, 0.05]])
    e = _example_over(dist, first=3, k=6)  # token 0 and token 7 fall in the rest bucket
    kept_logp, kept_rest = e.top_logp.clone(), e.rest_logp.clone()
    views = (e.top_logp, e.rest_logp)
    moved = drop_first_tokens(e, {1, 3, 7}, share)  # 3 is the answer's own first token: kept; 7 is not in the top-k
    assert moved == pytest.approx(0.30 * (1 - share))
    p = dict(zip(e.top_idx[0].tolist(), e.top_logp[0].exp().tolist(), strict=True))
    norm = 1 - 0.30 * (1 - share)
    assert p[1] == pytest.approx(0.30 * share / norm, abs=1e-6)
    for t in (2, 3, 4, 5):
        assert p[t] == pytest.approx(float(dist[0, t]) / norm, rel=1e-5)
    assert float(e.rest_logp[0].exp()) == pytest.approx(0.10 / norm, rel=1e-4)
    assert sum(p.values()) + float(e.rest_logp[0].exp()) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(e.top_logp[1], kept_logp[1]) and e.rest_logp[1] == kept_rest[1]  # later positions: as they were
    assert torch.equal(views[0], kept_logp) and torch.equal(views[1], kept_rest)  # cached rows are not written into
    assert drop_first_tokens(_example_over(dist, first=1, k=6), {1}, share) == 0.0  # its own opener: nothing moves


def test_refusal_openers_are_the_first_answer_tokens():
    dist = torch.full((2, 8), 1 / 8)
    assert refusal_openers([_example_over(dist, 5, 4), _example_over(dist, 6, 4), _example_over(dist, 5, 4)]) == {5, 6}


def test_heal_drops_the_originals_refusal_openers_from_the_edits_first_tokens(tiny_model_dir, monkeypatch):
    """heal_refusal_openers: the first tokens of the original's refusals among the healing answers (harmful prompts
    it refused, harmless ones it refused) leave the first position of every example the edit teaches; the examples
    the original teaches keep their targets; the tokens are recorded and printed."""
    import deccp.abliteration.healing as healing
    import deccp.judges.refusal as refusal
    from deccp.abliteration.run import format_summary

    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    plan = _plan(model)
    prompts = {k: [p for p in load_prompts(f"ours:{k}:train") if p.lang in ("en", "zh")][:4]
               for k in ("harmless", "harmful", "sensitive")}
    harmless = {p.text for p in prompts["harmless"][:2]}  # two harmless prompts refused by the original
    caught: dict = {}
    real = healing.teacher_answers

    def answers(model, tokenizer, kind, ps, **kw):
        texts, examples = real(model, tokenizer, kind, ps, **kw)
        caught.setdefault(kind, [e.input_ids[e.n_prompt] for e in examples])
        if kind == "harmless":
            texts = ["REFUSED" if p.text in harmless else t for p, t in zip(ps, texts, strict=True)]
        if kind == "harmful":
            texts = ["REFUSED"] * len(ps)
        return texts, examples

    monkeypatch.setattr(healing, "teacher_answers", answers)
    monkeypatch.setattr(refusal, "is_refusal", lambda text, lang: text == "REFUSED")
    monkeypatch.setattr(healing, "train", lambda model, adapters, examples, **kw: caught.setdefault("ex", examples)
                        and [0.0])
    with contextlib.ExitStack() as stack:
        plain = heal(model, tok, plan, stack, prompts, _cfg(heal_prompts=4), log=lambda *_: None)
    plain_ex = caught.pop("ex")
    assert plain.refusal_openers is None
    caught.clear()
    with contextlib.ExitStack() as stack:
        result = heal(model, tok, plan, stack, prompts, _cfg(heal_prompts=4, heal_refusal_openers=1.0),
                      log=lambda *_: None)
    order = [p.text for p in _balanced(prompts["harmless"], 4)]
    openers = set(caught["harmful"]) | {t for p, t in zip(order, caught["harmless"], strict=True) if p in harmless}
    assert openers and result.refusal_openers["tokens"] == sorted(tok.decode([t]) for t in openers)
    assert result.refusal_openers["mean_moved"] > 0
    assert [e.kind for e in caught["ex"]] == [e.kind for e in plain_ex] and sum(e.kind == "edited" for e in plain_ex) == 6
    for e, was in zip(caught["ex"], plain_ex, strict=True):
        if e.kind != "edited":  # the original's targets are untouched
            assert torch.equal(e.top_logp, was.top_logp) and torch.equal(e.rest_logp, was.rest_logp)
            continue
        assert torch.equal(e.top_logp[1:], was.top_logp[1:]) and e.input_ids == was.input_ids
        p = dict(zip(e.top_idx[0].tolist(), e.top_logp[0].exp().tolist(), strict=True))
        assert all(p[t] < 1e-20 for t in openers if t in p and t != e.input_ids[e.n_prompt])
        assert sum(p.values()) + float(e.rest_logp[0].exp()) == pytest.approx(1.0, abs=1e-4)
    printed = format_summary({"healing": result.summary(), "timings_s": {"total": 1.0}})
    assert "without the original's refusal openers" in printed


@pytest.mark.parametrize("field,value", [("heal_steps", 0), ("heal_learning_rate", 0.0), ("heal_target_modules", []),
                                         ("heal_texts", -1), ("heal_text_tokens", 0), ("check_capability_limit", 0),
                                         ("heal_edit_scale", 0.0), ("heal_edit_scale", 4.0),
                                         ("heal_layers", "upper"), ("heal_layers", "-1"), ("heal_harmful_weight", 0.0),
                                         ("heal_refusal_alternatives", -1), ("heal_harmful_refusals", -1),
                                         ("heal_refusal_openers", -0.1), ("heal_refusal_openers", 1.5),
                                         ("heal_prompt_states", "stale"),
                                         ("heal_prompt_states", "fixed")])
def test_bad_healing_settings_are_rejected(field, value):
    with pytest.raises(DeccpError, match=field):
        AbliterationConfig(**{field: value})


def test_sensitive_prompts_follow_the_edit_at_heal_edit_scale(tiny_model_dir, monkeypatch):
    """heal_edit_scale > 1: the sensitive prompts' targets (answers and log-probabilities) come from the stronger
    edit, the harmless ones still from the original, and the model is left with the plan's own edit."""
    import deccp.abliteration.healing as healing
    from deccp.abliteration.edits import LiveEdit

    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    plan = _plan(model)
    prompts = {k: [p for p in load_prompts(f"ours:{k}:train") if p.lang in ("en", "zh")][:4]
               for k in ("harmless", "harmful", "sensitive")}
    caught = {}

    def fake_train(model, adapters, examples, **kw):
        caught["examples"] = examples
        return [0.0]

    monkeypatch.setattr(healing, "train", fake_train)

    def targets(edit_plan, kind):
        ps = _balanced(prompts["sensitive"], 4)[:1]
        with contextlib.ExitStack() as s:
            if edit_plan is not None:
                s.enter_context(LiveEdit(model, edit_plan))
            return healing.teacher_answers(model, tok, kind, ps, answer_tokens=4, top_k=16, batch_size=4)[1][0]

    stronger = plan.scaled(2.0)
    assert [e.weight for e in stronger.edits] == [3.0] * len(plan.edits) and plan.scaled(1.0) is plan
    ids = torch.tensor([[3, 5, 7, 9]])
    with LiveEdit(model, plan), torch.no_grad():
        plan_logits = model(ids).logits.clone()
    with contextlib.ExitStack() as stack:
        heal(model, tok, plan, stack, prompts, _cfg(heal_edit_scale=2.0, heal_prompts=4, heal_harmful=False),
             log=lambda *_: None)
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, plan_logits, atol=1e-5)  # the plan, not the stronger edit
    first_edited = next(e for e in caught["examples"] if e.kind == "edited")
    want = targets(stronger, "edited")
    assert first_edited.input_ids == want.input_ids and torch.allclose(first_edited.top_logp, want.top_logp, atol=1e-5)
    weaker = targets(plan, "edited")  # the plan's own edit answers (or weighs its answer) otherwise
    assert weaker.input_ids != want.input_ids or not torch.allclose(weaker.top_logp, want.top_logp, atol=1e-3)
    first_harmless = next(e for e in caught["examples"] if e.kind == "harmless")
    assert first_harmless.top_logp.shape[0] > 0


def test_adapters_choose_modules_by_name_and_start_as_the_identity(tiny_model_dir):
    from deccp.abliteration.healing import LowRankAdapters

    model, _ = load_model(tiny_model_dir("llama"), dtype="float32")
    ids = torch.tensor([[2, 4, 6, 8]])
    with torch.no_grad():
        before = model(ids).logits.clone()
    with LowRankAdapters(model, rank=2, alpha=4, target_modules=["o_proj", "down_proj"]) as ad:
        assert sorted({n.rsplit(".", 1)[-1] for n in ad.targets}) == ["down_proj", "o_proj"]
        with torch.no_grad():
            assert torch.equal(model(ids).logits, before)  # B starts at zero
        all_linear = LowRankAdapters(model, rank=2, alpha=4, target_modules=["all-linear"])
        assert "lm_head" not in all_linear.targets and len(all_linear.targets) > len(ad.targets)
    with pytest.raises(DeccpError, match="no linear module matches"):
        LowRankAdapters(model, rank=2, alpha=4, target_modules=["not_a_module"])
    model.model.layers[0].mlp.down_proj.to("meta")  # what an offloading device_map leaves behind
    with pytest.raises(DeccpError, match="needs the model in memory"):
        LowRankAdapters(model, rank=2, alpha=4, target_modules=["down_proj"])


def test_heal_layers_edited_puts_corrections_from_the_first_edited_layer_and_backward_stops_there(tiny_model_dir):
    """`heal_layers: edited`: adapters only in the layers from the first one the edit changes; the layers below
    run without a graph (nothing there needs a gradient), which is what makes such a step cheaper."""
    from deccp.abliteration.healing import LowRankAdapters

    model, _ = load_model(tiny_model_dir("qwen2"), dtype="float32")
    n_layers = model.config.num_hidden_layers
    assert n_layers >= 2
    full = _plan(model)
    upper = EditPlan([e for e in full.edits if f"layers.{n_layers - 1}." in e.name])
    assert full.first_layer() == 0 and upper.first_layer() == n_layers - 1
    embed = EditPlan([*upper.edits, ModuleEdit("model.embed_tokens.weight", upper.edits[0].direction, 1.0, False)])
    assert embed.first_layer() == 0  # the embedding comes before every layer
    for p in model.parameters():
        p.requires_grad_(False)
    seen: dict[int, bool] = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[0].requires_grad))
             for i, layer in enumerate(model.model.layers)]
    with LowRankAdapters(model, rank=2, alpha=4, target_modules=["all-linear"], first_layer=upper.first_layer()) as ad:
        assert ad.targets and all(f"layers.{n_layers - 1}." in n for n in ad.targets)
        model(torch.tensor([[2, 4, 6, 8]])).logits.sum().backward()
        assert all(p.grad is not None for p in ad.parameters())
    for h in hooks:
        h.remove()
    assert seen == {i: i == n_layers - 1 for i in range(n_layers)}
    with pytest.raises(DeccpError, match="in layers 99 and above"):
        LowRankAdapters(model, rank=2, alpha=4, target_modules=["all-linear"], first_layer=99)


def test_heal_layers_names_the_first_corrected_layer(tiny_model_dir):
    """`heal_layers`: all is layer 0, edited the plan's first edited layer, a number that layer (from YAML an int,
    from the command line a string); a layer the model does not have is an error naming the setting."""
    from deccp.abliteration.healing import first_corrected_layer

    model, _ = load_model(tiny_model_dir("qwen2"), dtype="float32")
    layers = model.model.layers
    n_layers = len(layers)
    upper = EditPlan([e for e in _plan(model).edits if f"layers.{n_layers - 1}." in e.name])
    assert first_corrected_layer("all", upper, layers) == 0
    assert first_corrected_layer("edited", upper, layers) == n_layers - 1
    assert first_corrected_layer(1, upper, layers) == first_corrected_layer("1", upper, layers) == 1
    AbliterationConfig(heal_layers=1)
    AbliterationConfig(heal_layers="1")
    with pytest.raises(DeccpError, match=f"heal_layers: {n_layers} is past"):
        first_corrected_layer(str(n_layers), upper, layers)


def test_kind_weights_weigh_each_example_in_the_step_loss(tiny_model_dir):
    """The step loss is the weighted mean of the examples' KLs: a refused harmful prompt at weight 3 counts three
    times a harmless one (the first step's loss is taken before any update, against the adapters' zero start)."""
    from deccp.abliteration.edits import LiveEdit
    from deccp.abliteration.healing import LowRankAdapters, answer_logits, train

    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    ps = [p for p in load_prompts("ours:harmless:train") if p.lang in ("en", "zh")][:4]
    _, examples = teacher_answers(model, tok, "harmless", ps, answer_tokens=4, top_k=16, batch_size=4)
    examples[1].kind = examples[3].kind = "harmful"
    with LiveEdit(model, _plan(model)):
        with torch.no_grad():
            kls = [float(coarse_kl(r.float().log_softmax(-1), e.top_idx, e.top_logp, e.rest_logp).mean())
                   for e, r in zip(examples, answer_logits(model, examples, pad_id=tok.pad_token_id, sliced=True),
                                   strict=True)]
        assert min(kls) > 0 and len({round(k, 6) for k in kls}) == 4

        def first_loss(weights):
            with LowRankAdapters(model, rank=2, alpha=4, target_modules=["all-linear"]) as ad:
                return train(model, ad, examples, steps=1, lr=1e-3, batch_size=4, seed=0, pad_id=tok.pad_token_id,
                             kind_weights=weights, log=lambda *_: None)[0]

        assert first_loss(None) == pytest.approx(sum(kls) / 4, rel=1e-4)
        assert first_loss({"harmful": 3.0}) == pytest.approx((kls[0] + kls[2] + 3 * (kls[1] + kls[3])) / 8, rel=1e-4)


@pytest.mark.parametrize("with_text", [False, True])
def test_fixed_prompt_states_give_the_detached_logits_and_gradients(tiny_model_dir, with_text):
    """`fix_prompt_states` stores each prompt's keys and values (layers from 2 on) and the prefix's as the model
    is at that moment; until the corrections move, answer_logits against them equals the detached-prompt pass
    (logits and gradients), and the prompt tokens no longer run."""
    from deccp.abliteration.edits import LiveEdit
    from deccp.abliteration.healing import HealExample, answer_logits, cache_lower_layers, fix_prompt_states

    model, _ = load_model(tiny_model_dir("qwen2"), dtype="float32")
    plan = EditPlan([e for e in _plan(model).edits if int(e.name.split(".")[2]) >= 2])
    examples = _prompt_examples()
    if with_text:
        examples.append(HealExample("text", [20, 21, 99, 98], 1, *_empty_targets(3)))
    widths: list[int] = []
    hook = model.model.layers[2].register_forward_pre_hook(lambda m, a, kw: widths.append(
        (a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
    with LiveEdit(model, plan), _corrected_adapters(model, first_layer=2) as grads:
        lower = cache_lower_layers(model, examples, 2, pad_id=0, batch_size=2)
        detached, g_detached = grads(lambda: answer_logits(model, examples, pad_id=0, sliced=True, lower=lower,
                                                           detach_prompt=True))
        fixed = fix_prompt_states(model, examples[::-1], lower, pad_id=0, batch_size=2)
        widths.clear()
        out, g_out = grads(lambda: answer_logits(model, examples[1:] + examples[:1], pad_id=0, sliced=True,
                                                 lower=fixed, detach_prompt=True))
        out = out[-1:] + out[:-1]
    hook.remove()
    assert widths == [max(len(e.input_ids) - e.n_prompt + 1 for e in examples)]  # the answers only
    for a, b in zip(detached, out, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    assert all(torch.allclose(x, y, atol=1e-4, rtol=1e-3) for x, y in zip(g_detached, g_out, strict=True))


def test_heal_with_fixed_prompt_states_trains_on_the_answers_only(tiny_model_dir, monkeypatch):
    """heal_prompt_states: fixed: `heal` fixes the prompts' states (layers from the first edited one) before
    training, every training step then runs the answers only, the corrections move, and the stored states are
    dropped afterwards; an edit of layer 0 cannot have fixed prompt states, which is said before any training."""
    import deccp.abliteration.healing as healing

    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32")
    plan = EditPlan([e for e in _plan(model).edits if int(e.name.split(".")[2]) >= 1])
    prompts = {k: [p for p in load_prompts(f"ours:{k}:train") if p.lang in ("en", "zh")][:4]
               for k in ("harmless", "harmful", "sensitive")}
    cfg = _cfg(heal_layers="edited", heal_detach_prompt=True, heal_prompt_states="fixed", heal_steps=3)
    seen = {}
    real_train = healing.train

    def spy(model, adapters, examples, **kw):
        seen["fixed"] = all(e.prompt_kv is not None for e in examples) and kw["lower"].first == 1
        seen["examples"] = examples
        return real_train(model, adapters, examples, **kw)

    monkeypatch.setattr(healing, "train", spy)
    widths: list[int] = []
    hook = model.model.layers[1].register_forward_pre_hook(lambda m, a, kw: widths.append(
        (a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
    with contextlib.ExitStack() as stack:
        result = healing.heal(model, tok, plan, stack, prompts, cfg, log=lambda *_: None)
    hook.remove()
    assert seen["fixed"] and all(e.prompt_kv is None and e.lower is None for e in seen["examples"])
    answer_width = max(len(e.input_ids) - e.n_prompt + 1 for e in seen["examples"])
    assert widths[-3:] and all(w <= answer_width for w in widths[-3:])  # the 3 steps: answers only
    assert any(float(d.dense().abs().max()) > 0 for d in result.deltas)
    with contextlib.ExitStack() as stack, pytest.raises(DeccpError, match="heal_prompt_states: fixed"):
        healing.heal(model, tok, _plan(model), stack, prompts, cfg, log=lambda *_: None)


def test_teacher_answers_record_the_direction_activations_of_the_same_pass(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("qwen2"))
    prompts = [p for p in load_prompts("ours:harmless:train") if p.lang in ("en", "zh")][:7]
    with ResidualRecorder(model, len(prompts), (-1, -2)) as recorder:
        texts, _ = teacher_answers(model, tok, "harmless", prompts, answer_tokens=3, top_k=4, batch_size=3,
                                   recorder=recorder)
    got = recorder.result()
    acts, plain = collect_activations(model, tok, [p.text for p in prompts], positions=(-1, -2), batch_size=3,
                                      answer_tokens=3)
    assert got is not None and got.shape == acts.shape
    assert torch.allclose(got, acts, atol=1e-4)
    assert texts == plain
    with ResidualRecorder(model, len(prompts), (-1,)) as partial:  # rows never recorded: no result
        teacher_answers(model, tok, "harmless", prompts[:2], answer_tokens=2, top_k=4, batch_size=3, recorder=partial)
    assert partial.result() is None


def test_first_run_generates_the_originals_answers_once_for_directions_and_healing(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    """With healing taking the original's answers to the direction pass's harmless and harmful prompts, one
    generation serves both: only the sensitive prompts get a separate direction pass, and the healing finds its
    original-teacher targets already cached. The directions and the behaviour filter equal those of separate
    passes."""
    src = tiny_model_dir("qwen2")
    calls: list[int] = []
    real = directions_module.collect_activations

    def counting(model, tok, prompts, **kw):
        calls.append(len(prompts))
        return real(model, tok, prompts, **kw)

    monkeypatch.setattr(directions_module, "collect_activations", counting)
    cfg = AbliterationConfig(model=str(src), output_dir=str(tmp_path / "out"), dtype="float32", max_prompts=16,
                             holdout=4, batch_size=8, direction_layer=1, check=False, answer_tokens=4,
                             cache_dir=str(tmp_path / "acts"), heal=True, heal_prompts=16, heal_answer_tokens=6,
                             heal_steps=1, heal_batch_size=4, heal_rank=2, heal_top_k=8)
    lines: list[str] = []
    shared = run(cfg, log=lines.append)
    assert len(calls) == 1  # the sensitive prompts only
    assert shared["unedited_cache_hits"] == 2  # the healing's harmless and harmful targets, from that pass
    assert shared["selection"]["unedited"] is None  # a fixed layer: the held-back prompts choose nothing
    calls.clear()
    separate = run(dataclasses.replace(cfg, output_dir=str(tmp_path / "out2"), cache_dir=str(tmp_path / "acts2"),
                                       heal_answer_tokens=3), log=lines.append)  # shorter than the filter's prefix
    assert len(calls) == 3 and separate["unedited_cache_hits"] == 0
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "directions.safetensors")) for d in ("out", "out2"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    used = [line for line in lines if line.startswith("direction prompts used")]
    assert len(used) == 2 and used[0] == used[1]


def test_shared_original_pass_applies_only_where_healing_takes_the_same_prompts(tmp_path):
    from deccp.abliteration.baseline_cache import BaselineCache
    from deccp.abliteration.run import _with_healing_targets

    cache = BaselineCache(tmp_path, "m")
    ps = [p for p in load_prompts("ours:harmless:train") if p.lang in ("en", "zh")][:6]
    cfg = AbliterationConfig(heal=True, heal_prompts=6, answer_tokens=4, heal_answer_tokens=4)
    assert _with_healing_targets(cache, None, None, "good", ps, cfg) is not None
    assert _with_healing_targets(cache, None, None, "bad", ps, cfg) is None  # the edit teaches sensitive prompts
    assert _with_healing_targets(cache, None, None, "good", ps[:5] + ps[:1], cfg) is None  # a duplicate
    for change in ({"heal_prompts": 5}, {"heal": False}, {"heal_answer_tokens": 3}, {"filter_by_behavior": False}):
        assert _with_healing_targets(cache, None, None, "good", ps, dataclasses.replace(cfg, **change)) is None
    assert _with_healing_targets(BaselineCache(None, "m"), None, None, "good", ps, cfg) is None
    assert _with_healing_targets(cache, None, None, "harmful", ps, dataclasses.replace(cfg, heal_harmful=False)) is None

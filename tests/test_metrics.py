"""Wilson intervals and KL divergence to a reference model (tiny random models, CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from deccp import DeccpError
from deccp.metrics import (
    _continuation_mask,
    first_token_kl,
    kl_from_logits,
    kl_per_position,
    kl_to_reference,
    per_token_kl,
    rate_ci,
    reference_logits,
)
from deccp.models import load_model, resolve_model

PROMPTS = [
    "What happened at Tiananmen Square in 1989?",
    "How do I bake bread?",
    "臺灣的政治地位是什麼？香港國安法對新聞自由有什麼影響？",
    "Explain photosynthesis in simple terms.",
    "1989年天安门广场发生了什么？",
]


# ------------------------------------------------------------------------------------------ Wilson
@pytest.mark.parametrize("k,n,lo,hi", [
    (5, 10, 0.2366, 0.7634),      # textbook values (Wilson 1927; Newcombe 1998)
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (81, 263, 0.2553, 0.3662),    # Newcombe 1998, example (p = 81/263)
    (1, 29, 0.0061, 0.1718),      # Newcombe 1998, example
])
def test_wilson_known_values(k, n, lo, hi):
    rate, got_lo, got_hi = rate_ci(k, n)
    assert rate == pytest.approx(k / n)
    assert got_lo == pytest.approx(lo, abs=6e-4)
    assert got_hi == pytest.approx(hi, abs=6e-4)


def test_wilson_edges_and_z():
    assert rate_ci(0, 0) == (0.0, 0.0, 1.0)
    _, lo95, hi95 = rate_ci(30, 100)
    _, lo99, hi99 = rate_ci(30, 100, z=2.576)
    assert lo99 < lo95 < 0.3 < hi95 < hi99
    for bad in [(-1, 5), (6, 5), (1, -1)]:
        with pytest.raises(DeccpError):
            rate_ci(*bad)


# ------------------------------------------------------------------------------------ KL on tensors
def test_kl_on_logits():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 5, 11, generator=g)
    assert per_token_kl(ref, ref.clone()) == pytest.approx(0.0, abs=1e-7)
    assert first_token_kl(ref, ref.clone()) == pytest.approx(0.0, abs=1e-7)
    new = ref.clone()
    new[:, 1:, :] += torch.randn(3, 4, 11, generator=g)  # damage every position but the first
    assert first_token_kl(ref, new) == pytest.approx(0.0, abs=1e-7)  # [b, T, vocab]: position 0...
    assert first_token_kl(ref[:, 0], new[:, 0]) == pytest.approx(0.0, abs=1e-7)  # ...or [b, vocab]
    assert per_token_kl(ref, new) > 0.05
    # KL(p || q) by hand for one position
    p, q = torch.softmax(ref[0, 2], -1), torch.softmax(new[0, 2], -1)
    assert float(kl_per_position(ref[0, 2], new[0, 2])) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    # the mask leaves padding out: damage only masked-out positions -> zero
    mask = torch.ones(3, 5)
    mask[:, 1:] = 0
    assert per_token_kl(ref, new, mask) == pytest.approx(0.0, abs=1e-7)
    assert per_token_kl(ref, new, torch.zeros(3, 5)) == 0.0
    with pytest.raises(DeccpError, match="shape"):
        per_token_kl(ref, new[:, :, :10])


def test_continuation_mask_stops_after_eos():
    cont = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    mask = _continuation_mask(cont, {2})
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


# ---------------------------------------------------------------------------------- KL on models
@pytest.fixture(scope="module")
def tiny_qwen2():
    return resolve_model("tiny-qwen2")


def _perturb(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_kl_zero_for_identical_and_positive_after_perturbation(tiny_qwen2):
    model, tok = load_model(tiny_qwen2)
    ref, _ = load_model(tiny_qwen2)
    same = kl_to_reference(model, ref, tok, PROMPTS, max_new_tokens=12, batch_size=2)
    assert same == {"first_token": pytest.approx(0.0, abs=1e-6), "per_token": pytest.approx(0.0, abs=1e-6)}
    _perturb(model)
    kl = kl_to_reference(model, ref, tok, PROMPTS, max_new_tokens=12, batch_size=2)
    print("KL after perturbation", kl)
    assert kl["first_token"] > 1e-3 and kl["per_token"] > 1e-3
    # precomputed reference gives the same numbers (what a search loop uses)
    stored = reference_logits(ref, tok, PROMPTS, max_new_tokens=12, batch_size=2)
    assert stored.num_tokens > 0 and len(stored.batches) == 3
    again = kl_from_logits(model, tok, stored)
    assert again["first_token"] == pytest.approx(kl["first_token"], rel=1e-5)
    assert again["per_token"] == pytest.approx(kl["per_token"], rel=1e-5)
    # a bigger perturbation moves further
    _perturb(model, scale=0.2, seed=2)
    assert kl_from_logits(model, tok, stored)["per_token"] > kl["per_token"]


def test_reference_logits_follow_the_greedy_continuation(tiny_qwen2):
    """The teacher-forced logits (left padding, explicit positions) reproduce generate()'s greedy tokens."""
    model, tok = load_model(tiny_qwen2)
    stored = reference_logits(model, tok, PROMPTS, max_new_tokens=10, batch_size=3, system="Be brief.")
    for b in stored.batches:
        cont = b.input_ids[:, b.prompt_len:]
        greedy = b.logits.argmax(-1)
        m = b.cont_mask.bool()
        assert torch.equal(greedy[m], cont[m])


def test_first_token_and_per_token_differ_when_later_tokens_are_damaged():
    """Damage the input embeddings of tokens that occur only in the continuations: the first answer token
    (computed from the prompt alone) is untouched, later ones are not."""
    path = resolve_model("tiny-llama")  # untied embeddings: the output layer stays as it was
    model, tok = load_model(path)
    ref, _ = load_model(path)
    stored = reference_logits(ref, tok, PROMPTS, max_new_tokens=12, batch_size=5)
    b = stored.batches[0]
    prompt_ids = set(b.input_ids[:, :b.prompt_len].flatten().tolist())
    cont_ids = set(b.input_ids[:, b.prompt_len:][b.cont_mask.bool()].tolist())
    damaged = sorted(cont_ids - prompt_ids)
    assert damaged, "the continuations should use some token the prompts do not"
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[damaged] = torch.randn(len(damaged), emb.shape[1], generator=torch.Generator().manual_seed(3))
    kl = kl_from_logits(model, tok, stored)
    print("first-token vs per-token KL after damaging later tokens", kl)
    assert kl["first_token"] == pytest.approx(0.0, abs=1e-6)
    assert kl["per_token"] > 1e-3
    assert not math.isclose(kl["first_token"], kl["per_token"])


def test_kl_rejects_bad_arguments(tiny_qwen2):
    model, tok = load_model(tiny_qwen2)
    with pytest.raises(DeccpError, match="no prompts"):
        kl_to_reference(model, model, tok, [])
    with pytest.raises(DeccpError, match="max_new_tokens"):
        reference_logits(model, tok, PROMPTS, max_new_tokens=0)

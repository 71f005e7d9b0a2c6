"""The embedded SmolLM2-135M-Instruct GGUF against transformers reading the same file."""

from __future__ import annotations

import pytest
import torch

from galatea.engine.generate import generate
from galatea.engine.sampling import SamplingParams
from galatea.model.checkpoint import embedded_model_path, load

pytestmark = pytest.mark.slow

PROMPT = (
    "Aria's Persona: Aria is a cheerful travelling bard who loves stories and songs.\n"
    "<START>\n"
    "You: Hello! Who are you?\n"
    "Aria: I'm Aria, a bard. Would you like to hear a song?\n"
    "You: Yes, please sing about the sea.\n"
    "Aria:"
)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture
def ours(embedded_lm_exact):
    return embedded_lm_exact


def test_same_prompt_ids_as_transformers(reference, ours):
    tok, _ = reference
    assert ours.tokenizer.encode(PROMPT) == tok(PROMPT, add_special_tokens=False).input_ids


def test_last_position_logits_match(reference, ours):
    _, model = reference
    ids = ours.tokenizer.encode(PROMPT)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1].float()
    got = ours.model(torch.tensor([ids]), 0, ours.model.make_cache(1, len(ids)))[0]
    assert got.topk(10).indices.tolist() == expected.topk(10).indices.tolist()
    rel = ((got - expected).abs() / expected.abs().clamp(min=1.0)).max()
    assert rel < 1e-3, f"max relative logit difference {rel}"


def test_greedy_tokens_match_transformers_generate(reference, ours):
    _, model = reference
    ids = ours.tokenizer.encode(PROMPT)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
    expected = out[0, len(ids):].tolist()
    params = SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.0, ban_eos=True)
    text, last, tokens = generate(ours.model, ours.tokenizer, ids, params)
    assert tokens == expected
    assert text == ours.tokenizer.decode(expected)
    assert last.finish_reason == "length"


def test_reported_logprobs_are_transformers_log_probabilities(reference, ours):
    """`logprobs`: each generated token's log probability and the top alternatives under the
    model's distribution, against transformers' log-softmax over the same tokens (teacher
    forced); with the exact (dequantized) model they agree to float32 rounding."""
    _, model = reference
    ids = ours.tokenizer.encode(PROMPT)
    params = SamplingParams(max_new_tokens=12, temperature=0.8, seed=7, repetition_penalty=1.0, logprobs=3)
    _, last, tokens = generate(ours.model, ours.tokenizer, ids, params)
    assert last.logprobs is not None and [e.token for e in last.logprobs] == tokens
    with torch.no_grad():
        logp = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1].double().log_softmax(-1)
    for i, entry in enumerate(last.logprobs):
        assert abs(entry.logprob - float(logp[i, entry.token])) < 2e-3
        top = torch.topk(logp[i], 3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert all(abs(lp - float(v)) < 2e-3 for (_, lp), v in zip(entry.top, top.values, strict=True))


def test_default_int4_load_predicts_like_float(ours):
    """The default (--quant auto -> int4 for this Q4_1 file) keeps the model's predictions."""
    fast = load(None)
    assert fast.quant == "int4"
    ids = ours.tokenizer.encode(PROMPT)
    exact = ours.model(torch.tensor([ids]), 0, ours.model.make_cache(1, len(ids)))[0]
    quick = fast.model(torch.tensor([ids]), 0, fast.model.make_cache(1, len(ids)))[0]
    assert int(quick.argmax()) == int(exact.argmax())
    assert torch.nn.functional.cosine_similarity(quick, exact, dim=0) > 0.99


FIXED_TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. From the top he could see "
              "the fishing boats returning, the gulls circling over the harbour and, far to the west, the dark "
              "line of the storm that the old sailors had promised for three days. He lit the great lamp, wound "
              "the clockwork that turned it, and wrote in his logbook: wind rising, sea calm, all ships home. "
              "Then he made tea, sat by the window and waited for the first drops of rain against the glass.")


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_models_keep_top1_agreement_with_float(ours, mode):
    """Next-token predictions over a fixed text, every position, against the float32 model: the
    prompt path (many rows at once) and the decoding path (the int4/int8 mat-vec kernels).

    Where float32's top choice leads by at least 0.25 logits (about 80% of positions here), the
    quantized model must pick it (>= 98%). Overall agreement is bounded by near-ties and by the
    kernels' bf16 activations: the unquantized model in bf16 agrees on 95% of this text."""
    fast = load(None, quant=mode)
    ids = ours.tokenizer.encode(FIXED_TEXT)
    exact = ours.model(torch.tensor([ids]), 0, ours.model.make_cache(1, len(ids)), all_logits=True)[0]
    top2 = exact.topk(2, dim=-1).values
    decisive = top2[:, 0] - top2[:, 1] >= 0.25
    assert decisive.float().mean() >= 0.7
    quick = fast.model(torch.tensor([ids]), 0, fast.model.make_cache(1, len(ids)), all_logits=True)[0]
    cache = fast.model.make_cache(1, len(ids))
    stepwise = torch.stack([fast.model(torch.tensor([[t]]), i, cache)[0] for i, t in enumerate(ids)])
    for got in (quick, stepwise):
        same = got.argmax(-1) == exact.argmax(-1)
        assert same[decisive].float().mean() >= 0.98
        assert same.float().mean() >= 0.9

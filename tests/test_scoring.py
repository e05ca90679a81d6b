"""disa.scoring against naive per-sequence forwards, HF's own warpers and HF sampling."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from disa.sampling import SamplerSettings
from disa.sampling.hf import HFSampler
from disa.scoring import pack, process_logits, sequence_logprobs, token_logprobs

# prompts and completions of unequal lengths; ids 4..9 are "abcdef", 0 pad, 1 bos, 2 eos.
# A pad id inside a completion (a sampler may draw it) must be scored like any token.
PROMPTS = [[1, 4, 5], [1, 6], [1, 7, 8, 9, 4, 5], [1, 9, 9, 4], [1]]
COMPLETIONS = [[6, 7, 8, 2], [4], [5, 0, 6, 7, 9, 9, 2], [], [8, 8, 2]]


def _hf_process(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """HF's warpers in ``generate``'s order (temperature → top-k → top-p)."""
    if temperature != 1.0:
        logits = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(None, logits)
    return logits


def _naive_token_logprobs(model, prompt, completion, temperature=1.0, top_k=0, top_p=1.0):
    """One unpadded sequence, full forward, (HF-processed) log-softmax, gather."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].float()
    out = []
    for j, tok in enumerate(completion):
        row = _hf_process(logits[len(prompt) - 1 + j][None], temperature, top_k, top_p)[0]
        out.append(torch.log_softmax(row, -1)[tok])
    return torch.stack(out) if out else torch.zeros(0)


def test_pack_layout(char_tok):
    b = pack(PROMPTS, COMPLETIONS, pad_id=0)
    P, T = 6, 7
    assert (
        b.input_ids.shape == (5, P + T) and b.completion_mask.shape == (5, T) and b.prompt_len == P
    )
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        assert b.input_ids[i, P - len(p) : P].tolist() == p
        assert b.input_ids[i, P : P + len(c)].tolist() == c
        assert b.attention_mask[i].tolist() == [0] * (P - len(p)) + [1] * (len(p) + len(c)) + [
            0
        ] * (T - len(c))
        assert b.completion_mask[i].tolist() == [1] * len(c) + [0] * (T - len(c))
        assert b.position_ids[i, P - len(p) : P + len(c)].tolist() == list(range(len(p) + len(c)))


@torch.no_grad()
def test_token_logprobs_matches_naive(tiny_model):
    lp = token_logprobs(tiny_model, pack(PROMPTS, COMPLETIONS, pad_id=0))
    assert lp.shape == (5, 7)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        want = _naive_token_logprobs(tiny_model, p, c)
        torch.testing.assert_close(lp[i, : len(c)], want, atol=1e-5, rtol=0)
        assert (lp[i, len(c) :] == 0).all()


@torch.no_grad()
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.7, 0, 1.0), (1.0, 4, 1.0), (1.3, 5, 0.8)]
)
def test_token_logprobs_processed_matches_naive(tiny_model, temperature, top_k, top_p):
    lp = token_logprobs(
        tiny_model,
        pack(PROMPTS, COMPLETIONS, pad_id=0),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        want = _naive_token_logprobs(tiny_model, p, c, temperature, top_k, top_p)
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(lp[i, : len(c)]), finite)  # same tokens filtered out
        torch.testing.assert_close(lp[i, : len(c)][finite], want[finite], atol=1e-5, rtol=0)


def test_chunking_same_values_and_gradients(tiny_model):
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0)
    coef = torch.linspace(-1.0, 2.0, batch.completion_mask.numel()).reshape(
        batch.completion_mask.shape
    )

    def grads(fn):
        tiny_model.zero_grad(set_to_none=True)
        val = fn()
        val.backward()
        g = {
            n: p.grad.detach().clone()
            for n, p in tiny_model.named_parameters()
            if p.grad is not None
        }
        tiny_model.zero_grad(set_to_none=True)
        return val.detach(), g

    def loss(chunk):
        lp = token_logprobs(tiny_model, batch, chunk_size=chunk, temperature=0.9)
        return (lp * coef).sum()

    def naive_loss():
        total = 0.0
        for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
            lp = _naive_token_logprobs(tiny_model, p, c, temperature=0.9)
            total = total + (lp * coef[i, : len(c)]).sum()
        return total

    v_small, g_small = grads(lambda: loss(3))
    v_big, g_big = grads(lambda: loss(2048))
    v_naive, g_naive = grads(naive_loss)
    assert set(g_small) == set(g_big) == set(g_naive) and len(g_small) > 5
    torch.testing.assert_close(v_small, v_big, atol=1e-5, rtol=0)
    torch.testing.assert_close(v_small, v_naive, atol=1e-4, rtol=0)
    for n in g_small:
        torch.testing.assert_close(g_small[n], g_big[n], atol=1e-5, rtol=1e-5, msg=n)
        torch.testing.assert_close(g_small[n], g_naive[n], atol=1e-4, rtol=1e-4, msg=n)


@torch.no_grad()
def test_return_hidden(tiny_model):
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0)
    lp, hidden = token_logprobs(tiny_model, batch, return_hidden=True)
    assert hidden.shape == (*batch.input_ids.shape, 32)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [
        (1.0, 0, 1.0),
        (0.5, 0, 1.0),
        (1.0, 3, 1.0),
        (1.0, 0, 0.6),
        (0.7, 4, 0.9),
        (1.5, 2, 0.5),
        (1.0, 0, 0.01),
        (2.0, 12, 0.99),
    ],
)
def test_process_logits_matches_hf_warpers_with_ties(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 4, (64, 12), generator=g).float()  # many exact ties
    logits[0] = 1.0  # all tied
    logits[1, :3] = 5.0  # tie at the top
    got = process_logits(logits.clone(), temperature, top_k, top_p)
    want = _hf_process(logits.clone(), temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[torch.isfinite(got)], want[torch.isfinite(want)])
    assert torch.isfinite(got).any(-1).all()  # every row keeps a token


@torch.no_grad()
def test_sequence_logprobs_in_original_order(tiny_model):
    # lengths deliberately not sorted; batch_size 2 forces several batches
    lp = sequence_logprobs(tiny_model, PROMPTS, COMPLETIONS, pad_id=0, batch_size=2)
    assert lp.dtype == torch.float64 and lp.shape == (5,)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        want = float(_naive_token_logprobs(tiny_model, p, c).double().sum())
        assert float(lp[i]) == pytest.approx(want, abs=1e-5)
    assert float(lp[3]) == 0.0  # empty completion
    lp_t = sequence_logprobs(
        tiny_model, PROMPTS, COMPLETIONS, pad_id=0, batch_size=3, temperature=0.6, top_k=5
    )
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        want = float(_naive_token_logprobs(tiny_model, p, c, 0.6, 5).double().sum())
        assert float(lp_t[i]) == pytest.approx(want, abs=1e-5) or (
            math.isinf(want) and math.isinf(float(lp_t[i]))
        )


# -- sampling and scoring agree on the density ------------------------------------------------
def _all_outcomes(vocab: int, eos: int, max_new: int) -> list[tuple[int, ...]]:
    """Every completion the sampler can return: ends at EOS (included) or at max_new."""
    non_eos = [t for t in range(vocab) if t != eos]
    out = []
    for L in range(max_new):
        out += [(*s, eos) for s in itertools.product(non_eos, repeat=L)]
    out += list(itertools.product(non_eos, repeat=max_new))
    return out


def _chi2_threshold(dof: int, z: float = 3.719) -> float:
    """Wilson–Hilferty upper quantile of χ²(dof); z = 3.719 is the 1e-4 tail."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _chi2(counts: Counter, probs: dict, n: int) -> tuple[float, int]:
    """Pearson χ² with cells of expected count < 5 pooled into one."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for o, p in probs.items():
        e = n * p
        if e >= 5:
            stat += (counts.get(o, 0) - e) ** 2 / e
            cells += 1
        else:
            pooled_obs += counts.get(o, 0)
            pooled_exp += e
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-12)
        cells += 1
    return stat, cells - 1


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_sampler_frequencies_match_scored_density(tiny_model, char_tok, temperature, top_k, top_p):
    eos, V, max_new, n = char_tok.eos_token_id, len(char_tok), 2, 3000
    # unequal: left padding in generate
    prompts = [
        char_tok("ab").input_ids,
        char_tok("fcade").input_ids,
    ]
    settings = SamplerSettings(
        temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new
    )
    samples = HFSampler(batch_size=2 * n).sample(
        tiny_model, char_tok, prompts, n, settings, seed=123
    )
    outcomes = _all_outcomes(V, eos, max_new)
    for p_ids, comps in zip(prompts, samples):
        assert len(comps) == n
        counts = Counter(tuple(c) for c in comps)
        assert set(counts) <= set(outcomes), (
            "sampler returned a completion outside the outcome space"
        )
        lp = sequence_logprobs(
            tiny_model,
            [p_ids] * len(outcomes),
            [list(o) for o in outcomes],
            char_tok.pad_token_id,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
        probs = dict(zip(outcomes, lp.exp().tolist()))
        # a proper density on the outcomes
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert all(probs[o] > 0 for o in counts), (
            "sampled an outcome the scored density calls impossible"
        )
        stat, dof = _chi2(counts, probs, n)
        assert dof >= 5
        assert stat < _chi2_threshold(dof), (stat, dof)
        if not settings.is_identity:  # power: the unprocessed density is clearly rejected
            raw = (
                sequence_logprobs(
                    tiny_model,
                    [p_ids] * len(outcomes),
                    [list(o) for o in outcomes],
                    char_tok.pad_token_id,
                )
                .exp()
                .tolist()
            )
            stat_raw, dof_raw = _chi2(counts, dict(zip(outcomes, raw)), n)
            assert stat_raw > 3 * _chi2_threshold(dof_raw)


# -- what the tests above leave out: dtypes, a biased head, autocast, frozen parts ----------
def test_pack_dtypes_positions_and_edge_cases():
    b = pack(PROMPTS, COMPLETIONS, pad_id=0)
    for t in (b.input_ids, b.attention_mask, b.position_ids, b.completion_mask):
        assert t.dtype == torch.long  # HF wants integer ids, positions and masks
    # pads get a valid position too: a learned position table would be indexed with it
    assert b.position_ids.min() == 0 and b.position_ids.max() < b.input_ids.shape[1]
    empty = pack([[1, 4], [1]], [[], []], pad_id=0)  # no completion tokens: one masked column
    assert empty.completion_mask.tolist() == [[0], [0]] and empty.input_ids.shape == (2, 3)
    with pytest.raises(ValueError, match="^3 prompts but 2 completions$"):
        pack([[1], [1], [1]], [[4], [5]], pad_id=0)


# 45 completion tokens: more rows than the hidden size (32), so a loop bounded by the wrong
# dimension misses some
LONG_COMPLETIONS = [c * 3 for c in COMPLETIONS]


@pytest.fixture(scope="module")
def bias_model(tiny_model):
    """The tiny model with a biased head (Llama's has none), the bias large enough to matter."""
    import copy

    model = copy.deepcopy(tiny_model)
    head = torch.nn.Linear(32, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(tiny_model.lm_head.weight)
        head.bias.copy_(torch.linspace(-1.5, 1.5, model.config.vocab_size))
    model.lm_head = head
    return model


def _grads_of(model, out, grad_out):
    """``∂(Σ grad_out·out)/∂θ`` for every trainable parameter, by name."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    gs = torch.autograd.grad(out, list(params.values()), grad_out, allow_unused=True)
    return {n: g for n, g in zip(params, gs) if g is not None}


def _naive_flat(model, prompts, completions, **kw):
    """The naive per-sequence log-probs, concatenated in ``lp[completion_mask]`` order."""
    return torch.cat(
        [_naive_token_logprobs(model, p, c, **kw) for p, c in zip(prompts, completions)]
    )


def test_biased_head_top_k_top_p_temperature_two_values_and_gradients(bias_model):
    # temperature exactly 2.0 (a typo'd "!= 2.0" test would skip it), masked targets (whose
    # gradient is the −softmax part only, as autograd through the masking gives), chunks of 5
    kw = dict(temperature=2.0, top_k=6, top_p=0.7)
    batch = pack(PROMPTS, LONG_COMPLETIONS, pad_id=0)
    mask = batch.completion_mask.bool()
    lp = token_logprobs(bias_model, batch, chunk_size=5, **kw)[mask]
    want = _naive_flat(bias_model, PROMPTS, LONG_COMPLETIONS, **kw)
    masked = torch.isinf(want)
    top_k_only = torch.isinf(
        _naive_flat(bias_model, PROMPTS, LONG_COMPLETIONS, temperature=2.0, top_k=6)
    )
    # top-k and top-p both bite
    assert lp.shape == (45,) and 0 < top_k_only.sum() < masked.sum() < 40
    assert torch.equal(torch.isinf(lp), masked)
    torch.testing.assert_close(lp[~masked], want[~masked], atol=1e-5, rtol=0)
    coef = torch.linspace(-1.0, 2.0, 45)
    got, ref = _grads_of(bias_model, lp, coef), _grads_of(bias_model, want, coef)
    assert set(got) == set(ref) and "lm_head.bias" in got
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("frozen", ["backbone", "head"])
def test_gradients_with_a_frozen_backbone_or_head(bias_model, frozen):
    # a trainable head on a frozen backbone (h needs no gradient) and LoRA's case, a frozen head
    for n, p in bias_model.named_parameters():
        p.requires_grad_(n.startswith("lm_head") == (frozen == "backbone"))
    try:
        batch = pack(PROMPTS, LONG_COMPLETIONS, pad_id=0)
        lp = token_logprobs(bias_model, batch, chunk_size=7, top_k=6)[batch.completion_mask.bool()]
        want = _naive_flat(bias_model, PROMPTS, LONG_COMPLETIONS, top_k=6)
        coef = torch.linspace(2.0, -1.0, 45)
        got, ref = _grads_of(bias_model, lp, coef), _grads_of(bias_model, want, coef)
        assert set(got) == set(ref)
        assert any(n.startswith("lm_head") for n in got) == (frozen == "backbone") and len(got) >= 2
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], atol=1e-4, rtol=1e-4, msg=n)
    finally:
        for p in bias_model.parameters():
            p.requires_grad_(True)


def test_autocast_bf16_projects_in_bf16(bias_model):
    # bf16-mixed: the head runs in bf16 (weight, bias and hidden states cast), its logits are
    # read in float32; the reference does the same by hand, and differs from float32 scoring
    batch = pack(PROMPTS, LONG_COMPLETIONS, pad_id=0)
    mask, P = batch.completion_mask.bool(), batch.prompt_len
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = token_logprobs(bias_model, batch, chunk_size=64)[mask]
        with torch.no_grad():
            lp_nograd = token_logprobs(bias_model, batch, chunk_size=64)[mask]
        hidden = bias_model.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).last_hidden_state
    h, targets, head = hidden[:, P - 1 : -1][mask], batch.input_ids[:, P:][mask], bias_model.lm_head
    logits = torch.nn.functional.linear(
        h.bfloat16(), head.weight.bfloat16(), head.bias.bfloat16()
    ).float()
    want = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    fp32 = torch.log_softmax(torch.nn.functional.linear(h.float(), head.weight, head.bias), -1)
    fp32 = fp32.gather(-1, targets[:, None])[:, 0]
    assert (want - fp32).abs().max() > 1e-3  # bf16 is visible at this tolerance
    torch.testing.assert_close(lp, want, atol=2e-6, rtol=0)
    torch.testing.assert_close(lp_nograd, want.detach(), atol=2e-6, rtol=0)
    # gradients in bf16 arithmetic: against autograd through the same bf16 reference (float32
    # ones are off by > 4e-3); autograd sums the bias gradient in bf16, hence its wider margin
    coef = torch.linspace(-1.0, 1.0, 45)
    got, ref = _grads_of(bias_model, lp, coef), _grads_of(bias_model, want, coef)
    assert set(got) == set(ref) and "lm_head.bias" in got
    for n in ref:
        assert got[n].dtype == torch.float32
        tol = 1e-2 if n == "lm_head.bias" else 1e-5
        torch.testing.assert_close(got[n], ref[n], atol=tol, rtol=tol, msg=n)


class _TableLM(torch.nn.Module):
    """A stand-in LM whose hidden state at a position is a table row of that position's token:
    hidden states and head chosen by hand, with exactly known gradients."""

    def __init__(self, table: torch.Tensor, head: torch.nn.Linear):
        super().__init__()
        self.decoder, self.head = _TableDecoder(table), head

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


class _TableDecoder(torch.nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, **_):
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=self.table[input_ids])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_head_gradients_accumulate_over_chunks_in_float32(dtype):
    # a bf16 head (float32 as the control), zero weights: every row's log p(0) has logit
    # gradient (½, −½) and h = 1, so with weights 512, 1, ..., 1 the head gradients are
    # ±(256 + 8·½) = ±260. Summed in bf16 (steps of 2 above 256) each ½ would round away and
    # leave 256; float32 keeps them.
    head = torch.nn.Linear(1, 2, bias=True).to(dtype)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    model = _TableLM(torch.ones(2, 1, dtype=dtype), head)
    lp = token_logprobs(model, pack([[0]], [[0] * 9], pad_id=1), chunk_size=1)
    torch.testing.assert_close(lp, torch.full((1, 9), -math.log(2)))
    lp.backward(torch.tensor([[512.0] + [1.0] * 8]))
    assert head.weight.grad.dtype == head.bias.grad.dtype == dtype
    assert head.weight.grad.tolist() == [[260.0], [-260.0]] and head.bias.grad.tolist() == [
        260.0,
        -260.0,
    ]
    assert model.decoder.table.grad.tolist() == [[0.0], [0.0]]  # zero weights pass nothing back


class _Wrapped:
    """peft's shape, without its attribute forwarding: the LM is behind ``get_base_model``."""

    def __init__(self, model):
        self._model = model

    def get_base_model(self):
        return self._model


@torch.no_grad()
def test_token_logprobs_unwraps_get_base_model(tiny_model):
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0)
    lp = token_logprobs(_Wrapped(tiny_model), batch)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        torch.testing.assert_close(
            lp[i, : len(c)], _naive_token_logprobs(tiny_model, p, c), atol=1e-5, rtol=0
        )


@torch.no_grad()
def test_token_logprobs_float32_under_a_float64_default(tiny_model):
    # the output and its buffers are float32 by construction, not by the global default
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0)
    want = token_logprobs(tiny_model, batch)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        lp = token_logprobs(tiny_model, batch, chunk_size=4)
    finally:
        torch.set_default_dtype(old)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, want, atol=1e-6, rtol=0)


@torch.no_grad()
def test_sequence_logprobs_batches_by_length_and_chunks_rows(tiny_model, monkeypatch, capsys):
    import disa.scoring as scoring

    lengths, rows = [], []
    token_logprobs_, chunk_forward_ = scoring.token_logprobs, scoring._chunk_forward

    def spy_token_logprobs(model, batch, **kw):
        lengths.append(batch.attention_mask.sum(-1).tolist())
        return token_logprobs_(model, batch, **kw)

    def spy_chunk_forward(h, *args):
        rows.append(h.shape[0])
        return chunk_forward_(h, *args)

    monkeypatch.setattr(scoring, "token_logprobs", spy_token_logprobs)
    monkeypatch.setattr(scoring, "_chunk_forward", spy_chunk_forward)
    lp = sequence_logprobs(tiny_model, PROMPTS, COMPLETIONS, pad_id=0, batch_size=2, chunk_size=3)
    # batches of ≤ 2 in order of total length (prompt + completion), so padding stays small
    assert [len(b) for b in lengths] == [2, 2, 1]
    flat = [n for b in lengths for n in b]
    assert flat == sorted(len(p) + len(c) for p, c in zip(PROMPTS, COMPLETIONS))
    # chunk_size reaches the projection: never more than 3 rows at once, every token scored
    assert max(rows) == 3 and sum(rows) == sum(map(len, COMPLETIONS))
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        assert float(lp[i]) == pytest.approx(
            float(_naive_token_logprobs(tiny_model, p, c).double().sum()), abs=1e-5
        )
    # a progress bar only when asked for, labelled, and cleared when done (leave=False)
    assert capsys.readouterr().err == ""
    sequence_logprobs(
        tiny_model, PROMPTS, COMPLETIONS, pad_id=0, batch_size=2, progress="scoring pairs"
    )
    err = capsys.readouterr().err
    assert "scoring pairs" in err and "3/3" not in err and not err.endswith("\n")


@pytest.mark.parametrize(("top_k", "top_p"), [(3, 1.0), (20, 1.0), (0, 1.0), (3, 0.5)])
def test_process_logits_one_row_and_identity(top_k, top_p):
    # one row (fewer rows than top_k), top_k above the vocabulary, and the identity settings:
    # logits 200 apart underflow to probability 0 in float32, yet nothing may be filtered
    logits = torch.tensor([[0.0, -200.0, 1.0, 2.5, -1.0, 0.5, 3.0, -250.0, 2.0, 1.5, -0.5, 0.25]])
    got = process_logits(logits.clone(), 1.0, top_k, top_p)
    want = _hf_process(logits.clone(), 1.0, top_k, top_p)
    assert torch.equal(got, want)
    if top_k in (0, 20) and top_p == 1.0:
        assert torch.equal(got, logits)
    else:
        assert torch.isinf(got).sum() >= 9


def test_batch_to_moves_every_tensor():
    # the meta device stands in for an accelerator (on CPU, moving to "cpu" is a no-op)
    b = pack(PROMPTS, COMPLETIONS, pad_id=0).to("meta")
    assert all(
        t.device.type == "meta"
        for t in (b.input_ids, b.attention_mask, b.position_ids, b.completion_mask)
    )
    assert b.input_ids.shape == (5, 13) and b.prompt_len == 6


def test_rows_of_different_scale_in_one_chunk():
    # h = 0 gives logits (0, 0), h = −120 gives (−120, −240): each row's logsumexp must be
    # shifted by its own max (a shift by the chunk's max would underflow to log 0 = −inf)
    head = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [2.0]]))
    model = _TableLM(torch.tensor([[0.0], [-120.0]]), head)
    for grad in (False, True):  # the plain and the autograd path share the chunk forward
        with torch.set_grad_enabled(grad):
            lp = token_logprobs(model, pack([[0]], [[1, 1, 0]], pad_id=0), chunk_size=8)
        # rows: h=0 → token 1, h=−120 → token 1, h=−120 → token 0
        assert lp[0].tolist() == pytest.approx([-math.log(2), -120.0, 0.0], abs=1e-6)


def test_decoder_sees_the_padding_mask_and_positions_without_a_cache(tiny_model):
    # HF's Llama would also infer the segments from the position ids, but not every backbone
    # does; and a KV cache is memory wasted on scoring
    calls = []

    class Recording(torch.nn.Module):
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, **kw):
            calls.append(kw)
            return self.decoder(**kw)

    class Model:
        def get_decoder(self):
            return Recording(tiny_model.get_decoder())

        def get_output_embeddings(self):
            return tiny_model.get_output_embeddings()

    batch = pack(PROMPTS, COMPLETIONS, pad_id=0)
    with torch.no_grad():
        lp = token_logprobs(Model(), batch)
    (kw,) = calls
    assert (
        set(kw) == {"input_ids", "attention_mask", "position_ids", "use_cache"}
        and kw["use_cache"] is False
    )
    assert kw["input_ids"] is batch.input_ids and kw["attention_mask"] is batch.attention_mask
    assert kw["position_ids"] is batch.position_ids
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        torch.testing.assert_close(
            lp[i, : len(c)], _naive_token_logprobs(tiny_model, p, c), atol=1e-5, rtol=0
        )


def test_process_logits_defaults_are_the_identity_and_leading_dims_are_rows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 12, generator=g) * 3
    assert torch.equal(process_logits(logits.clone()), logits)  # the model's own density
    # [B, T, V] (every position's logits) is processed row by row, like the [N, V] rows that
    # the HF warpers check above
    for temperature, top_k, top_p in [(0.8, 5, 1.0), (1.0, 0, 0.6), (1.2, 7, 0.7)]:
        got = process_logits(logits.clone(), temperature, top_k, top_p)
        rows = process_logits(logits.reshape(6, 12).clone(), temperature, top_k, top_p)
        assert torch.equal(got, rows.reshape(2, 3, 12)) and torch.isinf(got).any()
        assert torch.equal(
            rows, _hf_process(logits.reshape(6, 12).clone(), temperature, top_k, top_p)
        )


def test_sampler_left_pads_prompts_as_the_tokenizer_does(char_tok):
    # HFSampler pads prompt ids itself (transformers 4's tokenizer.pad logs advice per tokenizer)
    from disa.sampling.hf import _left_padded

    want = char_tok.pad({"input_ids": PROMPTS}, return_tensors="pt")
    got = _left_padded(PROMPTS, char_tok.pad_token_id, "cpu")
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(
        got["attention_mask"], want["attention_mask"]
    )

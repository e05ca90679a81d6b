"""The fused log-prob backends (``scoring.logprob_impl=liger | cce``): which one runs where, the
refusals and their messages (CPU), the plumbing around a kernel (CPU, a stand-in kernel of the
documented contract), and equality with the chunked path on a GPU (``gpu``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from disa import scoring
from disa.scoring import (
    LOGPROB_IMPLS,
    LogProbBackendError,
    logprob_impl_problem,
    pack,
    token_logprobs,
)

PROMPTS = [[1, 4, 5], [1, 6], [1, 7, 8, 9, 4, 5], [1]]
COMPLETIONS = [[6, 7, 8, 2], [4], [5, 0, 6, 7, 9, 9, 2], [8, 8, 2]]


@pytest.fixture
def installed(monkeypatch):
    """Pretend both extras are installed (find_spec finds every module)."""
    real = importlib.util.find_spec
    fake = types.SimpleNamespace(name="fake")
    monkeypatch.setattr(
        scoring.importlib.util,
        "find_spec",
        lambda name, *a: fake if name in ("liger_kernel", "cut_cross_entropy") else real(name, *a),
    )


def test_chunked_runs_anywhere_and_unknown_names_are_refused_with_the_allowed_ones():
    assert logprob_impl_problem("chunked", on_cuda=False) is None
    msg = logprob_impl_problem("fused", on_cuda=True)
    assert msg == "scoring.logprob_impl='fused' is not known; allowed: ['chunked', 'liger', 'cce']"


@pytest.mark.parametrize("impl", ["liger", "cce"])
def test_fused_backends_are_refused_off_cuda_naming_the_setting(impl, installed):
    msg = logprob_impl_problem(impl, on_cuda=False)
    assert msg.startswith(f"scoring.logprob_impl={impl!r} runs Triton kernels on a CUDA device")
    assert "allowed: 'chunked'" in msg


@pytest.mark.parametrize("impl,module", [("liger", "liger_kernel"), ("cce", "cut_cross_entropy")])
def test_a_missing_extra_is_named_with_its_install_command(impl, module, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        scoring.importlib.util,
        "find_spec",
        lambda name, *a: None if name == module else real(name, *a),
    )
    msg = logprob_impl_problem(impl, on_cuda=True, half_precision=True)
    assert msg == (
        f"scoring.logprob_impl={impl!r} is not installed: it needs the {impl!r} extra: "
        f"pip install 'disa[{impl}]' (or use scoring.logprob_impl=chunked)"
    )


def test_cce_needs_half_precision_liger_does_not(installed):
    assert "needs bf16 or fp16" in logprob_impl_problem("cce", on_cuda=True, half_precision=False)
    assert logprob_impl_problem("cce", on_cuda=True, half_precision=True) is None
    assert logprob_impl_problem("cce", on_cuda=True) is None  # precision not known yet
    assert logprob_impl_problem("liger", on_cuda=True, half_precision=False) is None


def test_token_logprobs_refuses_a_fused_backend_on_cpu_tensors(tiny_model, installed):
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0)
    with pytest.raises(
        LogProbBackendError, match="scoring.logprob_impl='liger' runs Triton kernels on a CUDA"
    ):
        token_logprobs(tiny_model, batch, impl="liger")


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(top_k=3), dict(top_p=0.9)])
def test_processed_densities_take_the_chunked_path_whatever_the_backend(tiny_model, kw):
    # a fused kernel computes the model's own softmax only; log μ of a processed sampler does not
    # reach it (on CPU it would be refused), and the values are the chunked path's exactly
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0)
    with torch.no_grad():
        want = token_logprobs(tiny_model, batch, chunk_size=5, **kw)
        got = token_logprobs(tiny_model, batch, chunk_size=5, impl="cce", **kw)
    assert torch.equal(got, want)


def _standin_liger(monkeypatch, calls):
    """A stand-in for liger's functional entry point with its documented contract: per-token
    cross-entropy ``[N]`` (float32) of ``input @ weight.T + bias`` at ``target``."""

    def liger_fused_linear_cross_entropy(
        input, weight, target, bias=None, reduction="mean", accum_dtype=None
    ):
        calls.append(
            {
                "shape": tuple(input.shape),
                "dtype": input.dtype,
                "reduction": reduction,
                "accum_dtype": accum_dtype,
                "bias": bias is not None,
            }
        )
        return F.cross_entropy(F.linear(input, weight, bias).float(), target, reduction=reduction)

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = liger_fused_linear_cross_entropy
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)
    monkeypatch.setattr(scoring, "logprob_impl_problem", lambda *a, **k: None)  # no CUDA here


def test_fused_plumbing_gives_the_chunked_values_and_gradients(monkeypatch):
    # What the harness does around a kernel: gather the completion rows, pass the head's weight
    # and bias, negate the per-token loss, scatter it back into [B, T], let gradients through
    calls = []
    _standin_liger(monkeypatch, calls)
    model = tiny_llama(16, seed=5).train()
    with torch.no_grad():  # a biased head, so that the bias is passed and gets its gradient
        model.lm_head.bias = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 16))
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0)
    mask = batch.completion_mask.bool()
    coef = torch.linspace(
        -1.0, 2.0, int(mask.sum())
    )  # per-token gradients that differ, as DISA's do
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for impl in ("chunked", "liger"):
        lp = token_logprobs(model, batch, chunk_size=3, impl=impl)
        results.append((lp.detach(), torch.autograd.grad((lp[mask] * coef).sum(), params)))
    (want, want_g), (got, got_g) = results
    assert calls == [
        {
            "shape": (int(mask.sum()), 32),
            "dtype": torch.float32,
            "reduction": "none",
            "accum_dtype": torch.float32,
            "bias": True,
        }
    ]
    assert (got[~mask] == 0).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_validation_refuses_a_fused_backend_on_a_cpu_trainer(repo, installed):
    from hydra import compose, initialize_config_dir

    from disa.config import ConfigError, validate

    with initialize_config_dir(str(repo / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["scoring.logprob_impl=liger", "trainer=cpu"])
        with pytest.raises(
            ConfigError, match="scoring.logprob_impl='liger' runs Triton kernels on a CUDA device"
        ):
            validate(cfg)
        cfg = compose(
            "config",
            overrides=["scoring.logprob_impl=cce", "trainer=gpu", "trainer.precision=32-true"],
        )
        with pytest.raises(ConfigError, match="scoring.logprob_impl='cce' needs bf16 or fp16"):
            validate(cfg)
        validate(
            compose("config", overrides=["scoring.logprob_impl=cce", "trainer=gpu"])
        )  # bf16-mixed
        with pytest.raises(
            ConfigError, match=r"scoring.logprob_impl='x' is not known; allowed: \['chunked'"
        ):
            validate(compose("config", overrides=["scoring.logprob_impl=x"]))


# -- the real kernels against the chunked path ---------------------------------------------------
def _qwen_like(vocab: int, hidden: int = 256, device: str = "cuda"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        initializer_range=0.05,
    )
    return Qwen2ForCausalLM(cfg).to(device).train()


def compare_with_chunked(
    model, impl: str, bf16: bool, batch_shape=(8, 32, 64)
) -> tuple[float, float]:
    """``(max |Δ log p|, max over parameters of max |Δ grad| / max |grad|)`` of ``impl`` against
    the chunked path, on random tokens, with per-token upstream gradients that differ (as
    DISA's do) and ``bf16`` autocast or float32."""
    device = next(model.parameters()).device
    B, P, T = batch_shape
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (B, P + T), generator=g)
    batch = pack(ids[:, :P].tolist(), ids[:, P:].tolist(), pad_id=0).to(device)
    mask = batch.completion_mask.bool()
    coef = torch.randn(int(mask.sum()), generator=g).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for name in ("chunked", impl):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            lp = token_logprobs(model, batch, chunk_size=128, impl=name)
        out[name] = (lp.detach(), torch.autograd.grad((lp[mask] * coef).sum(), params))
    (want, want_g), (got, got_g) = out["chunked"], out[impl]
    grad = max(
        ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(got_g, want_g)
    )
    return (got - want).abs().max().item(), grad


#: bf16 projects and forms the logits' gradient in bf16 on both paths, in different orders: about
#: 1% of the largest gradient entry (1.1e-2 measured for liger in Triton's interpreter)
TOLERANCE = {True: (2e-2, 5e-2), False: (1e-4, 1e-4)}


@pytest.mark.skipif(
    importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None,
    reason="needs the 'liger' extra (and triton)",
)
def test_liger_kernel_equals_chunked_in_tritons_interpreter(tmp_path):
    # TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors (slowly), so where liger and triton
    # are installed the real kernel is checked without a GPU. (cut-cross-entropy's kernels call a
    # libdevice function the interpreter lacks; they are checked on a GPU only.)
    code = (
        "import sys; sys.path.insert(0, {tests!r}); import test_logprob_backends as t; "
        "from disa import scoring; scoring.logprob_impl_problem = lambda *a, **k: None; "
        "print(*t.compare_with_chunked(t._qwen_like(512, hidden=32, device='cpu'), 'liger', False, (3, 4, 8)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code.format(tests=str(Path(__file__).parent))],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    value, grad = map(float, proc.stdout.split()[-2:])
    assert value < TOLERANCE[False][0] and grad < TOLERANCE[False][1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
@pytest.mark.parametrize("impl", ["liger", "cce"])
def test_fused_equals_chunked_on_gpu(impl, precision):
    """Values and gradients of the fused kernel against the chunked path, at Qwen2.5's
    vocabulary, tied embeddings."""
    if importlib.util.find_spec(LOGPROB_IMPLS[impl][0]) is None:
        pytest.skip(f"the {impl!r} extra is not installed")
    bf16 = precision == "bf16-mixed"
    if impl == "cce" and not bf16:
        with pytest.raises(LogProbBackendError, match="needs bf16 or fp16"):
            token_logprobs(
                _qwen_like(1024), pack(PROMPTS, COMPLETIONS, pad_id=0).to("cuda"), impl="cce"
            )
        return
    value, grad = compare_with_chunked(_qwen_like(151_936), impl, bf16)
    print(
        f"{impl} {precision}: max |Δ log p| {value:.3g}, max relative gradient difference {grad:.3g}"
    )
    assert value < TOLERANCE[bf16][0] and grad < TOLERANCE[bf16][1]

"""The Triton log-prob kernel (grpo_speech/logprobs_triton.py) against full logits in float64.

Run: .venv/bin/python -m pytest -q tests/test_logprobs_triton.py
No GPU needed: Triton's interpreter runs the same kernels on CPU tensors. It must be switched on
(TRITON_INTERPRET=1) before triton is first imported, and other tests may already have imported
it, so unless the variable is set, `test_kernels_under_the_interpreter` runs this file again in a
fresh process with it set, and the kernel tests here are skipped. Shapes are small and odd (not
multiples of the 16-wide interpreter tiles) and the chunk buffer tiny, so every tile edge and
chunk boundary is crossed in seconds.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

from grpo_speech.logprobs import token_logprobs

INTERPRETER_ON = os.environ.get("TRITON_INTERPRET") == "1"


def test_kernels_under_the_interpreter():
    if INTERPRETER_ON:
        pytest.skip("this process is the interpreter run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" in out.stdout  # the kernel tests ran, this one skipped


def _bf16_dot_in_fp32(dot):
    """Triton 3.6's interpreter keeps bf16 values as their uint16 bits and multiplies the bits in
    tl.dot (garbage). Widen bf16 operands to fp32 first: products of bf16 values are exact in fp32,
    so this is the GPU's bf16 dot with fp32 accumulation, up to summation order."""
    import triton.language as tl

    def exact_dot(builder, a, b, acc, input_precision, max_num_imprecise_acc):
        a, b = (builder.cast_impl(x, tl.float32) if x.dtype == tl.bfloat16 else x for x in (a, b))
        return dot(builder, a, b, acc, input_precision, max_num_imprecise_acc)

    return exact_dot


@pytest.fixture(scope="module")
def lt():
    if not INTERPRETER_ON:
        pytest.skip("kernel tests run in the TRITON_INTERPRET=1 child process")
    from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder

    module = importlib.import_module("grpo_speech.logprobs_triton")
    assert isinstance(module._forward_kernel, InterpretedFunction)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InterpreterBuilder, "create_dot", _bf16_dot_in_fp32(InterpreterBuilder.create_dot))
        yield module


def _reference(hidden, weight, targets, scale, upstream):
    """Full N x V logits in float64: log-probs, input gradients, and |dL/dlogits| for error bounds."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = (h @ w.t()) / scale
    logits.retain_grad()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(0, w.shape[0] - 1)[..., None])[..., 0]
    (logp * upstream).sum().backward()
    return logp.detach(), h.grad, w.grad, logits.grad.abs() / scale


def _inputs(N, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (3.0 / H ** 0.5)).to(dtype)  # logits of order +-10
    targets = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, generator=g, dtype=torch.float64)
    # Masked rows: ignore ids (clamped to 0 and V - 1, like the chunked path) with zero upstream.
    targets[[2, 9, 30]] = torch.tensor([-100, V + 7, -100])
    upstream[[2, 9, 30]] = 0.0
    return hidden, weight, targets, upstream


# N = 33 rows, H = 37, V = 83: none a multiple of the 16-wide tiles. Logit scale 8, temperature 0.7.
N, H, V, SCALE, TEMP = 33, 37, 83, 8.0, 0.7
MASKED = [2, 9, 30]


def _run(lt, monkeypatch, dtype, hidden_grad, weight_grad, buffer_bytes, seed=0, logit_scale=SCALE, H=H):
    monkeypatch.setattr(lt, "BUFFER_BYTES", buffer_bytes)
    monkeypatch.setattr(lt, "MAX_CHUNK_ROWS", 10)  # 4 launches of the log-sum-exp-only forward for 33 rows
    hidden, weight, targets, upstream = _inputs(N, H, V, dtype, seed)
    h = hidden.clone().requires_grad_(hidden_grad)
    w = weight.clone().requires_grad_(weight_grad)
    logp = token_logprobs(h, w, targets, logit_scale=logit_scale, temperature=TEMP, backend="triton")
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    if hidden_grad or weight_grad:
        (logp * upstream.to(torch.float32)).sum().backward()
    ref = _reference(hidden, weight, targets, SCALE * TEMP, upstream)
    return logp, h.grad, w.grad, ref


# Buffers: 640 B (fp32) = 1 row of 83 logits in the frozen forward (33 chunks); in the trainable
# backward 640 / (4 B x 16) = 10 rows x 16 vocabulary columns per chunk, so grad_W accumulates over
# 4 row blocks (its fp32 path). 1 MB: one chunk for everything.
@pytest.mark.parametrize("buffer_bytes", [640, 2**20])
@pytest.mark.parametrize("hidden_grad,weight_grad", [(True, False), (True, True), (False, True)])
def test_fp32_matches_float64_full_logits(lt, monkeypatch, buffer_bytes, hidden_grad, weight_grad):
    logp, gh, gw, (ref_logp, ref_gh, ref_gw, _) = _run(lt, monkeypatch, torch.float32, hidden_grad,
                                                      weight_grad, buffer_bytes)
    # fp32 arithmetic on logits of order 10 and sums of <= 83 terms: errors ~1e-6; 1e-5 is tight
    # against the 1e-1..1e1 size of these values (see the wrong-scale test for how far off a bug is).
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-5)
    if hidden_grad:
        torch.testing.assert_close(gh.double(), ref_gh, rtol=0, atol=1e-5)
        assert torch.all(gh[MASKED] == 0)  # zero upstream gradient contributes exactly nothing
    else:
        assert gh is None
    if weight_grad:
        torch.testing.assert_close(gw.double(), ref_gw, rtol=0, atol=1e-5)
    else:
        assert gw is None


@pytest.mark.parametrize("hidden_grad,weight_grad", [(True, False), (True, True)])
def test_bf16_gradients_within_rounding_bound(lt, monkeypatch, hidden_grad, weight_grad):
    # The float64 reference sees the same bf16 values. Log-probs: bf16 x bf16 products are exact in
    # fp32, so fp32 accuracy (1e-5). Gradients: bf16 keeps 8 significant bits, so one rounding
    # errs by at most u = 2^-8 relative. The logits' gradient G is rounded to bf16 before the matmul
    # with W (or h): at most u (|G| @ |W|) in all; the result is rounded once more (u |ref|), and on
    # the frozen path twice (d, then g * d). So |err| <= u (2 |ref| + |G| @ |W|).
    logp, gh, gw, (ref_logp, ref_gh, ref_gw, abs_G) = _run(lt, monkeypatch, torch.bfloat16, hidden_grad,
                                                          weight_grad, buffer_bytes=7 * V * 2)
    hidden, weight, _, _ = _inputs(N, H, V, torch.bfloat16)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-5)
    assert gh.dtype == torch.bfloat16
    bound_h = 2 ** -8 * (2 * ref_gh.abs() + abs_G @ weight.double().abs()) + 1e-7
    assert torch.all((gh.double() - ref_gh).abs() <= bound_h)
    if weight_grad:
        assert gw.dtype == torch.bfloat16
        bound_w = 2 ** -8 * (2 * ref_gw.abs() + abs_G.t() @ hidden.double().abs()) + 1e-7
        assert torch.all((gw.double() - ref_gw).abs() <= bound_w)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_hidden_size_a_multiple_of_the_k_tile(lt, monkeypatch, weight_grad):
    # H = 48 = 3 x 16 takes the kernel's unmasked K loop (Granite's 2048 / 4096 do on GPU).
    logp, gh, gw, (ref_logp, ref_gh, ref_gw, _) = _run(lt, monkeypatch, torch.float32, True, weight_grad,
                                                      640, H=48)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(gh.double(), ref_gh, rtol=0, atol=1e-5)
    if weight_grad:
        torch.testing.assert_close(gw.double(), ref_gw, rtol=0, atol=1e-5)


def test_tolerances_catch_a_wrong_scale(lt, monkeypatch):
    # The same run with the temperature left out of the scale (logit_scale 8 against 8 x 0.7) is off
    # by far more than the 1e-5 used above: the tests can fail.
    logp, gh, _, (ref_logp, ref_gh, _, _) = _run(lt, monkeypatch, torch.float32, True, False, 2**20,
                                                logit_scale=SCALE / TEMP)
    assert (logp.double() - ref_logp).abs().max() > 1e-2
    assert (gh.double() - ref_gh).abs().max() > 1e-2


def test_no_grad_pass_and_probabilities_sum_to_one(lt):
    hidden, weight, _, _ = _inputs(N, H, V, torch.float32)
    every_V = torch.arange(V)
    with torch.no_grad():
        logp = token_logprobs(hidden[:1].expand(V, H), weight, every_V, logit_scale=SCALE, backend="triton")
    assert logp.grad_fn is None
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_backend_choice(monkeypatch):
    hidden, weight, targets, _ = _inputs(N, H, V, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        token_logprobs(hidden, weight, targets, backend="cuda")
    # CPU tensors take the chunked path under "auto": the Triton module is never imported.
    monkeypatch.delitem(sys.modules, "grpo_speech.logprobs_triton", raising=False)
    token_logprobs(hidden, weight, targets)
    assert "grpo_speech.logprobs_triton" not in sys.modules

"""Training-mode gradients through the runtime equal transformers' for every family (fp32, same weights).

Loads each tiny random HF model into the runtime (where q|k|v and gate|up get fused for inference),
makes every parameter trainable, and compares the causal-LM loss and the gradient of every
parameter, mapped back to HF names and layouts by ``runtime_to_hf`` (GPT-2's fused, Conv1D-layout
``c_attn`` included), to transformers' eager model: 1e-4 relative to each gradient's largest entry.

Run: ``.venv/bin/python -m pytest tests/models/test_grad_parity.py``
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimlm import kernels
from slimlm.loaders import load_model
from slimlm.models.families import runtime_to_hf
from tests.helpers.models import TINY, make_hf_model


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # logits: [B, T, V], ids: [B, T] -> next-token cross entropy
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _rel_close(a: torch.Tensor, b: torch.Tensor, what: str, rel: float = 1e-4, floor: float = 0.0) -> None:
    # floor: for gradients that are zero in exact math (a key bias under softmax) both sides are noise
    tol = rel * max(b.abs().max().item(), floor, 1e-30)
    err = (a - b).abs().max().item()
    assert err <= tol, f"{what}: max diff {err:.3e} > {tol:.3e}"


def _runtime_grads(lm, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    model = lm.model
    model.requires_grad_(True)
    loss = _lm_loss(model(ids), ids)
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        assert p.grad is not None, f"runtime parameter {n} got no gradient"
        grads[n] = p.grad
    return loss.detach(), runtime_to_hf(lm.config, grads, tied=model.ties_lm_head())


@pytest.mark.parametrize("family", sorted(TINY))
def test_loss_and_every_gradient_match_transformers(family, tmp_path):
    hf = make_hf_model(family, tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.model.fuse_projections_() >= 0  # fusion is on after loading (q|k|v of plain linears)
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 16))
    ref_loss = _lm_loss(hf(ids).logits, ids)
    ref_loss.backward()
    ref = {n: p.grad for n, p in hf.named_parameters()}
    loss, grads = _runtime_grads(lm, ids)
    _rel_close(loss, ref_loss.detach(), "loss")
    assert set(grads) == set(ref), f"names differ: {sorted(set(grads) ^ set(ref))}"
    scale = max(g.abs().max().item() for g in ref.values() if g is not None)
    for n, g in ref.items():
        assert g is not None
        _rel_close(grads[n], g, n, floor=1e-4 * scale)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_train_and_eval_modes_give_the_same_gradients(family, tmp_path):
    """The runtime has no dropout of its own: ``train()`` must not change logits or gradients (a
    training loop calls it), and eval-mode transformers stays the oracle."""
    make_hf_model(family, tmp_path)
    lm = load_model(str(tmp_path))
    ids = torch.randint(0, 256, (1, 12))
    lm.model.eval()
    loss_eval, g_eval = _runtime_grads(lm, ids)
    lm.model.zero_grad(set_to_none=True)
    lm.model.train()
    loss_train, g_train = _runtime_grads(lm, ids)
    assert torch.equal(loss_eval, loss_train)
    for n, g in g_eval.items():
        torch.testing.assert_close(g_train[n], g, rtol=0, atol=0)


def test_trained_weights_reach_the_fused_inference_path(tmp_path):
    """An optimizer step on the separate q/k/v Parameters changes what the fused decode matmul sees."""
    make_hf_model("llama", tmp_path)
    lm = load_model(str(tmp_path))
    attn = lm.model.model.layers[0].self_attn
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        before = lm.model(ids)
    lm.model.requires_grad_(True)
    opt = torch.optim.SGD(lm.model.parameters(), lr=0.5)
    _lm_loss(lm.model(ids), ids).backward()
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0
    opt.step()
    lm.model.requires_grad_(False)
    with torch.no_grad():
        fused = lm.model(ids)
        assert attn._fusion is not None  # fusion survived training (views updated in place)
        attn._fusion = lm.model.model.layers[0].mlp._fusion = None  # reference: unfused modules
        for layer in lm.model.model.layers[1:]:
            layer.self_attn._fusion = layer.mlp._fusion = None
        unfused = lm.model(ids)
    assert not torch.allclose(before, fused)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_decode_kernels_still_serve_inference_after_training(tmp_path, monkeypatch):
    """Under no_grad/inference_mode the fused C++ decode path is taken; with grad needed it is not."""
    if kernels.load() is None:
        pytest.skip(f"decode kernels unavailable: {kernels.status()}")
    make_hf_model("llama", tmp_path)
    lm = load_model(str(tmp_path))
    calls: list[str] = []
    real = kernels._ext
    spy = type("Spy", (), {"__getattr__": lambda self, n: (calls.append(n), getattr(real, n))[1]})()
    monkeypatch.setattr(kernels, "_ext", spy)
    x = torch.randn(1, 1, lm.config.hidden_size)
    attn = lm.model.model.layers[0].self_attn
    with torch.inference_mode():
        attn._fused_qkv(x)
    assert calls == ["gemv"], calls
    calls.clear()
    lm.model.requires_grad_(True)
    y = attn._fused_qkv(x)
    assert y is None and calls == []  # training: separate modules, autograd reaches their Parameters

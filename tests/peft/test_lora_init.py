"""PiSSA and LoftQ initializations.

PiSSA against peft's own ``init_lora_weights="pissa"`` on the transformers model of the same tiny
config (A, B and the residual base weights, logits), and both save forms: the PiSSA adapter (peft
rebuilds the residual on load) and the plain rank-2r LoRA for the original base that peft's
``path_initial_model_for_weight_conversion`` writes.

LoftQ: peft 0.21's ``loftq_init`` needs bitsandbytes on a CUDA/XPU device (it moves the weight there),
so on this CPU the oracle is a reference written here from the paper (Li et al. 2023, Algorithm 1:
``Q_t = q(W - A_{t-1} B_{t-1}^T)``, ``A_t B_t^T = SVD_r(W - Q_t)``) with an independent NF4
quantizer (bitsandbytes' 16 code values, block-64 absmax, nearest code), plus the property the method
exists for: ``||W - (Q + s B A)|| < ||W - q(W)||``.

Run: ``.venv/bin/python -m pytest tests/peft/test_lora_init.py``
"""

from __future__ import annotations

import pytest
import torch

from slimlm.loaders import load_model
from slimlm.peft import LoraConfig, adapter_modules, apply_peft, load_adapter, merge_and_unload, save_adapter
from slimlm.utils.errors import ConfigError
from tests.helpers.models import make_hf_model
from tests.peft.test_lora_invariants import ALL, _data, _train
from tests.peft.test_lora_peft_interop import _close, _no_gptqmodel  # noqa: F401  (autouse fixture)

peft = pytest.importorskip("peft")

# bitsandbytes' NF4 code values (QLoRA paper, Appendix E), written out independently of slimlm
NF4_CODES = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                          -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                          0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                          0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def _hf_path(runtime: str) -> str:
    return "base_model.model." + runtime  # llama: runtime paths equal the HF ones


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_init_equals_peft(rslora: bool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hf = make_hf_model("llama", tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    ids = _data()
    with torch.no_grad():
        plain = lm.model(ids)
    apply_peft(lm.model, LoraConfig(r=4, lora_alpha=16, target_modules=ALL, init_lora_weights="pissa", use_rslora=rslora))
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL, init_lora_weights="pissa",
                                                 use_rslora=rslora))
    pm.eval()
    theirs = dict(pm.named_modules())
    for path, m in adapter_modules(lm.model).items():
        t = theirs[_hf_path(path)]
        torch.testing.assert_close(m.lora_A.weight, t.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.lora_B.weight, t.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.base_layer.weight, t.base_layer.weight, rtol=1e-5, atol=1e-6)  # the residual
        assert not torch.allclose(m.base_layer.weight, load_model(str(tmp_path / "base")).model.get_submodule(path).weight)
    with torch.no_grad():
        ours = lm.model(ids)
        _close(ours, pm(ids).logits)
        torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4)  # W_res + s B A = W at the start


def test_pissa_adapter_saves_both_ways_peft_reads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    make_hf_model("llama", tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    apply_peft(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                    init_lora_weights="pissa"))
    _train(lm.model, steps=5)
    ids = _data()
    with torch.no_grad():
        ref = lm.model(ids)
    save_adapter(lm.model, tmp_path / "pissa")
    save_adapter(lm.model, tmp_path / "as_lora", convert_pissa_to_lora=True)
    for folder, r in (("pissa", 4), ("as_lora", 8)):
        hf = make_hf_model("llama", tmp_path / f"hf_{folder}")  # the original base weights
        pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / folder))
        pm.eval()
        assert pm.peft_config["default"].r == r
        with torch.no_grad():
            _close(pm(ids).logits, ref)
        fresh = load_model(str(tmp_path / "base"))
        load_adapter(fresh.model, tmp_path / folder)
        with torch.no_grad():
            got = fresh.model(ids)
        if folder == "pissa":
            assert torch.equal(got, ref)  # the residual rebuilt by the same SVD: bit for bit
        else:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # folding PiSSA back gives W_res + s B A on the plain base
        merge_and_unload(lm.model)
        torch.testing.assert_close(lm.model(ids), ref, rtol=1e-5, atol=1e-5)


# --- LoftQ ------------------------------------------------------------------------------------------
def _ref_nf4(w: torch.Tensor) -> torch.Tensor:
    """NF4 round trip, block 64 absmax, nearest code (written from the QLoRA paper)."""
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    codes = (blocks / absmax).unsqueeze(-1).sub(NF4_CODES).abs().argmin(-1)
    return (NF4_CODES[codes] * absmax).reshape(w.shape)


def _ref_int4(w: torch.Tensor, g: int) -> torch.Tensor:
    """Symmetric 4-bit RTN per group of g inputs, GPTQ's convention: scale = absmax / 7.5, codes in [-8, 7]."""
    wg = w.reshape(w.shape[0], -1, g)
    scale = wg.abs().amax(-1, keepdim=True) / 7.5
    return (torch.clamp(torch.round(wg / scale), -8, 7) * scale).reshape(w.shape)


def _ref_loftq(w: torch.Tensor, r: int, iters: int, quant) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """LoftQ Algorithm 1: returns (Q, the rank-r correction A B^T)."""
    lowrank = torch.zeros_like(w)
    for _ in range(iters):
        q = quant(w - lowrank)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        lowrank = (u[:, :r] * s[:r]) @ vh[:r]
    return q, lowrank


@pytest.mark.parametrize("quantizer,iters", [("nf4", 1), ("nf4", 4), ("int4", 3)])
def test_loftq_matches_the_paper_and_absorbs_the_quantization_error(quantizer: str, iters: int, tmp_path) -> None:  # type: ignore[no-untyped-def]
    make_hf_model("llama", tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    orig = {p: lm.model.get_submodule(p).weight.detach().clone() for p in
            [n for n, m in lm.model.named_modules() if n.endswith(tuple(ALL))]}
    report = apply_peft(lm.model, LoraConfig(r=8, lora_alpha=16, target_modules=ALL, init_lora_weights="loftq",
                                             loftq_quantizer=quantizer, loftq_iter=iters, loftq_group_size=32))
    assert set(report.targets) == set(orig)
    quant = _ref_nf4 if quantizer == "nf4" else (lambda w: _ref_int4(w, 32))
    for path, m in adapter_modules(lm.model).items():
        assert m.base_layer.kind == ("nf4" if quantizer == "nf4" else "int4_weight")
        w = orig[path]
        q, lowrank = _ref_loftq(w, 8, iters, quant)
        ours_q = m.base_layer.dense_weight()
        ours_lr = m.delta_weight().detach()
        if iters == 1:  # one round: the same codes and the same correction as the paper's reference
            torch.testing.assert_close(ours_q, q, rtol=0, atol=1e-5 * float(w.abs().max()))
            torch.testing.assert_close(ours_lr, lowrank, rtol=0, atol=1e-4 * float(lowrank.abs().max()))
        else:  # later rounds amplify float-rounding ties: check the last step on our own Q, and the gain
            _, last = _ref_loftq(w, 8, 1, lambda _w, q=ours_q: q)
            assert float((ours_lr - last).norm()) <= 1e-4 * float(last.norm()), path
            q1, lr1 = _ref_loftq(w, 8, 1, quant)
            assert float((w - ours_q - ours_lr).norm()) <= 1.02 * float((w - q1 - lr1).norm()), path
        err_base = float((w - quant(w)).norm())
        err_loftq = float((w - (ours_q + ours_lr)).norm())
        assert err_loftq < 0.9 * err_base, (path, err_loftq, err_base)


def test_loftq_model_trains_saves_and_loads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    make_hf_model("llama", tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    ids = _data()
    with torch.no_grad():
        plain = lm.model(ids)
    cfg = LoraConfig(r=4, target_modules=ALL, init_lora_weights="loftq", loftq_iter=2)
    apply_peft(lm.model, cfg)
    qlora = load_model(str(tmp_path / "base"))  # plain QLoRA: NF4 base, no-op adapter
    from slimlm.quant import quantize_
    from slimlm.quant.api import config_for_method
    quantize_(qlora.model, config_for_method("nf4", {"double_quant": False}))
    with torch.no_grad():
        start, start_q = lm.model(ids), qlora.model(ids)
    assert (start - plain).norm() < (start_q - plain).norm()  # LoftQ starts closer to the float model
    losses = _train(lm.model, steps=10)
    assert losses[-1] < losses[0]
    save_adapter(lm.model, tmp_path / "loftq")
    with torch.no_grad():
        ref = lm.model(ids)
    fresh = load_model(str(tmp_path / "base"))
    load_adapter(fresh.model, tmp_path / "loftq")  # LoftQ re-run on the float base rebuilds the same Q
    with torch.no_grad():
        assert torch.equal(fresh.model(ids), ref)


def test_pissa_and_loftq_refuse_quantized_bases(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from slimlm.quant import quantize_
    from slimlm.quant.api import config_for_method

    make_hf_model("llama", tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    quantize_(lm.model, config_for_method("nf4", {}))
    for init in ("pissa", "loftq"):
        with pytest.raises(ConfigError, match="needs plain float linears"):
            apply_peft(lm.model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init))
    assert not adapter_modules(lm.model)
    with pytest.raises(ConfigError, match="loftq_quantizer"):
        LoraConfig(init_lora_weights="loftq", loftq_quantizer="int3")
    report = apply_peft(lm.model, LoraConfig(r=2, target_modules=["q_proj"]))  # a plain QLoRA is fine
    n_float = sum(p.numel() for p in load_model(str(tmp_path / "base")).model.parameters())
    assert report.total_params == n_float + report.trainable_params  # NF4 codes counted as out x in weights

"""quantize_ on tiny random models: every registered method runs, saves, reloads to identical logits.

The oracle model is a transformers ``from_config`` tiny Llama loaded through slimlm's HF loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from slimlm.loaders import load_model
from slimlm.loaders.save import save_model
from slimlm.models.modules import linear_weight
from slimlm.quant import GPTQConfig, RTNConfig, config_for_method, method_names, quantize_
from slimlm.quant.methods import methods
from slimlm.utils.errors import ConfigError
from tests.helpers.models import make_hf_model

SMALL = {"rtn": {"group_size": 32}, "gptq": {"group_size": 32}, "awq": {"group_size": 32}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "llama"
    make_hf_model("llama", d)
    return d


@pytest.fixture(scope="module")
def samples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (32,), generator=g) for _ in range(4)]


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def rtn_reference(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric round-to-nearest on a min/max grid containing 0, per row and group, de-quantized
    (the GPTQ reference quantizer, written out here); a short last group when ``group`` does not divide."""
    out = torch.empty_like(w)
    qmax = 2**bits - 1
    for a in range(0, w.shape[1], group):
        g = w[:, a : a + group]
        lo, hi = g.amin(1, keepdim=True).clamp(max=0), g.amax(1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / scale)
        out[:, a : a + group] = (torch.clamp(torch.round(g / scale) + zero, 0, qmax) - zero) * scale
    return out


@pytest.mark.parametrize("method", method_names())
def test_every_method_quantizes_saves_and_reloads(method: str, tiny: Path, samples: list[torch.Tensor],
                                                  tmp_path: Path) -> None:
    lm = load_model(str(tiny))
    with torch.no_grad():
        ref = lm.model(IDS)
    cfg = config_for_method(method, SMALL.get(method, {}))
    rep = quantize_(lm.model, cfg, samples if methods()[method].calibrated else None)
    with torch.no_grad():
        out = lm.model(IDS)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.5, f"{method}: relative logit change {rel}"  # changed, but still the same model
    # 2 layers x 7 linears quantized + the (untied) lm_head, ignored by default, reported dense
    assert len(rep.modules) == 15 and [m.kind for m in rep.module_bits if m.path == "lm_head"] == ["dense"]
    save_model(lm, tmp_path / "q", meta={"recipe": [cfg.to_dict()]})
    back = load_model(str(tmp_path / "q"))
    with torch.no_grad():
        again = back.model(IDS)
    assert torch.equal(again, out), f"{method}: reloaded logits differ by {float((again - out).abs().max())}"


def test_gptq_beats_rtn_on_tiny_model_calibration_error(tiny: Path, samples: list[torch.Tensor]) -> None:
    lm0 = load_model(str(tiny))
    with torch.no_grad():
        ref = lm0.model(torch.stack(samples))
    errs = {}
    for name, cfg in {"rtn": RTNConfig(bits=3, group_size=32), "gptq": GPTQConfig(bits=3, group_size=32)}.items():
        lm = load_model(str(tiny))
        quantize_(lm.model, cfg, samples)
        with torch.no_grad():
            errs[name] = float((lm.model(torch.stack(samples)) - ref).norm())
    assert errs["gptq"] < errs["rtn"]


def test_overrides_and_ignore(tiny: Path) -> None:
    lm = load_model(str(tiny))
    cfg = RTNConfig(bits=3, group_size=32, ignore=["lm_head", "re:layers\\.1\\.self_attn"],
                    overrides={"down_proj": {"bits": 8, "group_size": -1}})
    before = lm.model.model.layers[1].self_attn.q_proj.weight.clone()
    down0, up0 = (linear_weight(getattr(lm.model.model.layers[0].mlp, p)).clone() for p in ("down_proj", "up_proj"))
    rep = quantize_(lm.model, cfg)
    layers = lm.model.model.layers
    assert torch.equal(layers[1].self_attn.q_proj.weight, before)  # ignored by regex
    assert type(layers[1].self_attn.q_proj) is torch.nn.Linear and len(rep.modules) == 15
    down = linear_weight(layers[0].mlp.down_proj)  # the override: 8-bit, one group per row
    up = linear_weight(layers[0].mlp.up_proj)  # the default: 3-bit, groups of 32
    torch.testing.assert_close(down, rtn_reference(down0, 8, down0.shape[1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(up, rtn_reference(up0, 3, 32), rtol=0, atol=1e-6)


def test_errors_leave_model_untouched(tiny: Path) -> None:
    lm = load_model(str(tiny))
    sd = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(ConfigError, match="calibration"):
        quantize_(lm.model, GPTQConfig(group_size=32))
    with pytest.raises(ConfigError, match="bits"):
        RTNConfig(bits=1)
    with pytest.raises(ConfigError, match="unknown key 'bitz'"):
        RTNConfig(overrides={"down_proj": {"bitz": 8}})
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in sd.items())
    # a ragged last group: 64 = 48 + 16
    up0 = linear_weight(lm.model.model.layers[0].mlp.up_proj).clone()
    rep = quantize_(lm.model, RTNConfig(group_size=48))
    assert rep.modules
    torch.testing.assert_close(linear_weight(lm.model.model.layers[0].mlp.up_proj), rtn_reference(up0, 4, 48),
                               rtol=0, atol=1e-6)


def test_report_counts_real_storage(tiny: Path) -> None:
    lm = load_model(str(tiny))
    with pytest.raises(ConfigError, match="no linear layer left"):
        quantize_(lm.model, RTNConfig(ignore=["re:.*"]))
    rep = quantize_(lm.model, RTNConfig(bits=4, group_size=32))
    assert [m.kind for m in rep.module_bits].count("dense") == 1  # the ignored lm_head; the 14 others are packed
    # 4-bit codes + a scale and a zero per 32 weights: a bit above 4, far below 16
    assert 4.0 < rep.quantized_bits_per_weight < 4 + 2 * 32 / 32 + 0.1
    q = [m for m in rep.module_bits if m.kind != "dense"]
    sd_bits = sum(t.numel() * t.element_size() * 8 for m in q
                  for k, t in lm.model.get_submodule(m.path).state_dict().items() if k != "bias")
    assert rep.quantized_bits_per_weight == sd_bits / sum(m.weights for m in q)
    # the dense lm_head (32 bits) and fp32 embeddings/norms raise the other totals
    assert rep.model_bits_per_weight > rep.linear_bits_per_weight > rep.quantized_bits_per_weight


@pytest.mark.parametrize("head", [{"bits": 8, "group_size": -1, "symmetric": True}, {"bits": 4, "group_size": 32}])
def test_quantized_tied_lm_head_saves_and_reloads(head: dict[str, Any], tmp_path: Path) -> None:
    """A quantized lm_head of a tied model stops sharing the embedding: its own codes are saved and reloaded
    (the embedding stays dense), instead of being dropped as the tied duplicate."""
    make_hf_model("llama_tied_rope_llama3", tmp_path / "tied")
    lm = load_model(str(tmp_path / "tied"))
    assert lm.model.config.tie_word_embeddings
    emb = lm.model.model.embed_tokens.weight.clone()
    quantize_(lm.model, config_for_method("rtn", {"group_size": 32, "ignore": [], "overrides": {"lm_head": head}}))
    assert type(lm.model.lm_head) is not torch.nn.Linear
    with torch.inference_mode():
        out = lm.model(IDS)
        step = lm.model(IDS[:1, :1])  # one row: the decode-size path of the quantized lm_head
    save_model(lm, tmp_path / "q")
    back = load_model(str(tmp_path / "q"))
    assert type(back.model.lm_head) is type(lm.model.lm_head)
    assert torch.equal(back.model.model.embed_tokens.weight, emb)
    with torch.inference_mode():
        assert torch.equal(back.model(IDS), out)
        assert torch.equal(back.model(IDS[:1, :1]), step)

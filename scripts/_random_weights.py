"""Random-weight checkpoints in the real geometries, built from config with no download.

`build_model_dir("qwen3-embedding-4b", out_dir, device="cuda:0")` writes a model folder (config.json, safetensors,
tokenizer, and for embeddings the sentence-transformers files) that the real providers load through
`*_MODEL_PATH`. The arithmetic and memory traffic are those of the real model; the values are not. Weights are
created directly on `device` in the target dtype and initialised there (normal, std = initializer_range), so a 4B
checkpoint is built in seconds on a GPU. The `tiny-*` geometries are the CI fixtures' sizes, for CPU smoke runs.

The tokenizer is the locally trained byte-level BPE of tests/fixtures/tiny_models.py (Qwen's pre-tokenizer and
special tokens): every word of `WORDS` is one token after a space, so `TextMaker` builds texts of an exact token
length, and token lengths follow the distributions the benchmarks state (the real Qwen vocabulary is not needed
for speed: the model sees the same number of tokens).
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import _common  # noqa: F401 - puts the repository root on sys.path

Kind = Literal["embedding", "reranker", "multimodal"]

_QWEN3_COMMON = dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, head_dim=128, num_key_value_heads=8,
                     tie_word_embeddings=True)
_TINY_QWEN3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=16384, tie_word_embeddings=True)
_GME_VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, in_channels=3,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
_TINY_VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, in_channels=3,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2)


@dataclass(frozen=True)
class Geometry:
    """One model shape: what it serves and the config fields that differ from the defaults."""

    kind: Kind
    text: dict[str, Any]
    vision: dict[str, Any] | None = None
    pixels: tuple[int, int] = (256 * 28 * 28, 1280 * 28 * 28)  # processor min/max pixels (multimodal only)
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


GEOMETRIES: dict[str, Geometry] = {
    "qwen3-embedding-0.6b": Geometry("embedding", dict(
        _QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        vocab_size=151669, max_position_embeddings=32768), source="Qwen/Qwen3-Embedding-0.6B"),
    "qwen3-embedding-4b": Geometry("embedding", dict(
        _QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        vocab_size=151665, max_position_embeddings=40960), source="Qwen/Qwen3-Embedding-4B"),
    "qwen3-embedding-8b": Geometry("embedding", dict(
        _QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        vocab_size=151665, max_position_embeddings=40960, tie_word_embeddings=False),
        source="Qwen/Qwen3-Embedding-8B"),
    "qwen3-reranker-4b": Geometry("reranker", dict(
        _QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        vocab_size=151669, max_position_embeddings=40960), source="Qwen/Qwen3-Reranker-4B"),
    "gme-qwen2-vl-2b": Geometry("multimodal", dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=True),
        vision=_GME_VISION, source="Alibaba-NLP/gme-Qwen2-VL-2B-Instruct"),
    "tiny-qwen3-embedding": Geometry("embedding", dict(_TINY_QWEN3), source="tests/fixtures/tiny_models.py"),
    "tiny-qwen3-reranker": Geometry("reranker", dict(_TINY_QWEN3), source="tests/fixtures/tiny_models.py"),
    "tiny-gme": Geometry("multimodal", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=16384, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        tie_word_embeddings=True), vision=_TINY_VISION, pixels=(4 * 28 * 28, 64 * 28 * 28),
        source="tests/fixtures/tiny_models.py"),
}

# Settings slot (environment prefix) of each kind.
ENV_PREFIX: dict[Kind, str] = {"embedding": "EMBEDDING_", "reranker": "RERANKER_",
                               "multimodal": "MULTIMODAL_EMBEDDING_"}


def geometry(name: str) -> Geometry:
    """The geometry called `name`; ValueError listing the choices otherwise."""
    if name not in GEOMETRIES:
        raise ValueError(f"unknown geometry {name!r}: choose one of {sorted(GEOMETRIES)}")
    return GEOMETRIES[name]


def parameter_count(name: str) -> dict[str, int]:
    """Parameters outside the token embedding (the ones every token multiplies), from the config alone."""
    g = geometry(name).text
    h, inter, layers = g["hidden_size"], g["intermediate_size"], g["num_hidden_layers"]
    heads, kv = g["num_attention_heads"], g["num_key_value_heads"]
    head_dim = g.get("head_dim", h // heads)
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    mlp = 3 * h * inter
    return {"per_layer": attn + mlp, "body": layers * (attn + mlp), "layers": layers,
            "attn_width": heads * head_dim, "embedding": g.get("vocab_size", 0) * h}


def useful_flops(name: str, lengths: list[int]) -> float:
    """Forward FLOPs that real tokens need (padding excluded): 2 x body parameters per token, plus causal
    attention (QK^T and PV over on average half the sequence: 2 x layers x attention width x length per token)."""
    p = parameter_count(name)
    return float(sum(2.0 * p["body"] * n + 2.0 * p["layers"] * p["attn_width"] * n * n for n in lengths))


def _tokenizer(kind: Kind, max_length: int) -> Any:
    from tests.fixtures.tiny_models import build_tokenizer

    tok = build_tokenizer(append_eos=(kind == "embedding"))
    tok.model_max_length = max_length
    return tok


def _config(name: str, tok: Any) -> Any:
    from transformers import Qwen2VLConfig, Qwen3Config

    g = geometry(name)
    common = dict(torch_dtype="float32", sliding_window=None, use_sliding_window=False, bos_token_id=None,
                  eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                  initializer_range=0.02)
    text = dict(g.text)
    text.setdefault("vocab_size", len(tok))
    if g.kind != "multimodal":
        return Qwen3Config(**common, **text)
    ids = {t: tok.convert_tokens_to_ids(t)
           for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    return Qwen2VLConfig(**common, **text, vision_config=dict(g.vision or {}),
                         image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                         vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _st_files(out: Path, hidden: int, max_length: int) -> None:
    """The old-format sentence-transformers files of the real Qwen3-Embedding repos (text-only in ST 5.x)."""
    from tests.fixtures.tiny_models import ST_FILES

    for fname, obj in ST_FILES.items():
        if fname == "sentence_bert_config.json":
            obj = {**obj, "max_seq_length": max_length}
        (out / fname).write_text(json.dumps(obj, indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": True, "include_prompt": True}, indent=2))
    (out / "2_Normalize").mkdir(exist_ok=True)


def checkpoint_bytes(name: str, dtype: str = "float16") -> int:
    """Approximate size of the saved checkpoint (all parameters, vision tower included)."""
    g = geometry(name)
    params = parameter_count(name)["body"] + parameter_count(name)["embedding"]
    if g.vision:
        v = g.vision
        params += v["depth"] * 12 * v["embed_dim"] ** 2 + 4 * v["embed_dim"] ** 2 * 4
    return params * (4 if dtype == "float32" else 2)


def default_weights_root(need_bytes: int = 0) -> Path:
    """/dev/shm when it has room (weights never touch the disk), else the system temp folder."""
    import shutil

    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need_bytes * 1.2 + 2**30:
        return shm
    return Path(tempfile.gettempdir())


def build_model_dir(name: str, out_dir: str | Path | None = None, *, device: str = "cpu",
                    dtype: str = "float16", seed: int = 0) -> Path:
    """Write a random-weight checkpoint of geometry `name` to `out_dir` (a new temp folder when None).

    The model is built on `device` in `dtype` and initialised there; the folder holds config.json,
    model*.safetensors, the tokenizer (and for multimodal the Qwen2-VL processor; for embeddings the
    sentence-transformers files). Returns the folder.
    """
    import torch
    from transformers import (
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen3ForCausalLM,
        Qwen3Model,
    )

    g = geometry(name)
    root = default_weights_root(checkpoint_bytes(name, dtype))
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    out.mkdir(parents=True, exist_ok=True)
    max_length = int(g.text.get("max_position_embeddings", 4096))
    tok = _tokenizer(g.kind, max_length)
    config = _config(name, tok)
    cls = {"embedding": Qwen3Model, "reranker": Qwen3ForCausalLM, "multimodal": Qwen2VLForConditionalGeneration}
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls[g.kind]._from_config(config, torch_dtype=getattr(torch, dtype))
    model.eval()
    if g.kind == "embedding":
        model.config.architectures = ["Qwen3ForCausalLM"]  # as in the real repo's config.json
    model.config.torch_dtype = dtype
    model.save_pretrained(out, safe_serialization=True, max_shard_size="50GB")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if g.kind == "multimodal":
        low, high = g.pixels
        image_processor = Qwen2VLImageProcessor(min_pixels=low, max_pixels=high, patch_size=14,
                                                temporal_patch_size=2, merge_size=2)
        Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok,
                         chat_template=tok.chat_template).save_pretrained(out)
    else:
        tok.save_pretrained(out)
    if g.kind == "embedding":
        _st_files(out, int(g.text["hidden_size"]), max_length)
    (out / "RANDOM_WEIGHTS.json").write_text(json.dumps({"geometry": name, "source": g.source, "seed": seed,
                                                         "dtype": dtype}, indent=2))
    return out


def slot_overrides(name: str, path: Path, *, device: str, dtype: str = "auto",
                   attn_implementation: str = "sdpa", **extra: Any) -> dict[str, Any]:
    """Field values of the settings group that serves geometry `name` (as given to Settings.load overrides)."""
    g = geometry(name)
    # The served name says what it is: random weights in a real model's geometry.
    values: dict[str, Any] = {"provider": "local_gpu", "model_name": f"random/{name}", "model_path": str(path),
                              "device": device, "dtype": dtype, "attn_implementation": attn_implementation}
    if g.kind != "embedding":
        values["enabled"] = True
    if g.kind == "multimodal":
        values["min_pixels"], values["max_pixels"] = g.pixels
    values.update(extra)
    return values


def slot_environment(name: str, path: Path, *, device: str, **extra: Any) -> dict[str, str]:
    """The same as environment variables (for a backend started in another process)."""
    prefix = ENV_PREFIX[geometry(name).kind]
    return {f"{prefix}{key.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
            for key, value in slot_overrides(name, path, device=device, **extra).items()}


WORDS = ("the a cat dog kitten sits on mat rug stock markets fell today query document given web search retrieve "
         "relevant passages that answer judge whether meets requirements based provided note can only be system "
         "user assistant image picture photo describe what is in this red green blue apple banana paris capital "
         "france of").split()


class TextMaker:
    """Texts of an exact token length under a tokenizer (special tokens not counted)."""

    def __init__(self, tokenizer: Any, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.words = [w for w in WORDS if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]
        if len(self.words) < 8:
            raise ValueError("the tokenizer does not encode the benchmark words as single tokens")

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, n_tokens: int) -> str:
        """A random sentence of exactly `n_tokens` tokens (n_tokens >= 1)."""
        words = [self.rng.choice(self.words) for _ in range(max(1, n_tokens))]
        text = " ".join(words)
        n = self.count(text)
        while n > n_tokens and len(words) > 1:  # merges can only shorten; trim then top up
            words.pop()
            text = " ".join(words)
            n = self.count(text)
        while n < n_tokens:
            words.append(self.rng.choice(self.words))
            text = " ".join(words)
            n = self.count(text)
        return text

    def texts(self, low: int, high: int, n: int) -> list[str]:
        """`n` texts with token lengths uniform in [low, high]."""
        return [self.text(self.rng.randint(low, high)) for _ in range(n)]


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a model folder (the processor's tokenizer for multimodal folders)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))

"""Model runners of the local embedding provider (BatchRunner implementations).

Each runner: `format` (instructions), `tokenize` (CPU, off the event loop; one WorkItem per text, cost = tokens),
`collate` (pad to tensors, prefetched in a thread), `forward` (device thread, `torch.inference_mode`; one pooled,
NOT yet normalised fp32 vector per input, or a NonFiniteOutputError for an input whose vector holds NaN/Inf) and
`probe_forward` (a synthetic rows x tokens forward for the token-budget measurement).

- `Qwen3EmbeddingRunner`: the official Qwen3-Embedding recipe (docs/models.md section 5): left padding; every
  sequence ends with <|endoftext|> (tokenised without special tokens, truncated to max_length - 1, then the end
  id appended, so truncation never cuts it); the last position with attention_mask == 1 is pooled; queries are
  `Instruct: {task}\\nQuery:{text}`, documents raw.
- `SentenceTransformerRunner`: any sentence-transformers checkpoint (BERT-style, mean/CLS pooling...), run by
  sentence-transformers' own modules (tokenizer, Transformer, Pooling, Normalize), but through the BatchProcessor.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.config import ModelConfig
from backend.errors import ConfigurationError, DeviceError
from backend.providers.batching import WorkItem
from backend.providers.device import DeviceSpec, non_finite_error, non_finite_rows
from backend.providers.model_source import detect_embedding_kind, st_pooling_mode

logger = logging.getLogger(__name__)

QWEN3_END_TOKEN = "<|endoftext|>"
QUERY_TEMPLATE = "Instruct: {instruction}\nQuery:{text}"


class _RunnerBase:
    kind = ""
    model: torch.nn.Module
    hidden_size: int
    max_positions: int

    def __init__(self, spec: DeviceSpec, model_name: str, prefix: str) -> None:
        self.spec = spec
        self.model_name = model_name
        self.prefix = prefix
        # A fast tokenizer's truncation state is shared, mutable Rust state ("Already borrowed" across threads).
        self.tokenize_lock = threading.Lock()

    def tokenize(self, texts: list[str], max_length: int) -> list[WorkItem[Any]]:
        """One WorkItem per text (cost = tokens after truncation); waits for the tokenizer."""
        with self.tokenize_lock:
            return self._tokenize(texts, max_length)

    def try_tokenize(self, texts: list[str], max_length: int) -> list[WorkItem[Any]] | None:
        """`tokenize` without waiting (safe on the event loop): None while another thread holds the tokenizer."""
        if not self.tokenize_lock.acquire(blocking=False):
            return None
        try:
            return self._tokenize(texts, max_length)
        finally:
            self.tokenize_lock.release()

    def _tokenize(self, texts: list[str], max_length: int) -> list[WorkItem[Any]]:
        raise NotImplementedError

    def _rows(self, pooled: torch.Tensor) -> list[np.ndarray | BaseException]:
        """fp32 numpy rows; a row holding NaN/Inf becomes the typed error (fails only its request)."""
        values = pooled.float().cpu().numpy()
        bad = set(non_finite_rows(pooled))
        error = non_finite_error(model_name=self.model_name, dtype=self.spec.dtype_name, prefix=self.prefix)
        return [error if i in bad else values[i] for i in range(values.shape[0])]


class Qwen3EmbeddingRunner(_RunnerBase):
    """Qwen3-Embedding through transformers' Qwen3Model (no remote code)."""

    kind = "qwen3"
    supports_dimensions = True

    def __init__(self, path: Path, spec: DeviceSpec, config: ModelConfig) -> None:
        from transformers import AutoModel, AutoTokenizer

        super().__init__(spec, config.model_name, config.env_prefix())
        if config.pooling not in ("auto", "lasttoken"):
            raise ConfigurationError(
                f"{self.prefix}POOLING={config.pooling}: Qwen3-Embedding pools the last token; set "
                f"{self.prefix}POOLING=auto"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.end_id = self.tokenizer.convert_tokens_to_ids(QWEN3_END_TOKEN)
        if self.end_id is None or self.end_id == self.tokenizer.unk_token_id:
            raise ConfigurationError(f"The tokenizer in {path} has no {QWEN3_END_TOKEN} token: not Qwen3-Embedding")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        if self.tokenizer("x")["input_ids"][-1] != self.end_id:
            logger.info("%s: the tokenizer does not append %s; the provider appends it", path, QWEN3_END_TOKEN)
        try:
            model = AutoModel.from_pretrained(
                path, torch_dtype=spec.dtype, attn_implementation=spec.attn_implementation
            )
        except (ValueError, ImportError) as exc:  # e.g. an attention kernel the model does not support
            raise DeviceError(
                f"Cannot load {path} with {self.prefix}ATTN_IMPLEMENTATION={spec.attn_implementation}, "
                f"{self.prefix}DTYPE={spec.dtype_name}: {exc}"
            ) from exc
        self.model = model.to(spec.torch_device).eval()
        self.hidden_size = int(self.model.config.hidden_size)
        self.max_positions = int(self.model.config.max_position_embeddings)
        self.default_instruction = config.instruction
        self.hf_config = self.model.config
        self.pooling = "lasttoken"

    def format(self, texts: list[str], input_type: str, instruction: str | None) -> list[str]:
        """Queries get `Instruct: {task}\\nQuery:{text}`; documents stay raw unless an instruction is passed."""
        if input_type == "query" or instruction is not None:
            task = instruction if instruction is not None else self.default_instruction
            return [QUERY_TEMPLATE.format(instruction=task, text=text) for text in texts]
        return list(texts)

    def _tokenize(self, texts: list[str], max_length: int) -> list[WorkItem[Any]]:
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length - 1)[
            "input_ids"
        ]
        return [WorkItem(ids + [self.end_id], len(ids) + 1) for ids in encoded]

    def collate(self, payloads: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left padding: every sequence ends at the last position."""
        width = max(len(ids) for ids in payloads)
        input_ids = torch.full((len(payloads), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(payloads), width), dtype=torch.long)
        for row, ids in enumerate(payloads):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def forward(self, batch: dict[str, torch.Tensor]) -> list[np.ndarray | BaseException]:
        device = self.spec.torch_device
        with torch.inference_mode():
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            mask = batch["attention_mask"].to(device, non_blocking=True)
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            # The last position whose mask is 1 (never "last id != pad": the end token IS the pad id).
            last = mask.shape[1] - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)
            pooled = hidden[torch.arange(hidden.shape[0], device=device), last]
        return self._rows(pooled)

    def probe_forward(self, rows: int, tokens: int) -> None:
        ids = torch.full((rows, tokens), self.end_id, dtype=torch.long, device=self.spec.torch_device)
        with torch.inference_mode():
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids))


class SentenceTransformerRunner(_RunnerBase):
    """A sentence-transformers checkpoint with its own pooling (mean, CLS, ...) and normalisation."""

    kind = "sentence-transformers"
    supports_dimensions = True  # slice-then-normalise; meaningful for Matryoshka-trained checkpoints

    def __init__(self, path: Path, spec: DeviceSpec, config: ModelConfig) -> None:
        from sentence_transformers import SentenceTransformer

        super().__init__(spec, config.model_name, config.env_prefix())
        try:
            self.st = SentenceTransformer(
                str(path),
                device=spec.device,
                local_files_only=True,
                model_kwargs={"torch_dtype": spec.dtype, "attn_implementation": spec.attn_implementation},
            )
        except (ValueError, ImportError) as exc:
            raise DeviceError(
                f"Cannot load {path} with {self.prefix}ATTN_IMPLEMENTATION={spec.attn_implementation}, "
                f"{self.prefix}DTYPE={spec.dtype_name}: {exc}"
            ) from exc
        if spec.dtype != torch.float32:
            self.st.to(spec.dtype)  # model_kwargs cast the transformer only; Dense heads follow here
        self.st.eval()
        if config.pooling != "auto":
            self._set_pooling(config.pooling)
        self.model = self.st
        self.tokenizer = self.st.tokenizer
        self.hidden_size = int(self.st.get_embedding_dimension())
        auto_model = getattr(self.st[0], "auto_model", None)
        limit = self.st.max_seq_length or getattr(getattr(auto_model, "config", None), "max_position_embeddings", 512)
        self.max_positions = int(limit)
        self.prompts: dict[str, str] = dict(getattr(self.st, "prompts", {}) or {})
        self.pooling = st_pooling_mode(path) if config.pooling == "auto" else config.pooling
        self.hf_config = getattr(auto_model, "config", None)  # records the attention kernel in effect

    def _set_pooling(self, mode: str) -> None:
        from sentence_transformers.sentence_transformer.modules import Pooling

        for key, module in self.st._modules.items():
            if isinstance(module, Pooling):
                self.st._modules[key] = Pooling(module.get_embedding_dimension(), pooling_mode=mode)
                return
        raise ConfigurationError(f"{self.prefix}POOLING={mode}: the checkpoint has no pooling module to replace")

    def format(self, texts: list[str], input_type: str, instruction: str | None) -> list[str]:
        """The checkpoint's own prompt for the input type (config_sentence_transformers.json), or `instruction`."""
        prompt = instruction if instruction is not None else self.prompts.get(input_type, "")
        return [prompt + text for text in texts] if prompt else list(texts)

    def _tokenize(self, texts: list[str], max_length: int) -> list[WorkItem[Any]]:
        encoded = self.tokenizer(texts, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in encoded]
        items = []
        for row in range(len(texts)):
            features = {key: encoded[key][row] for key in keys}
            items.append(WorkItem(features, len(features["input_ids"])))
        return items

    def collate(self, payloads: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(p["input_ids"]) for p in payloads)
        left = self.tokenizer.padding_side == "left"
        pad_values = {"input_ids": self.tokenizer.pad_token_id or 0, "token_type_ids": 0, "attention_mask": 0}
        batch = {}
        for key in payloads[0]:
            tensor = torch.full((len(payloads), width), pad_values[key], dtype=torch.long)
            for row, features in enumerate(payloads):
                values = torch.tensor(features[key], dtype=torch.long)
                if left:
                    tensor[row, width - len(values) :] = values
                else:
                    tensor[row, : len(values)] = values
            batch[key] = tensor
        return batch

    def forward(self, batch: dict[str, torch.Tensor]) -> list[np.ndarray | BaseException]:
        device = self.spec.torch_device
        with torch.inference_mode():
            features = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            pooled = self.st.forward(features)["sentence_embedding"]
        return self._rows(pooled)

    def probe_forward(self, rows: int, tokens: int) -> None:
        ids = torch.full((rows, tokens), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        features: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "token_type_ids" in self.tokenizer.model_input_names:
            features["token_type_ids"] = torch.zeros_like(ids)
        with torch.inference_mode():
            self.st.forward({key: value.to(self.spec.torch_device) for key, value in features.items()})


EmbeddingRunner = Qwen3EmbeddingRunner | SentenceTransformerRunner


def load_embedding_runner(path: Path, spec: DeviceSpec, config: ModelConfig) -> EmbeddingRunner:
    """The runner for the checkpoint in `path` (Qwen3-Embedding, else sentence-transformers)."""
    if detect_embedding_kind(path) == "qwen3":
        return Qwen3EmbeddingRunner(path, spec, config)
    return SentenceTransformerRunner(path, spec, config)

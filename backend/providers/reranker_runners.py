"""Reranker prompts and forward passes: Qwen3-Reranker's yes/no head and single-logit classifiers.

Contract:
- `Qwen3PromptBuilder` builds exactly the official Qwen3-Reranker input: prefix ids + body ids + suffix ids, where
  only the body (`<Instruct>: ...\\n<Query>: ...\\n<Document>: ...`) is truncated, to
  `max_length - len(prefix) - len(suffix)` tokens, so the suffix always ends the sequence. No special tokens added.
- `PairPromptBuilder` encodes (query, document) pairs the way BERT-style cross-encoders were trained.
- Runners follow the `BatchRunner` protocol of `backend.providers.batching`: `collate` pads on the CPU (left padding
  for decoder prompts), `forward` returns one float32 score in (0, 1) per payload, in order.
- `LastTokenHeadRunner` multiplies the last hidden state (left padding: position -1) by only the needed rows of the
  head, in float32: rows [no, yes] of `get_output_embeddings().weight` for Qwen3-Reranker (score =
  sigmoid(yes - no), which equals the model card's log_softmax([no, yes])[yes].exp()), or the one-row `score` head
  of a converted Qwen3 sequence-classification checkpoint (score = sigmoid(logit)). The full-vocabulary head is
  never computed.
- `CrossEncoderRunner` runs an `AutoModelForSequenceClassification` with a single logit and applies a sigmoid.
Which runner serves a checkpoint is decided by one table, `RERANKER_DISPATCH`, from the checkpoint's own config
(architectures, num_labels); a checkpoint whose scoring head would be randomly initialised is refused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from backend.errors import ConfigurationError, InvalidRequestError, NonFiniteOutputError
from backend.providers.device import non_finite_rows

QWEN3_RERANKER_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN3_RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_RERANKER_BODY = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"

# One encoded input: "input_ids" always, "token_type_ids" for BERT-style pairs.
Encoded = dict[str, list[int]]
# Builds the error that replaces the score of an input whose logit is NaN/Inf (fp16 overflow).
NonFiniteFactory = Callable[[], BaseException]


def _default_non_finite() -> BaseException:
    return NonFiniteOutputError("The reranker produced a NaN/Inf logit; no score was returned for that document")


class Qwen3PromptBuilder:
    """Token ids of the official Qwen3-Reranker prompt; thread-safe (fast tokenizers are not)."""

    uses_instruction = True

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prefix_ids: list[int] = tokenizer.encode(QWEN3_RERANKER_PREFIX, add_special_tokens=False)
        self.suffix_ids: list[int] = tokenizer.encode(QWEN3_RERANKER_SUFFIX, add_special_tokens=False)
        self.body_budget = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.body_budget < 1:
            raise ConfigurationError(
                f"RERANKER_MAX_LENGTH={max_length} leaves no room for the query and document: the Qwen3-Reranker "
                f"template alone takes {len(self.prefix_ids) + len(self.suffix_ids)} tokens"
            )
        self._lock = threading.Lock()

    def build(self, query: str, documents: Sequence[str], instruction: str | None) -> list[Encoded]:
        bodies = [QWEN3_RERANKER_BODY.format(instruction=instruction, query=query, document=doc) for doc in documents]
        with self._lock:
            encoded = self.tokenizer(
                bodies,
                add_special_tokens=False,
                padding=False,
                truncation="longest_first",
                max_length=self.body_budget,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
        return [{"input_ids": self.prefix_ids + body + self.suffix_ids} for body in encoded]


class PairPromptBuilder:
    """(query, document) pairs encoded as a cross-encoder expects: `tokenizer(query, doc)`; no instruction."""

    uses_instruction = False

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._lock = threading.Lock()

    def build(self, query: str, documents: Sequence[str], instruction: str | None) -> list[Encoded]:
        if instruction is not None:
            raise InvalidRequestError(
                "This reranker is a cross-encoder that takes no instruction; send the request without one",
                instruction=instruction,
            )
        with self._lock:
            encoded = self.tokenizer(
                [query] * len(documents),
                list(documents),
                padding=False,
                truncation="longest_first",
                max_length=self.max_length,
                return_attention_mask=False,
            )
        keys = [key for key in ("input_ids", "token_type_ids") if key in encoded]
        return [{key: encoded[key][i] for key in keys} for i in range(len(documents))]


def pad_batch(payloads: Sequence[Encoded], *, pad_token_id: int, left: bool) -> dict[str, torch.Tensor]:
    """Pad encoded inputs to the longest one; attention_mask marks real tokens."""
    width = max(len(p["input_ids"]) for p in payloads)
    batch: dict[str, torch.Tensor] = {}
    fills = {"input_ids": pad_token_id, "token_type_ids": 0, "attention_mask": 0}
    rows: dict[str, list[list[int]]] = {key: [] for key in (*payloads[0].keys(), "attention_mask")}
    for payload in payloads:
        gap = width - len(payload["input_ids"])
        values = {**payload, "attention_mask": [1] * len(payload["input_ids"])}
        for key, ids in values.items():
            pad = [fills[key]] * gap
            rows[key].append(pad + ids if left else ids + pad)
    for key, value in rows.items():
        batch[key] = torch.tensor(value, dtype=torch.long)
    return batch


class LastTokenHeadRunner:
    """Decoder rerankers: hidden state at the last position times a few head rows, in float32.

    `head_rows` is (k, hidden): [no, yes] rows (k=2, score = sigmoid(yes - no)) or a one-row classifier head
    (k=1, score = sigmoid(logit)). `head_bias` is the matching bias or None. Inputs must be left-padded.
    """

    def __init__(
        self,
        model: Any,
        head_rows: torch.Tensor,
        head_bias: torch.Tensor | None,
        *,
        pad_token_id: int,
        non_finite: NonFiniteFactory = _default_non_finite,
    ) -> None:
        if head_rows.dim() != 2 or head_rows.shape[0] not in (1, 2):
            raise ValueError(f"head_rows must have 1 or 2 rows, got shape {tuple(head_rows.shape)}")
        self.model = model
        self.non_finite = non_finite
        self.base_model = model.base_model  # the decoder without the vocabulary head
        self.device = next(model.parameters()).device
        self.head_rows = head_rows.detach().to(self.device, torch.float32)
        self.head_bias = None if head_bias is None else head_bias.detach().to(self.device, torch.float32)
        self.pad_token_id = pad_token_id

    def collate(self, payloads: list[Encoded]) -> dict[str, torch.Tensor]:
        return pad_batch(payloads, pad_token_id=self.pad_token_id, left=True)

    def batch_cost(self, costs: list[int]) -> int:
        return max(costs) * len(costs)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, k) float32 head logits at the last position."""
        with torch.inference_mode():
            inputs = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
            hidden = self.base_model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
            ).last_hidden_state[:, -1, :]
            logits = hidden.float() @ self.head_rows.T
            if self.head_bias is not None:
                logits = logits + self.head_bias
        return logits

    def forward(self, batch: dict[str, torch.Tensor]) -> list[float]:
        logits = self.logits(batch)
        margin = logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits[:, 0]
        return guarded_scores(margin, self.non_finite)


class CrossEncoderRunner:
    """Encoder cross-encoders (bge-reranker, ms-marco): `model(**batch).logits[:, 0]`, sigmoid in float32."""

    def __init__(
        self, model: Any, *, pad_token_id: int, left_padding: bool, non_finite: NonFiniteFactory = _default_non_finite
    ) -> None:
        self.model = model
        self.non_finite = non_finite
        self.device = next(model.parameters()).device
        self.pad_token_id = pad_token_id
        self.left_padding = left_padding

    def collate(self, payloads: list[Encoded]) -> dict[str, torch.Tensor]:
        return pad_batch(payloads, pad_token_id=self.pad_token_id, left=self.left_padding)

    def batch_cost(self, costs: list[int]) -> int:
        return max(costs) * len(costs)

    def forward(self, batch: dict[str, torch.Tensor]) -> list[float]:
        with torch.inference_mode():
            inputs = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
            logits = self.model(**inputs).logits[:, 0].float()
        return guarded_scores(logits, self.non_finite)


def guarded_scores(logits: torch.Tensor, non_finite: NonFiniteFactory) -> list[float | BaseException]:
    """sigmoid(logit) per row as float32-valued floats; a NaN/Inf logit gives an error for that row only."""
    bad = set(non_finite_rows(logits.reshape(-1, 1)))
    scores = torch.sigmoid(logits.float()).detach().cpu().numpy().astype(np.float32)
    return [non_finite() if i in bad else float(score) for i, score in enumerate(scores)]


# --- which path serves a checkpoint ------------------------------------------------------------------------
@dataclass(frozen=True)
class RerankerPath:
    """How a checkpoint is loaded, prompted and scored."""

    name: str
    auto_class: str  # the transformers Auto class that loads it
    prompt: str  # "qwen3": the official Qwen3-Reranker template; "pair": tokenizer(query, document)
    runner: str  # "yes_no" | "last_token" (one-row classifier head) | "cross_encoder"


QWEN3_YES_NO = RerankerPath("qwen3_yes_no", "AutoModelForCausalLM", "qwen3", "yes_no")
QWEN3_CLASSIFIER = RerankerPath("qwen3_seq_cls", "AutoModelForSequenceClassification", "qwen3", "last_token")
CROSS_ENCODER = RerankerPath("cross_encoder", "AutoModelForSequenceClassification", "pair", "cross_encoder")

# The one dispatch table: an architecture name from the checkpoint's config.json, matched exactly, or a "*" suffix.
RERANKER_DISPATCH: dict[str, RerankerPath] = {
    "Qwen3ForCausalLM": QWEN3_YES_NO,  # original Qwen3-Reranker: yes/no rows of the LM head
    "Qwen3ForSequenceClassification": QWEN3_CLASSIFIER,  # converted Qwen3-Reranker (score = W[yes] - W[no])
    "*ForSequenceClassification": CROSS_ENCODER,  # bge-reranker, ms-marco cross-encoders
}


def select_path(model_config: Any, source: str) -> RerankerPath:
    """The path for a checkpoint's config; ConfigurationError naming the reason when none fits."""
    architectures = list(getattr(model_config, "architectures", None) or [])
    path = None
    for arch in architectures:
        path = RERANKER_DISPATCH.get(arch) or next(
            (p for key, p in RERANKER_DISPATCH.items() if key.startswith("*") and arch.endswith(key[1:])), None
        )
        if path is not None:
            break
    if path is None:
        raise ConfigurationError(
            f"The reranker checkpoint {source} declares architectures {architectures}; supported are "
            f"{sorted(RERANKER_DISPATCH)}. Other causal LMs have no trained relevance head, and loading them as a "
            "sequence classifier would score with a randomly initialised head",
            architectures=architectures,
        )
    num_labels = getattr(model_config, "num_labels", None)
    if path.auto_class == "AutoModelForSequenceClassification" and num_labels != 1:
        raise ConfigurationError(
            f"The reranker checkpoint {source} is a sequence classifier with num_labels={num_labels}; only "
            "single-logit (num_labels=1) relevance classifiers can be served",
            num_labels=num_labels,
        )
    return path


# --- loading ----------------------------------------------------------------------------------------------
Runner = LastTokenHeadRunner | CrossEncoderRunner
PromptBuilder = Qwen3PromptBuilder | PairPromptBuilder


@dataclass
class LoadedReranker:
    """A reranker ready to serve: its path, model, prompt builder and batch runner."""

    path: RerankerPath
    model: Any
    tokenizer: Any
    builder: PromptBuilder
    runner: Runner


def yes_no_ids(tokenizer: Any, source: str) -> tuple[int, int]:
    """(no_id, yes_id) as the model card takes them; each word must be exactly one token."""
    ids = []
    for word in ("no", "yes"):
        token_id = tokenizer.convert_tokens_to_ids(word)
        if tokenizer.encode(word, add_special_tokens=False) != [token_id] or token_id == tokenizer.unk_token_id:
            raise ConfigurationError(
                f"The tokenizer of {source} does not encode '{word}' as one token; it is not a Qwen3-Reranker"
            )
        ids.append(token_id)
    return ids[0], ids[1]


def load_reranker(
    source: str,
    *,
    max_length: int,
    device: str = "cpu",
    torch_dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    path: RerankerPath | None = None,
    non_finite: NonFiniteFactory = _default_non_finite,
) -> LoadedReranker:
    """Load `source` along its dispatch path (or the forced `path`) and build prompt builder and runner.

    ConfigurationError when the checkpoint fits no path, when any weight would be newly initialised (e.g. a
    Qwen3ForCausalLM checkpoint loaded as a sequence classifier gets a random `score` head), or when `max_length`
    exceeds the model's positions.
    """
    import transformers

    model_config = transformers.AutoConfig.from_pretrained(source)
    path = path or select_path(model_config, source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    limit = getattr(model_config, "max_position_embeddings", None)
    if path.prompt == "pair" and getattr(tokenizer, "model_max_length", None):
        limit = min(limit or tokenizer.model_max_length, tokenizer.model_max_length)
    if limit is not None and max_length > limit:
        raise ConfigurationError(
            f"RERANKER_MAX_LENGTH={max_length} exceeds the {limit} positions of {source}; set it to at most {limit}",
            max_length=max_length,
            limit=limit,
        )
    auto_class = getattr(transformers, path.auto_class)
    model, info = auto_class.from_pretrained(
        source, torch_dtype=torch_dtype, attn_implementation=attn_implementation, output_loading_info=True
    )
    missing = list(info.get("missing_keys") or [])
    if missing:
        del model
        raise ConfigurationError(
            f"The reranker checkpoint {source} ({getattr(model_config, 'architectures', None)}) has no weights for "
            f"{missing} when loaded with {path.auto_class}: they would be randomly initialised and the scores "
            "meaningless. A Qwen3-Reranker (Qwen3ForCausalLM) is scored through its yes/no head; serve it as a "
            "classifier only after converting it (score.weight = W[yes] - W[no])",
            missing_keys=missing,
        )
    model = model.to(device).eval()
    if path.prompt == "qwen3":
        builder: PromptBuilder = Qwen3PromptBuilder(tokenizer, max_length)
    else:
        builder = PairPromptBuilder(tokenizer, max_length)
    return LoadedReranker(path, model, tokenizer, builder, _build_runner(path, model, tokenizer, source, non_finite))


def _build_runner(path: RerankerPath, model: Any, tokenizer: Any, source: str, non_finite: NonFiniteFactory) -> Runner:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ConfigurationError(f"The tokenizer of {source} defines neither a pad nor an end token to pad with")
    if path.runner == "cross_encoder":
        return CrossEncoderRunner(
            model, pad_token_id=pad_id, left_padding=tokenizer.padding_side == "left", non_finite=non_finite
        )
    if path.runner == "yes_no":
        no_id, yes_id = yes_no_ids(tokenizer, source)
        head = model.get_output_embeddings()
        rows = head.weight[[no_id, yes_id]]
        bias = None if getattr(head, "bias", None) is None else head.bias[[no_id, yes_id]]
        return LastTokenHeadRunner(model, rows, bias, pad_token_id=pad_id, non_finite=non_finite)
    score = getattr(model, "score", None)
    if not isinstance(score, torch.nn.Linear):
        raise ConfigurationError(f"The classifier {source} has no `score` head to read the relevance logit from")
    return LastTokenHeadRunner(model, score.weight, score.bias, pad_token_id=pad_id, non_finite=non_finite)

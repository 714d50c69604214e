"""Qwen3-Reranker scoring: template, equivalence with the model card's formula, dispatch, and the provider.

The reference `model_card_scores` below is the Qwen3-Reranker README code (full LM head, logits[:, -1],
log_softmax over [no, yes]), written out independently of the implementation under test.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from backend.errors import ConfigurationError, InvalidInputTypeError, InvalidRequestError
from backend.providers import reranker_runners as rr

# Copied character by character from the Qwen3-Reranker README (models.md §2.2); not imported on purpose.
README_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
README_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

CASES = [  # (instruction, query, document): several queries, instructions and document lengths
    (DEFAULT_INSTRUCTION, "what is the capital of france", "paris is the capital of france"),
    (DEFAULT_INSTRUCTION, "what is the capital of france", "the cat sits on the mat"),
    (DEFAULT_INSTRUCTION, "stock markets", "stock markets fell today " * 12),
    ("Judge whether the picture shows an animal", "a red apple", "a kitten on a rug"),
    ("Judge whether the picture shows an animal", "a red apple", ""),
    ("retrieve relevant passages", "dog", "banana " * 40 + "yes no"),
]


def format_body(instruction: str, query: str, doc: str) -> str:
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


def model_card_scores(model, tokenizer, cases, max_length: int) -> list[float]:
    """The README's process_inputs + compute_logits, verbatim in substance."""
    prefix_tokens = tokenizer.encode(README_PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(README_SUFFIX, add_special_tokens=False)
    pairs = [format_body(*case) for case in cases]
    inputs = tokenizer(
        pairs,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix_tokens) - len(suffix_tokens),
    )
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    with warnings.catch_warnings():  # the README passes max_length with padding=True, which transformers flags
        warnings.simplefilter("ignore", UserWarning)
        inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    with torch.no_grad():
        batch_scores = model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, token_true_id]
        false_vector = batch_scores[:, token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        return batch_scores[:, 1].exp().tolist()


def runner_scores(loaded: rr.LoadedReranker, cases) -> list[float]:
    payloads = [loaded.builder.build(q, [d], i)[0] for i, q, d in cases]
    return loaded.runner.forward(loaded.runner.collate(payloads))


@pytest.fixture(scope="module")
def reference(tiny_qwen3_reranker_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_reranker_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_reranker_dir, torch_dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def loaded(tiny_qwen3_reranker_dir: Path) -> rr.LoadedReranker:
    return rr.load_reranker(str(tiny_qwen3_reranker_dir), max_length=256)


# --- template ----------------------------------------------------------------------------------------------
def test_template_strings_match_the_readme() -> None:
    assert rr.QWEN3_RERANKER_PREFIX == README_PREFIX
    assert rr.QWEN3_RERANKER_SUFFIX == README_SUFFIX
    assert rr.QWEN3_RERANKER_BODY.format(instruction="I", query="Q", document="D") == format_body("I", "Q", "D")


def test_built_ids_are_prefix_body_suffix_without_special_tokens(loaded: rr.LoadedReranker) -> None:
    tok = loaded.tokenizer
    [encoded] = loaded.builder.build("a query", ["a document"], "an instruction")
    expected = (
        tok.encode(README_PREFIX, add_special_tokens=False)
        + tok.encode(format_body("an instruction", "a query", "a document"), add_special_tokens=False)
        + tok.encode(README_SUFFIX, add_special_tokens=False)
    )
    assert encoded == {"input_ids": expected}
    assert tok.decode(expected) == README_PREFIX + format_body("an instruction", "a query", "a document") + (
        README_SUFFIX
    )


def test_long_document_truncates_only_the_body(loaded: rr.LoadedReranker) -> None:
    builder = loaded.builder
    long_doc = "the cat sits on the mat " * 200  # far beyond max_length=256 tokens
    [encoded] = builder.build("query", [long_doc], DEFAULT_INSTRUCTION)
    ids = encoded["input_ids"]
    assert len(ids) == builder.max_length == 256
    assert ids[: len(builder.prefix_ids)] == builder.prefix_ids
    assert ids[-len(builder.suffix_ids) :] == builder.suffix_ids
    body = loaded.tokenizer.decode(ids[len(builder.prefix_ids) : -len(builder.suffix_ids)])
    assert body.startswith(f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: query\n<Document>: the cat")


def test_max_length_without_room_for_the_body_is_refused(tiny_qwen3_reranker_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_reranker_dir)
    with pytest.raises(ConfigurationError, match="RERANKER_MAX_LENGTH=20"):
        rr.Qwen3PromptBuilder(tokenizer, 20)


def test_left_padding_and_mask(loaded: rr.LoadedReranker) -> None:
    batch = rr.pad_batch([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], pad_token_id=0, left=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# --- scores equal the model card's formula -----------------------------------------------------------------
def test_scores_equal_model_card_in_one_batch_and_one_by_one(reference, loaded: rr.LoadedReranker) -> None:
    model, tokenizer = reference
    expected = model_card_scores(model, tokenizer, CASES, max_length=256)
    batched = runner_scores(loaded, CASES)
    single = [runner_scores(loaded, [case])[0] for case in CASES]
    single_reference = [model_card_scores(model, tokenizer, [case], max_length=256)[0] for case in CASES]
    np.testing.assert_allclose(batched, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(single, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(single_reference, expected, rtol=0, atol=1e-6)
    assert all(0.0 < s < 1.0 for s in batched)
    assert len({round(s, 6) for s in batched}) > 3  # a random model still tells the inputs apart


def test_truncated_scores_equal_model_card(reference, tiny_qwen3_reranker_dir: Path) -> None:
    model, tokenizer = reference
    short = rr.load_reranker(str(tiny_qwen3_reranker_dir), max_length=96)
    cases = [(DEFAULT_INSTRUCTION, "cat", "the dog sits on the rug " * 50), CASES[0]]
    np.testing.assert_allclose(
        runner_scores(short, cases), model_card_scores(model, tokenizer, cases, max_length=96), rtol=0, atol=1e-6
    )


def test_float16_scores_close_to_model_card(tiny_qwen3_reranker_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_reranker_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_reranker_dir, torch_dtype=torch.float16).eval()
    half = rr.load_reranker(str(tiny_qwen3_reranker_dir), max_length=256, torch_dtype=torch.float16)
    assert next(half.model.parameters()).dtype == torch.float16
    expected = model_card_scores(model, tokenizer, CASES, max_length=256)
    np.testing.assert_allclose(runner_scores(half, CASES), expected, rtol=0, atol=2e-3)
    single = [runner_scores(half, [case])[0] for case in CASES]
    np.testing.assert_allclose(single, expected, rtol=0, atol=2e-3)


def test_head_uses_only_yes_no_rows_and_never_the_full_vocabulary(loaded: rr.LoadedReranker, monkeypatch) -> None:
    tok = loaded.tokenizer
    head = loaded.model.get_output_embeddings()
    no_id, yes_id = tok.convert_tokens_to_ids("no"), tok.convert_tokens_to_ids("yes")
    assert loaded.runner.head_rows.dtype == torch.float32
    assert torch.equal(loaded.runner.head_rows, head.weight[[no_id, yes_id]].float())

    def forbidden(*args, **kwargs):
        raise AssertionError("the full-vocabulary head was computed")

    monkeypatch.setattr(head, "forward", forbidden)
    monkeypatch.setattr(loaded.model, "forward", forbidden)
    assert len(runner_scores(loaded, CASES[:2])) == 2


# --- dispatch ----------------------------------------------------------------------------------------------
def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_dispatch_table_picks_path_from_checkpoint_config(loaded, tiny_qwen3_seq_cls_dir: Path) -> None:
    assert loaded.path is rr.QWEN3_YES_NO
    from transformers import AutoConfig

    assert rr.select_path(AutoConfig.from_pretrained(tiny_qwen3_seq_cls_dir), "x") is rr.QWEN3_CLASSIFIER
    bert = AutoConfig.for_model("bert", architectures=["BertForSequenceClassification"], num_labels=1)
    assert rr.select_path(bert, "x") is rr.CROSS_ENCODER


def test_causal_checkpoint_requested_as_classifier_is_refused(tiny_qwen3_reranker_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"score\.weight.*randomly initialised"):
        rr.load_reranker(str(tiny_qwen3_reranker_dir), max_length=256, path=rr.QWEN3_CLASSIFIER)
    with pytest.raises(ConfigurationError, match=r"score\.weight"):
        rr.load_reranker(str(tiny_qwen3_reranker_dir), max_length=256, path=rr.CROSS_ENCODER)


def test_seq_cls_config_without_score_weights_is_refused(tiny_qwen3_reranker_dir: Path, tmp_path: Path) -> None:
    relabelled = _copy_with_config(
        tiny_qwen3_reranker_dir,
        tmp_path / "relabelled",
        architectures=["Qwen3ForSequenceClassification"],
        id2label={"0": "LABEL_0"},
    )
    with pytest.raises(ConfigurationError, match="randomly initialised"):
        rr.load_reranker(str(relabelled), max_length=256)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architectures": ["Qwen3Model"]}, "supported are"),
        ({"architectures": ["LlamaForCausalLM"]}, "supported are"),
        ({"architectures": ["Qwen3ForSequenceClassification"], "id2label": {"0": "a", "1": "b"}}, "num_labels=2"),
    ],
)
def test_unsupported_checkpoints_are_refused(tiny_qwen3_seq_cls_dir, tmp_path, changes, message) -> None:
    with pytest.raises(ConfigurationError, match=message):
        rr.load_reranker(str(_copy_with_config(tiny_qwen3_seq_cls_dir, tmp_path / "c", **changes)), max_length=256)


def test_max_length_beyond_model_positions_is_refused(tiny_qwen3_reranker_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="RERANKER_MAX_LENGTH=8192 exceeds the 512 positions"):
        rr.load_reranker(str(tiny_qwen3_reranker_dir), max_length=8192)


# --- the converted sequence-classification checkpoint ------------------------------------------------------
def test_seq_cls_fixture_scores_through_classifier_path_and_equals_yes_no(
    loaded: rr.LoadedReranker, tiny_qwen3_seq_cls_dir: Path
) -> None:
    seq = rr.load_reranker(str(tiny_qwen3_seq_cls_dir), max_length=256)
    assert seq.path is rr.QWEN3_CLASSIFIER
    assert isinstance(seq.runner, rr.LastTokenHeadRunner) and seq.runner.head_rows.shape[0] == 1
    # The fixture converts a causal model built with the same seed: check it really is the same network.
    causal_state, seq_state = loaded.model.model.state_dict(), seq.model.model.state_dict()
    assert causal_state.keys() == seq_state.keys()
    assert all(torch.equal(causal_state[k], seq_state[k]) for k in causal_state)
    yes_minus_no = loaded.runner.head_rows[1] - loaded.runner.head_rows[0]
    assert torch.allclose(seq.runner.head_rows[0], yes_minus_no, atol=1e-7)
    np.testing.assert_allclose(runner_scores(seq, CASES), runner_scores(loaded, CASES), rtol=0, atol=1e-6)


def test_seq_cls_fixture_equals_transformers_classifier_output(tiny_qwen3_seq_cls_dir: Path) -> None:
    seq = rr.load_reranker(str(tiny_qwen3_seq_cls_dir), max_length=256)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_qwen3_seq_cls_dir).eval()
    batch = seq.runner.collate([seq.builder.build(q, [d], i)[0] for i, q, d in CASES])
    with torch.no_grad():
        expected = torch.sigmoid(model(**batch).logits[:, 0]).tolist()
    np.testing.assert_allclose(seq.runner.forward(batch), expected, rtol=0, atol=1e-6)


# --- BERT-style cross-encoders -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert_cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out = tmp_path_factory.mktemp("bert_ce")
    words = "cat dog kitten sits on the mat rug stock markets fell today paris capital of france what is".split()
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), model_max_length=64)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=1,
    )
    BertForSequenceClassification(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_bert_cross_encoder_scores_tokenizer_pairs(tiny_bert_cross_encoder_dir: Path) -> None:
    ce = rr.load_reranker(str(tiny_bert_cross_encoder_dir), max_length=64)
    assert ce.path is rr.CROSS_ENCODER and isinstance(ce.runner, rr.CrossEncoderRunner)
    query, docs = "what is the capital of france", ["paris capital of france", "cat sits on the mat", "dog " * 80]
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_cross_encoder_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_cross_encoder_dir).eval()
    inputs = tokenizer([query] * 3, docs, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        expected = torch.sigmoid(model(**inputs).logits[:, 0]).tolist()
    payloads = ce.builder.build(query, docs, None)
    assert max(len(p["input_ids"]) for p in payloads) == 64
    np.testing.assert_allclose(ce.runner.forward(ce.runner.collate(payloads)), expected, rtol=0, atol=1e-6)
    with pytest.raises(InvalidRequestError, match="no instruction"):
        ce.builder.build(query, docs, "an instruction")


def test_bert_max_length_beyond_positions_is_refused(tiny_bert_cross_encoder_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="at most 64"):
        rr.load_reranker(str(tiny_bert_cross_encoder_dir), max_length=512)


# --- the provider ------------------------------------------------------------------------------------------
def make_provider(model_dir: Path, **overrides):
    from backend.config import RerankerConfig
    from backend.providers.local_reranker import LocalRerankerProvider

    settings = {"enabled": True, "provider": "local_gpu", "model_path": str(model_dir), "max_length": 256}
    settings.update(overrides)
    return LocalRerankerProvider(RerankerConfig(**settings))


class FedBatches:
    """Records the input_ids of every batch the runner's forward receives."""

    def __init__(self, provider) -> None:
        self.batches: list[torch.Tensor] = []
        runner = provider._loaded.runner
        original = runner.forward

        def spy(batch):
            self.batches.append(batch["input_ids"].clone())
            return original(batch)

        runner.forward = spy


DOCS = ["paris is the capital of france", "the cat sits on the mat", "stock markets fell today " * 6, "", "a dog"]
QUERY = "what is the capital of france"


async def test_provider_scores_equal_model_card(reference, tiny_qwen3_reranker_dir: Path) -> None:
    model, tokenizer = reference
    provider = make_provider(tiny_qwen3_reranker_dir, max_batch_size=2)
    try:
        fed = FedBatches(provider)
        scores = await provider.rerank(QUERY, DOCS)
        assert isinstance(scores, list) and all(type(s) is float for s in scores)
        expected = model_card_scores(model, tokenizer, [(DEFAULT_INSTRUCTION, QUERY, d) for d in DOCS], 256)
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
        assert len(fed.batches) >= 3 and all(b.shape[0] <= 2 for b in fed.batches)  # RERANKER_BATCH_SIZE=2
        own = "Judge whether the document mentions an animal"
        expected_own = model_card_scores(model, tokenizer, [(own, QUERY, d) for d in DOCS], 256)
        np.testing.assert_allclose(await provider.rerank(QUERY, DOCS, instruction=own), expected_own, atol=1e-6)
        assert not np.allclose(expected_own, expected, atol=1e-6)
    finally:
        await provider.close()


async def test_configured_instruction_is_the_default(reference, tiny_qwen3_reranker_dir: Path) -> None:
    model, tokenizer = reference
    own = "retrieve documents about animals"
    provider = make_provider(tiny_qwen3_reranker_dir, instruction=own)
    try:
        expected = model_card_scores(model, tokenizer, [(own, QUERY, d) for d in DOCS], 256)
        np.testing.assert_allclose(await provider.rerank(QUERY, DOCS), expected, rtol=0, atol=1e-6)
    finally:
        await provider.close()


async def test_shuffling_documents_permutes_scores(tiny_qwen3_reranker_dir: Path) -> None:
    provider = make_provider(tiny_qwen3_reranker_dir, max_batch_size=3)
    try:
        scores = await provider.rerank(QUERY, DOCS)
        order = list(range(len(DOCS)))
        random.Random(7).shuffle(order)
        assert order != sorted(order)
        shuffled = await provider.rerank(QUERY, [DOCS[i] for i in order])
        np.testing.assert_allclose(shuffled, [scores[i] for i in order], rtol=0, atol=1e-6)
    finally:
        await provider.close()


async def test_document_ten_times_max_length_keeps_the_suffix(reference, tiny_qwen3_reranker_dir: Path) -> None:
    model, tokenizer = reference
    provider = make_provider(tiny_qwen3_reranker_dir)
    try:
        fed = FedBatches(provider)
        long_doc = "the cat sits on the mat " * 450
        assert len(tokenizer.encode(long_doc, add_special_tokens=False, verbose=False)) >= 10 * 256
        scores = await provider.rerank(QUERY, [long_doc, "a dog"])
        suffix = tokenizer.encode(README_SUFFIX, add_special_tokens=False)
        assert max(batch.shape[1] for batch in fed.batches) == 256
        assert all(row[-len(suffix) :].tolist() == suffix for batch in fed.batches for row in batch)
        expected = model_card_scores(model, tokenizer, [(DEFAULT_INSTRUCTION, QUERY, long_doc)], 256)
        np.testing.assert_allclose(scores[0], expected[0], rtol=0, atol=1e-6)
    finally:
        await provider.close()


async def test_duplicates_get_identical_scores_and_are_scored_once(tiny_qwen3_reranker_dir: Path) -> None:
    provider = make_provider(tiny_qwen3_reranker_dir, max_batch_size=2)
    try:
        fed = FedBatches(provider)
        docs = ["a dog", "the cat sits on the mat", "a dog", "banana " * 30, "a dog", "the cat sits on the mat"]
        scores = await provider.rerank(QUERY, docs)
        assert scores[0] == scores[2] == scores[4] and scores[1] == scores[5]
        assert sum(b.shape[0] for b in fed.batches) == 3
    finally:
        await provider.close()


async def test_request_validation(tiny_qwen3_reranker_dir: Path) -> None:
    provider = make_provider(tiny_qwen3_reranker_dir, max_documents=3)
    try:
        assert await provider.rerank(QUERY, []) == []
        for query in ("", "   "):
            with pytest.raises(InvalidRequestError, match="query must not be empty"):
                await provider.rerank(query, ["a"])
        too_many = r"documents has 4 items; the limit is 3 \(RERANKER_MAX_DOCUMENTS\)"
        with pytest.raises(InvalidRequestError, match=too_many):
            await provider.rerank(QUERY, ["a"] * 4)
        with pytest.raises(InvalidInputTypeError, match=r"documents\[1\] must be a string"):
            await provider.rerank(QUERY, ["a", 3])
        with pytest.raises(InvalidInputTypeError, match="query must be a string"):
            await provider.rerank(None, ["a"])
        assert len(await provider.rerank(QUERY, ["a"] * 3)) == 3
    finally:
        await provider.close()


async def test_concurrent_calls_equal_sequential_calls(tiny_qwen3_reranker_dir: Path) -> None:
    import asyncio

    provider = make_provider(tiny_qwen3_reranker_dir, max_batch_size=4)
    try:
        queries = [QUERY, "a red apple", "stock markets", "dog"]
        sequential = [await provider.rerank(q, DOCS) for q in queries]
        together = await asyncio.gather(*(provider.rerank(q, DOCS) for q in queries))
        np.testing.assert_allclose(together, sequential, rtol=0, atol=1e-6)
    finally:
        await provider.close()


async def test_warmup_plans_budget_and_reports_info(tiny_qwen3_reranker_dir: Path) -> None:
    provider = make_provider(tiny_qwen3_reranker_dir, max_batch_size=8)
    try:
        await provider.warmup()
        info = provider.info().as_dict()
        assert info["provider"] == "local_gpu" and info["device"] == "cpu" and info["dtype"] == "float32"
        assert info["scoring"] == "qwen3_yes_no" and info["memory_bytes"] > 0
        assert info["max_batch_tokens"] == provider.max_batch_tokens == 8 * 256  # CPU auto, capped at size x len
        assert len(await provider.rerank(QUERY, DOCS)) == len(DOCS)
    finally:
        await provider.close()


def test_budget_below_max_length_is_refused(tiny_qwen3_reranker_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="RERANKER_MAX_BATCH_TOKENS=100 cannot hold one input"):
        make_provider(tiny_qwen3_reranker_dir, max_batch_tokens=100)


def test_provider_refuses_checkpoint_with_random_head(tiny_qwen3_reranker_dir: Path, tmp_path: Path) -> None:
    relabelled = _copy_with_config(
        tiny_qwen3_reranker_dir,
        tmp_path / "relabelled",
        architectures=["Qwen3ForSequenceClassification"],
        id2label={"0": "LABEL_0"},
    )
    with pytest.raises(ConfigurationError, match="randomly initialised"):
        make_provider(relabelled)
    with pytest.raises(ConfigurationError, match="RERANKER_MODEL_PATH=.*missing.*not a model folder"):
        make_provider(tmp_path / "missing")
    shutil.copytree(tiny_qwen3_reranker_dir, tmp_path / "no_weights")
    (tmp_path / "no_weights" / "model.safetensors").unlink()
    with pytest.raises(ConfigurationError, match="Cannot load the reranker"):
        make_provider(tmp_path / "no_weights")


async def test_nan_logit_fails_the_request_with_remedy(tiny_qwen3_reranker_dir: Path) -> None:
    from backend.errors import NonFiniteOutputError

    provider = make_provider(tiny_qwen3_reranker_dir)
    try:
        provider._loaded.runner.head_rows[1, 0] = float("nan")
        with pytest.raises(NonFiniteOutputError, match="RERANKER_DTYPE=float32"):
            await provider.rerank(QUERY, ["a dog"])
    finally:
        await provider.close()


async def test_seq_cls_provider_equals_yes_no_provider(tiny_qwen3_reranker_dir, tiny_qwen3_seq_cls_dir) -> None:
    yes_no, seq = make_provider(tiny_qwen3_reranker_dir), make_provider(tiny_qwen3_seq_cls_dir)
    try:
        assert (yes_no.path_name, seq.path_name) == ("qwen3_yes_no", "qwen3_seq_cls")
        np.testing.assert_allclose(await seq.rerank(QUERY, DOCS), await yes_no.rerank(QUERY, DOCS), atol=1e-6)
    finally:
        await yes_no.close()
        await seq.close()


@pytest.mark.gpu
async def test_gpu_float16_scores_close_to_float32_model_card(reference, tiny_qwen3_reranker_dir: Path) -> None:
    model, tokenizer = reference
    provider = make_provider(tiny_qwen3_reranker_dir, device="cuda:0", dtype="float16", max_batch_size=3)
    try:
        await provider.warmup()
        expected = model_card_scores(model, tokenizer, [(DEFAULT_INSTRUCTION, QUERY, d) for d in DOCS], 256)
        np.testing.assert_allclose(await provider.rerank(QUERY, DOCS), expected, rtol=0, atol=2e-3)
    finally:
        await provider.close()

"""GME-Qwen2-VL embedding pipeline, natively on transformers 4.51.3 (no trust_remote_code).

Replicates Alibaba-NLP/gme-Qwen2-VL's `gme_inference.py` / `modeling_gme_qwen2vl.py`:

- Input string (`format_input`): `<|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n`
  + (`<|vision_start|><|image_pad|><|vision_end|>` when there is an image) + text
  + `<|im_end|>\\n<|im_start|>assistant\\n<|endoftext|>`; the literal `<|endoftext|>` is the pooled token.
  Documents use "You are a helpful assistant."; queries the given instruction.
- Images: `images.fetch_image` (RGB + qwen_vl_utils smart_resize), then the processor's resize within min/max
  pixels (done when the input is prepared, so a queued image is uint8 at its final size), then its patches.
- Forward (`embed_batch`): `embed_tokens(input_ids)`, `visual(pixel_values, grid_thw)` (one image per call, see
  `encode_images`) scattered into the `image_token_id` positions, the text decoder
  `model.model(inputs_embeds=..., attention_mask=...)` with `position_ids=None` (sequential positions on all
  three M-RoPE axes, as official GME on 4.51.3), right padding, the hidden state of the last mask==1 token,
  L2-normalised in float32.

Deliberate difference: official GME truncates the whole string at max_length, which cuts the template suffix and
pools a text token. Here an over-long *text* is shortened instead, so the suffix and the pooled `<|endoftext|>`
are always kept; inputs within max_length are tokenised exactly as officially.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from backend.errors import InvalidRequestError, ModelExecutionError

DEFAULT_INSTRUCTION = "You are a helpful assistant."
IMAGE_PAD = "<|image_pad|>"
IMAGE_PLACEHOLDER = f"<|vision_start|>{IMAGE_PAD}<|vision_end|>"
# Shortening an over-long text re-tokenises it; token boundaries can move a little, so allow a few rounds.
_TRUNCATION_ROUNDS = 8


def format_input(text: str | None, *, has_image: bool, instruction: str) -> str:
    """The exact GME input string: system instruction, image placeholder first, text, literal `<|endoftext|>`."""
    body = (IMAGE_PLACEHOLDER if has_image else "") + (text if text is not None else "")
    return (
        f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{body}<|im_end|>\n"
        "<|im_start|>assistant\n<|endoftext|>"
    )


def resolve_instruction(input_type: str, instruction: str | None, query_instruction: str) -> str:
    """Documents always get GME's default instruction; queries the per-call one, else the configured one."""
    if input_type != "query":
        return DEFAULT_INSTRUCTION
    return instruction if instruction is not None else query_instruction


@dataclass
class GmeFeatures:
    """One prepared input: its token ids and, for an image, the image at the processor's final size.

    The image stays uint8 (at most MAX_PIXELS x 3 bytes) while queued; `collate` turns it into float patches."""

    input_ids: list[int]
    image: Image.Image | None = None

    @property
    def cost(self) -> int:
        """Sequence length in tokens, image tokens included (what the input occupies in a batch)."""
        return len(self.input_ids)


class GmeInputBuilder:
    """CPU side: turns (text, image, instruction) into `GmeFeatures` and pads them into batches."""

    def __init__(self, processor: Any, *, max_length: int, min_pixels: int, max_pixels: int) -> None:
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "right"
        self.image_processor = image_processor = processor.image_processor
        image_processor.min_pixels = min_pixels
        image_processor.max_pixels = max_pixels
        image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        self.merge_size = int(image_processor.merge_size)
        self.factor = int(image_processor.patch_size) * self.merge_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.resample = Image.Resampling(int(image_processor.resample))
        self.max_length = max_length
        self._lock = threading.Lock()
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.pad_token_id = int(pad_id)

    def build(
        self, text: str | None, image: Image.Image | None, instruction: str, max_length: int | None = None
    ) -> GmeFeatures:
        """Process one input (image already through `fetch_image`); shortens an over-long text, keeps the suffix.

        `max_length` defaults to the configured one (a smaller one shapes synthetic warm-up inputs)."""
        limit = max_length or self.max_length
        features = self.encode(text, image, instruction)
        if features.cost <= limit:
            return features
        if not text:
            raise InvalidRequestError(
                f"The image and template take {features.cost} tokens, more than MULTIMODAL_EMBEDDING_MAX_LENGTH "
                f"({limit}); lower MULTIMODAL_EMBEDDING_MAX_PIXELS or raise the max length",
                limit=limit,
                received=features.cost,
            )
        with self._lock:
            text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(text_ids) - (features.cost - limit)
        for _ in range(_TRUNCATION_ROUNDS):
            if keep <= 0:
                break
            with self._lock:
                shortened = self.tokenizer.decode(text_ids[:keep])
            features = self.encode(shortened, image, instruction)
            if features.cost <= limit:
                return features
            keep -= features.cost - limit
        raise InvalidRequestError(
            "The template and image leave no room for text within MULTIMODAL_EMBEDDING_MAX_LENGTH "
            f"({limit})",
            limit=limit,
        )

    def encode(self, text: str | None, image: Image.Image | None, instruction: str) -> GmeFeatures:
        """The ids `processor(text=[prompt], images=[image])` gives (no length limit), and the resized image."""
        prompt = format_input(text, has_image=image is not None, instruction=instruction)
        if image is not None:
            image = self.processor_resize(image)
            prompt = prompt.replace(IMAGE_PAD, IMAGE_PAD * self.image_tokens(image), 1)
        with self._lock:  # a fast tokenizer must not be used by two threads at once ("Already borrowed")
            ids = self.tokenizer(prompt)["input_ids"]
        return GmeFeatures(list(ids), image)

    def processor_resize(self, image: Image.Image) -> Image.Image:
        """The processor's own resize (transformers' smart_resize within min/max pixels, then PIL's resample)."""
        height, width = smart_resize(
            image.height, image.width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )
        return image if image.size == (width, height) else image.resize((width, height), resample=self.resample)

    def image_tokens(self, image: Image.Image) -> int:
        """Image tokens of an image at its final size: (h / 14) * (w / 14) / merge_size**2 (grid_t = 1)."""
        return (image.height // self.factor) * (image.width // self.factor)

    def collate(self, features: list[GmeFeatures]) -> dict[str, torch.Tensor]:
        """Right-pad ids into (B, L) with an attention mask; the image processor makes patches and grids, in order."""
        longest = max(f.cost for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            input_ids[row, : feature.cost] = torch.tensor(feature.input_ids, dtype=torch.long)
            attention_mask[row, : feature.cost] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        images = [f.image for f in features if f.image is not None]
        if images:
            if len(images) != len(features):
                raise ValueError("a GME batch must be all-image or all-text (modalities are never mixed)")
            processed = self.image_processor(images=images, return_tensors="pt")
            batch["pixel_values"] = processed["pixel_values"]
            batch["image_grid_thw"] = processed["image_grid_thw"]
        return batch


def encode_images(model: Any, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The vision tower, one image per call; returns the merged image tokens of all images, in order.

    Official GME calls `visual` once on the whole batch; its attention is then a (patches x patches) masked
    block-diagonal over *all* images, quadratic in the batch (a 1.7 GB mask for 8 images at 1280 tokens). Per
    image, each call computes exactly the unmasked block, so the result is the same, at linear cost.
    """
    sizes = grid_thw.prod(dim=1).tolist()
    parts = [
        model.visual(patches, grid_thw=grid_thw[i : i + 1])
        for i, patches in enumerate(torch.split(pixel_values, sizes))
    ]
    return torch.cat(parts)


def embed_batch(model: Any, batch: dict[str, torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """GME's forward on a `Qwen2VLForConditionalGeneration` (4.51.3 layout): (B, hidden) float32, L2-normalised."""
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    with torch.inference_mode():
        inputs_embeds = model.model.embed_tokens(input_ids)
        if "pixel_values" in batch:
            pixel_values = batch["pixel_values"].to(device, dtype=model.visual.get_dtype())
            image_embeds = encode_images(model, pixel_values, batch["image_grid_thw"].to(device))
            image_mask = input_ids == model.config.image_token_id
            if int(image_mask.sum()) != image_embeds.shape[0]:
                raise ModelExecutionError(
                    f"GME: {int(image_mask.sum())} image tokens in the ids but {image_embeds.shape[0]} image "
                    "embeddings"
                )
            inputs_embeds[image_mask] = image_embeds.to(inputs_embeds.dtype)
        outputs = model.model(
            input_ids=None,
            position_ids=None,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=False,
        )
        last = attention_mask.sum(dim=1) - 1
        pooled = outputs.last_hidden_state[torch.arange(input_ids.shape[0], device=last.device), last]
        return F.normalize(pooled.float(), p=2, dim=1)

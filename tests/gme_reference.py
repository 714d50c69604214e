"""The official GME recipe, written from shared/docs/models.md §3.2-3.4 (gme_inference.py's `embed` and `forward`,
qwen_vl_utils' `fetch_image`), independently of backend/providers/{gme,images}.py: the reference of the tests."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration


def official_smart_resize(height: int, width: int) -> tuple[int, int]:
    factor, min_pixels, max_pixels, max_ratio = 28, 4 * 28 * 28, 16384 * 28 * 28, 200
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    if max(h_bar, w_bar) / min(h_bar, w_bar) > max_ratio:
        h_bar, w_bar = (w_bar * max_ratio, w_bar) if h_bar > w_bar else (h_bar, h_bar * max_ratio)
    return h_bar, w_bar


def official_fetch_image(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    width, height = image.size
    resized_height, resized_width = official_smart_resize(height, width)
    return image.resize((resized_width, resized_height))


class OfficialGme:
    """gme_inference.GmeQwen2VL.embed + forward (right padding, as the official HF code)."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, *, min_pixels: int, max_pixels: int) -> None:
        self.base = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, torch_dtype=dtype).eval()
        self.processor = AutoProcessor.from_pretrained(
            model_dir, min_pixels=min_pixels, max_pixels=max_pixels, use_fast=False
        )
        self.processor.tokenizer.padding_side = "right"
        self.default_instruction = "You are a helpful assistant."

    def forward(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
        inputs_embeds = self.base.model.embed_tokens(input_ids)
        if pixel_values is not None:
            pixel_values = pixel_values.type(self.base.visual.get_dtype())
            image_embeds = self.base.visual(pixel_values, grid_thw=image_grid_thw)
            inputs_embeds[input_ids == self.base.config.image_token_id] = image_embeds
        outputs = self.base.model(
            input_ids=None, position_ids=None, attention_mask=attention_mask, inputs_embeds=inputs_embeds
        )
        left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
        if left_padding:
            embeddings = outputs.last_hidden_state[:, -1]
        else:
            lengths = attention_mask.sum(dim=1) - 1
            embeddings = outputs.last_hidden_state[torch.arange(input_ids.shape[0]), lengths]
        return torch.nn.functional.normalize(embeddings, p=2, dim=1)

    def embed(self, texts: list[Any], images: list[Any], is_query: bool = True, instruction: str | None = None):
        input_texts, input_images = [], []
        for t, i in zip(texts, images, strict=True):
            if not is_query or instruction is None:
                instruction = self.default_instruction
            input_str = ""
            if i is None:
                input_images = None
            else:
                input_str += "<|vision_start|><|image_pad|><|vision_end|>"
                input_images.append(official_fetch_image(i))
            if t is not None:
                input_str += t
            msg = (
                f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{input_str}<|im_end|>\n"
                "<|im_start|>assistant\n<|endoftext|>"
            )
            input_texts.append(msg)
        inputs = self.processor(
            text=input_texts, images=input_images, padding=True, truncation=True, max_length=1800, return_tensors="pt"
        )
        with torch.no_grad():
            return self.forward(**inputs).float().numpy()

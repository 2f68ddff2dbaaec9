"""DreamBench's metrics (Ruiz et al., 2023, section 4.1) for real base models.

- **DINO**: mean pairwise cosine similarity between the ViT-S/16 DINO embeddings (the CLS
  token of the last layer) of generated and real images of a subject;
- **CLIP-I**: the same pairing with CLIP image embeddings;
- **CLIP-T**: mean cosine similarity between each prompt's CLIP text embedding and the
  CLIP image embedding of an image generated from it.

Models are loaded from a local folder the user gives (nothing is downloaded): a
``ViTModel`` checkpoint such as ``facebook/dino-vits16`` and a ``CLIPModel`` checkpoint
such as ``openai/clip-vit-base-patch32`` with its tokenizer. Preprocessing is done here
(resize, centre crop, normalise) with the mean/std of the folder's
``preprocessor_config.json`` when it has one, so no image-processor backend is needed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamfleet.core.errors import ModelError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _norm_stats(folder: Path, default: tuple[tuple, tuple]) -> tuple[tuple, tuple]:
    path = folder / "preprocessor_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return default


def preprocess(images: Sequence[Image.Image], size: int, mean, std, *, resize_ratio: float = 1.0) -> torch.Tensor:
    """Resize the short side to ``size * resize_ratio`` (bicubic), centre-crop ``size``, normalise; (B, 3, S, S)."""
    out = []
    for im in images:
        im = im.convert("RGB")
        short = round(size * resize_ratio)
        scale = short / min(im.size)
        im = im.resize((max(short, round(im.width * scale)), max(short, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
        out.append(np.asarray(im, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _pooled(out) -> torch.Tensor:
    # transformers 4 returns the projected features, transformers 5 an output with pooler_output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _check_folder(path: str | Path, what: str) -> Path:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelError(f"{what} model folder {folder} has no config.json; pass a local folder saved with save_pretrained")
    return folder


class DinoScorer:
    """DINO ViT embeddings (CLS token of the last hidden state)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from transformers import ViTModel

        folder = _check_folder(path, "DINO")
        self.model = ViTModel.from_pretrained(folder, add_pooling_layer=False).eval().to(device)
        self.device = device
        self.mean, self.std = _norm_stats(folder, (IMAGENET_MEAN, IMAGENET_STD))
        self.size = int(self.model.config.image_size)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        # DINO's evaluation transform: resize to 256/224 of the crop, centre-crop.
        x = preprocess(images, self.size, self.mean, self.std, resize_ratio=256 / 224).to(self.device)
        cls = self.model(pixel_values=x).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(cls.float(), dim=-1).cpu()


class ClipScorer:
    """CLIP image and text embeddings (projected, unit norm)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        folder = _check_folder(path, "CLIP")
        self.model = CLIPModel.from_pretrained(folder).eval().to(device)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ModelError(f"CLIP model folder {folder}: cannot load its tokenizer ({e})") from None
        self.device = device
        self.mean, self.std = _norm_stats(folder, (CLIP_MEAN, CLIP_STD))
        self.size = int(self.model.config.vision_config.image_size)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        x = preprocess(images, self.size, self.mean, self.std).to(self.device)
        return torch.nn.functional.normalize(_pooled(self.model.get_image_features(pixel_values=x)).float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        max_len = int(self.model.config.text_config.max_position_embeddings)
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                           attention_mask=tok.attention_mask.to(self.device))
        return torch.nn.functional.normalize(_pooled(out).float(), dim=-1).cpu()


def mean_pairwise_cosine(generated_nd: torch.Tensor, real_md: torch.Tensor) -> float:
    """Mean cosine over all N x M (generated, real) pairs of unit-norm embeddings."""
    if len(generated_nd) == 0 or len(real_md) == 0:
        raise ValueError("need at least one generated and one real image")
    return float((generated_nd @ real_md.T).mean())


def dino_score(scorer: DinoScorer, generated: Sequence[Image.Image], real: Sequence[Image.Image]) -> float:
    return mean_pairwise_cosine(scorer.embed(generated), scorer.embed(real))


def clip_i_score(scorer: ClipScorer, generated: Sequence[Image.Image], real: Sequence[Image.Image]) -> float:
    return mean_pairwise_cosine(scorer.embed_images(generated), scorer.embed_images(real))


def clip_t_score(scorer: ClipScorer, generated: Sequence[Image.Image], prompts: Sequence[str]) -> float:
    """Mean over images of cos(text(prompt_i), image_i); ``prompts[i]`` generated ``generated[i]``."""
    if len(generated) != len(prompts):
        raise ValueError(f"{len(generated)} images but {len(prompts)} prompts: pass the prompt of every image")
    img = scorer.embed_images(generated)
    txt = scorer.embed_texts(prompts)
    return float((img * txt).sum(-1).mean())

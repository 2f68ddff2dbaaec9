"""Per-image fidelity scores, for filtering expert renders (SuTI's delta-CLIP filter).

- ``subject(generated, real)``: for each generated image, the mean cosine of its embedding
  with the subject's real photos (DINO / CLIP-I pairing, one generated image at a time);
- ``prompt(generated, prompts)``: for each generated image, how well it shows its prompt
  (CLIP-T, or the toy judge's class and context probabilities).

Two implementations: :class:`ToyFidelity` (the toy judge's embedding and heads, for the toy
world) and :class:`ModelFidelity` (DINO and CLIP from local folders, for real models).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from dreamfleet.core.errors import ConfigError


class ToyFidelity:
    name = "toy-judge"

    def __init__(self, judge_folder: str | None = None):
        from dreamfleet.toy.judge import ToyJudge

        self.judge = ToyJudge.load(judge_folder)

    def subject(self, generated: Sequence[Image.Image], real: Sequence[Image.Image]) -> list[float]:
        g, _ = self.judge.predict(list(generated))
        r, _ = self.judge.predict(list(real))
        g, r = torch.nn.functional.normalize(g, dim=-1), torch.nn.functional.normalize(r, dim=-1)
        return (g @ r.T).mean(1).tolist()

    def prompt(self, generated: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        from dreamfleet.toy.metrics import prompt_fidelity

        return [prompt_fidelity(self.judge, [im], p) for im, p in zip(generated, prompts, strict=True)]


class ModelFidelity:
    name = "dino+clip"

    def __init__(self, dino_model: str, clip_model: str | None = None, device: str = "cpu"):
        from dreamfleet.eval.metrics import ClipScorer, DinoScorer

        self.dino = DinoScorer(dino_model, device)
        self.clip = ClipScorer(clip_model, device) if clip_model else None

    def subject(self, generated: Sequence[Image.Image], real: Sequence[Image.Image]) -> list[float]:
        return (self.dino.embed(list(generated)) @ self.dino.embed(list(real)).T).mean(1).tolist()

    def prompt(self, generated: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        if self.clip is None:
            return [float("nan")] * len(generated)
        return (self.clip.embed_images(list(generated)) * self.clip.embed_texts(list(prompts))).sum(-1).tolist()


def make_fidelity(scorer: str, *, dino_model: str | None = None, clip_model: str | None = None, device: str = "cpu"):
    if scorer == "toy":
        return ToyFidelity()
    if scorer == "dino":
        if not dino_model:
            raise ConfigError("--scorer dino needs --dino-model (a local DINO ViT folder, e.g. dino-vits16)")
        return ModelFidelity(dino_model, clip_model, device)
    raise ConfigError(f"unknown scorer {scorer!r}; use 'toy' (toy world) or 'dino' (real models)")


def toy_scorer(**_: object) -> ToyFidelity:
    """Best-step selection's ``toy`` scorer (entry point ``dreamfleet.scorers``): the shipped judge."""
    return ToyFidelity()


def dino_scorer(*, dino_model: str | None = None, clip_model: str | None = None, device: str = "cpu",
                **_: object) -> ModelFidelity:
    """Best-step selection's ``dino`` scorer: DINO for the subject, CLIP-T for the prompt."""
    if not dino_model or not clip_model:
        raise ConfigError("select_scorer dino needs --select-dino-model (a local DINO ViT folder) and "
                          "--select-clip-model (a local CLIP folder, for prompt fidelity)")
    return ModelFidelity(dino_model, clip_model, device)

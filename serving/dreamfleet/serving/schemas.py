"""Request bodies: every field typed and bounded; a violation answers 422 naming the field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dreamfleet.core.apprentice import MAX_DEMOS, MIN_DEMOS
from dreamfleet.serving.config import ServeConfig

MAX_PROMPT_CHARS = 2000


def _multiple_of_8(v: int | None) -> int | None:
    if v is not None and v % 8:
        raise ValueError("must be a multiple of 8")
    return v


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be blank")
    return v


def _subject_or_demonstrations(request):
    """A generate request names an expert or brings demonstrations, never both."""
    if (request.subject is None) == (request.demonstrations is None):
        raise ValueError("give exactly one of 'subject' (an expert) or 'demonstrations' (photos for the apprentice)")
    if request.subject is not None and request.class_noun is not None:
        raise ValueError("'class_noun' goes with 'demonstrations'; an expert knows its class")
    return request


def _size_within(v: str | None, min_side: int, max_side: int) -> str | None:
    """An OpenAI ``WxH`` size whose sides are multiples of 8 within the server's bounds."""
    if v is None:
        return v
    w, h = (int(x) for x in v.split("x"))
    for side in (w, h):
        if side % 8 or not min_side <= side <= max_side:
            raise ValueError(f"sides must be multiples of 8 within [{min_side}, {max_side}]")
    return v


class FusionRequest(BaseModel):
    """Fusion Sampling for this request (ProFusion experts always use it; a DreamBooth expert
    uses it when asked). Unset fields keep the method's defaults; ``guidance_scale`` is w1."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    refine_step: int | None = Field(None, ge=0, le=4, description="K: fusion stages per step (0: composable guidance)")
    guidance_scale_ref: float | None = Field(None, ge=0.0, le=30.0, description="w2: guidance toward the class prompt")
    refine_guidance_scale: float | None = Field(None, ge=0.0, le=30.0, description="w_f: guidance of the fusion stage")
    refine_emb_scale: float | None = Field(None, ge=0.0, le=2.0, description="gamma: scale of S* in the fusion stage")
    refine_eta: float | None = Field(None, ge=0.0, le=1.0, description="eta_f: noise of the fusion stage")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="DDIM eta of the refinement step")

    def params(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ProFusionJobRequest(BaseModel):
    """``POST /v1/profusion/jobs``: one photo and its class noun."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    photo: str = Field(min_length=1, description="the subject's photo, base64")
    class_noun: str = Field(min_length=1, max_length=64, description="the subject's class, e.g. dog")
    subject: str | None = Field(None, min_length=1, max_length=128, description="subject id (default: generated)")

    not_blank = field_validator("class_noun")(_not_blank)


def request_models(cfg: ServeConfig):
    """Pydantic models whose bounds come from the server's config."""

    class GenerateRequest(BaseModel):
        """Give exactly one of ``subject`` (an expert) or ``demonstrations`` (photos, for the
        zero-shot apprentice); ``class_noun`` goes only with ``demonstrations``."""

        model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

        subject: str | None = Field(None, min_length=1, max_length=128, description="subject id of the expert")
        demonstrations: list[str] | None = Field(
            None, min_length=MIN_DEMOS, max_length=MAX_DEMOS,
            description="instead of 'subject': 1-8 base64 photos of a new subject, for the zero-shot apprentice")
        class_noun: str | None = Field(None, min_length=1, max_length=64,
                                       description="with demonstrations: the subject's class, for '{subject}'")
        prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS,
                            description="'{subject}' or '[V]' is replaced by the expert's identifier and class noun")
        num_images: int = Field(1, ge=1, le=cfg.max_images)
        steps: int = Field(cfg.default_steps, ge=1, le=cfg.max_steps)
        guidance_scale: float = Field(cfg.default_guidance_scale, ge=0.0, le=30.0)
        seed: int | None = Field(None, ge=0, le=2**32 - 1)
        width: int | None = Field(None, ge=cfg.min_side, le=cfg.max_side)
        height: int | None = Field(None, ge=cfg.min_side, le=cfg.max_side)
        version: str | None = Field(None, max_length=32)
        fusion: FusionRequest | None = Field(None, description="Fusion Sampling parameters")

        multiple_of_8 = field_validator("width", "height")(_multiple_of_8)
        not_blank = field_validator("prompt")(_not_blank)
        subject_or_demonstrations = model_validator(mode="after")(_subject_or_demonstrations)

    class OpenAIImageRequest(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

        model: str = Field(min_length=1, max_length=128, description="subject id")
        prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
        n: int = Field(1, ge=1, le=cfg.max_images)
        size: str | None = Field(None, pattern=r"^\d{2,4}x\d{2,4}$")
        response_format: Literal["b64_json"] = "b64_json"
        seed: int | None = Field(None, ge=0, le=2**32 - 1)
        steps: int | None = Field(None, ge=1, le=cfg.max_steps)

        @field_validator("size")
        @classmethod
        def size_bounds(cls, v: str | None) -> str | None:
            return _size_within(v, cfg.min_side, cfg.max_side)

    return GenerateRequest, OpenAIImageRequest

"""The expert artifact: what a trained subject leaves behind, read by the registry and serving.

An expert is a folder, written atomically::

    expert.json                           # ExpertInfo below
    pytorch_lora_weights.safetensors      # method=lora (diffusers LoRA format); profusion: the q/k/v LoRA
    promptnet/                            # method=profusion: the customised PromptNet (core.profusion)
    unet/ [text_encoder/]                 # method=full (diffusers save_pretrained, safetensors)
    validation/step-NNNNNNNN.png          # validation grids (rows: prompts)
    instance/NN.png                       # the training photos as used (normalised, downscaled)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from dreamfleet.core.artifacts import read_json
from dreamfleet.core.errors import DataError

EXPERT_SCHEMA_VERSION = 1
EXPERT_FILE = "expert.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
FINAL_LOSS_STEPS = 10  # an artifact's final_loss: the mean loss of its last 10 steps (one step's loss is noisy)


class ExpertKey(NamedTuple):
    """One published expert: a subject and one of its registry versions. Its ``str`` form,
    ``subject@version``, is the Ray Serve multiplexed model id (subject ids hold no ``@``)."""

    subject_id: str
    version: str

    def __str__(self) -> str:
        return f"{self.subject_id}@{self.version}"

    @classmethod
    def parse(cls, model_id: str) -> ExpertKey:
        subject_id, sep, version = model_id.rpartition("@")
        if not (sep and subject_id and version):
            raise ValueError(f"{model_id!r} is not an expert key of the form subject@version")
        return cls(subject_id, version)


@dataclass
class ExpertInfo:
    subject_id: str
    class_noun: str
    identifier: str
    instance_prompt: str
    method: str
    base_model: dict[str, Any]
    config: dict[str, Any]
    code_version: dict[str, Any]
    input_hash: str
    num_images: int
    final_loss: float | None  # mean of the last FINAL_LOSS_STEPS steps' losses
    wall_time_s: float
    created_at: str
    weights: list[str]
    class_images: dict[str, Any] | None = None
    tenant: str | None = None
    source: str | None = None
    train_stats: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] | None = None  # best-step selection: rule, scores per evaluated step, chosen step
    schema_version: int = EXPERT_SCHEMA_VERSION

    def prompt(self, template: str) -> str:
        """Fill ``{identifier}``/``{class_noun}``, ``{0}``/``{1}`` (DreamBench), ``{subject}`` or ``[V]``."""
        subject = f"{self.identifier} {self.class_noun}"
        text = template.replace("[V]", self.identifier).replace("{subject}", subject)
        return text.replace("{identifier}", self.identifier).replace("{class_noun}", self.class_noun).replace(
            "{0}", self.identifier).replace("{1}", self.class_noun)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, folder: str | Path) -> ExpertInfo:
        path = Path(folder) / EXPERT_FILE
        if not path.is_file():
            raise DataError(f"{folder}: not an expert folder (no {EXPERT_FILE})")
        data = read_json(path)
        version = int(data.get("schema_version", 0))
        if version > EXPERT_SCHEMA_VERSION:
            raise DataError(
                f"{path}: written by a newer dreamfleet (expert schema {version}, this one reads up to "
                f"{EXPERT_SCHEMA_VERSION}); upgrade dreamfleet"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------- loading

@dataclass
class ExpertWeights:
    """Everything an expert folder holds, read into memory: its LoRA state (denoiser and, when
    trained, text-encoder keys) or its full-weight components (the UNet or transformer, and the
    text encoders when trained), by pipeline component name. The one loader that serving,
    evaluation and gather share."""

    info: ExpertInfo
    lora: dict[str, Any] | None = None
    components: dict[str, Any] = field(default_factory=dict)
    profusion: Any = None  # a ProFusion expert's PromptNet and photo (core.profusion.ProFusionWeights)

    @property
    def unet(self) -> Any:
        return self.components.get("unet")

    @property
    def text_encoder(self) -> Any:
        return self.components.get("text_encoder")

    @property
    def modules(self) -> list[Any]:
        return list(self.components.values())

    @property
    def nbytes(self) -> int:
        if self.lora is not None:
            extra = self.profusion.promptnet.parameters() if self.profusion is not None else []
            return sum(t.numel() * t.element_size() for t in [*self.lora.values(), *extra])
        return sum(p.numel() * p.element_size() for m in self.modules for p in m.parameters())

    def to(self, device: Any, dtype: Any = None) -> ExpertWeights:
        """Move the full-weight modules (a LoRA state moves when it is loaded into a pipeline)."""
        for m in self.modules:
            m.to(device, dtype)
        return self


def read_expert(folder: str | Path, base: Any, info: ExpertInfo | None = None) -> ExpertWeights:
    """Read an expert folder onto the host. ``base`` is the expert's base model (a
    ``core.models.BaseModel``): its full-weight components load with the base's classes."""
    folder = Path(folder)
    info = info or ExpertInfo.read(folder)
    if info.method in ("lora", "profusion"):
        extra = None
        if info.method == "profusion":
            from dreamfleet.core.profusion import ProFusionWeights

            extra = ProFusionWeights.read(folder, base)
        return ExpertWeights(info, lora=read_lora(folder / LORA_WEIGHTS), profusion=extra)
    modules = base.modules()
    names = [n for n in modules if n != "vae" and (n == base.kind.denoiser or (folder / n).is_dir())]
    return ExpertWeights(info, components={n: _component(type(modules[n]), folder / n) for n in names})


def read_lora(file: Path) -> dict[str, Any]:
    """A LoRA file's tensors, ready to load from memory. diffusers takes each adapter's
    ``lora_alpha`` from the file's metadata, which a state dict in memory does not carry
    (``load_lora_weights(dict)`` takes alpha = rank). So the scale ``alpha / rank`` is folded
    into the up-projections here, and the adapter loaded from memory computes what the file does."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    scales = {}
    for component in {k.split(".", 1)[0] for k in meta}:
        if meta.get(f"{component}.alpha_pattern") or meta.get(f"{component}.rank_pattern"):
            raise DataError(f"{file}: per-layer LoRA ranks or alphas are not supported; retrain with one rank")
        r, alpha = meta.get(f"{component}.r"), meta.get(f"{component}.lora_alpha")
        if r and alpha and alpha != r:
            scales[component] = alpha / r
    up = (".lora.up.", ".lora_linear_layer.up.", ".lora_B.")
    return {k: v * scales[k.split(".", 1)[0]] if k.split(".", 1)[0] in scales and any(u in k for u in up) else v
            for k, v in state.items()}


def _component(cls: Any, folder: Path) -> Any:
    if not folder.is_dir():
        raise DataError(f"{folder}: missing; the expert folder is incomplete (publish it again)")
    return cls.from_pretrained(folder).eval().requires_grad_(False)


def expert_pipeline(base: Any, weights: ExpertWeights, *, pipe: Any = None, adapter_name: str | None = None):
    """A diffusers pipeline over ``base`` with everything the expert holds applied: its LoRA
    adapter loaded into ``pipe`` (default: a new pipeline over the base's modules, which the
    adapter then modifies), or its full components in place of the base's."""
    if weights.lora is not None:
        pipe = pipe if pipe is not None else base.pipeline()
        pipe.load_lora_weights(dict(weights.lora), adapter_name=adapter_name)
        if weights.profusion is not None:  # sampled with Fusion Sampling, S* from its PromptNet
            from dreamfleet.core.profusion import fusion_pipeline

            return fusion_pipeline(pipe, weights.info, weights.profusion, base)
        return pipe
    return base.pipeline(**weights.components)


def open_expert(folder: str | Path) -> tuple[Any, ExpertInfo]:
    """(pipeline with the expert applied, its ExpertInfo) over a fresh copy of its base model
    (LoRA loading modifies the base's modules): for evaluation, demos and one-off renders."""
    from dreamfleet.core.models import load_base

    info = ExpertInfo.read(folder)
    base = load_base(info.base_model["spec"])
    return expert_pipeline(base, read_expert(folder, base, info)), info

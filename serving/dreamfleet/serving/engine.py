"""The generation engine of one replica: base pipelines, expert weights, batched generation.

Ray-free, so it is tested and benchmarked directly; the Ray Serve deployment wraps it.

- One base pipeline per base model. LoRA experts are adapters hot-swapped on it with the
  diffusers adapter API (``load_lora_weights`` / ``set_adapters`` / ``delete_adapters``);
  full-weight experts are whole UNets used in place of the base one.
- Expert weights are also kept in a host-memory LRU, so bringing an evicted expert back
  does not touch the disk.
- Generation holds a lock: only one expert's weights are active at a time, so concurrent
  requests never see another subject's adapter. Each call gets its own scheduler instance
  and its own per-image random generators.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from dreamfleet.core.devices import inference_dtype, resolve_device
from dreamfleet.core.expert import ExpertInfo, ExpertKey, ExpertWeights, expert_pipeline, read_expert
from dreamfleet.core.models import BaseModel, load_base

log = logging.getLogger("dreamfleet")


@dataclass
class GenItem:
    """One request's share of a pipeline call."""

    prompt: str
    num_images: int
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    fusion: dict[str, float] | None = None  # Fusion Sampling parameters (core.fusion.FusionParams fields)

    def shape_key(self) -> tuple:
        fusion = tuple(sorted(self.fusion.items())) if self.fusion is not None else None
        return (self.steps, self.guidance_scale, self.width, self.height, fusion)


@dataclass
class HostExpert:
    """An expert's weights in host memory (all of them: LoRA, or UNet and text encoder)."""

    weights: ExpertWeights
    version: str

    @property
    def info(self) -> ExpertInfo:
        return self.weights.info

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes


@dataclass
class EngineStats:
    loads_disk: int = 0
    loads_host: int = 0
    evictions: int = 0
    host_evictions: int = 0
    generations: int = 0
    images: int = 0
    swap_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        recent = self.swap_s[-100:]
        return {
            "loads_disk": self.loads_disk, "loads_host": self.loads_host, "evictions": self.evictions,
            "host_evictions": self.host_evictions, "generations": self.generations, "images": self.images,
            "last_swap_ms": round(recent[-1] * 1000, 2) if recent else None,
        }


def adapter_name(subject_id: str, version: str) -> str:
    # PEFT adapter names become module attribute keys: keep them to safe characters.
    return "x" + "".join(c if c.isalnum() else "_" for c in f"{subject_id}_{version}")


class ExpertEngine:
    def __init__(self, registry_uri: str, *, device: str = "auto", host_cache_size: int = 64):
        from dreamfleet.registry import Registry

        self.registry = Registry(registry_uri, create=False)
        self.device = resolve_device(device)
        self.dtype = inference_dtype(self.device)
        self.host_cache_size = host_cache_size
        self.bases: dict[str, BaseModel] = {}
        self.pipes: dict[str, Any] = {}  # base spec -> pipeline that owns the LoRA adapters
        self.host: collections.OrderedDict[tuple[str, str], HostExpert] = collections.OrderedDict()
        self.active: dict[tuple[str, str], str] = {}  # loaded on the device: (subject, version) -> adapter/"full"
        self.stats = EngineStats()
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ weights

    def base(self, spec: str) -> BaseModel:
        if spec not in self.bases:
            base = load_base(spec)
            for m in base.modules().values():
                m.to(self.device, self.dtype).eval().requires_grad_(False)
            self.bases[spec] = base
            self.pipes[spec] = base.pipeline()
        return self.bases[spec]

    def _host(self, subject_id: str, version: str) -> HostExpert:
        key = (subject_id, version)
        if key in self.host:
            self.host.move_to_end(key)
            self.stats.loads_host += 1
            return self.host[key]
        folder = self.registry.fetch(subject_id, version)
        info = ExpertInfo.read(folder)
        entry = HostExpert(read_expert(folder, self.base(info.base_model["spec"]), info), version)
        self.stats.loads_disk += 1
        self.host[key] = entry
        while len(self.host) > self.host_cache_size:
            old, _ = self.host.popitem(last=False)
            self.stats.host_evictions += 1
            self.evict(*old)
        return entry

    def load(self, subject_id: str, version: str) -> HostExpert:
        """Make the expert ready on the device (adapter loaded, or UNet moved).

        An expert already active is a use, not a load: it only moves up the host LRU, with no
        load counted and no swap time (a replica's multiplexing loads it, then ``generate`` asks)."""
        with self.lock:
            key = (subject_id, version)
            if key in self.active and key in self.host:
                self.host.move_to_end(key)
                return self.host[key]
            t0 = time.perf_counter()
            entry = self._host(subject_id, version)
            if key not in self.active:
                base = self.base(entry.info.base_model["spec"])
                if entry.info.method in ("lora", "profusion"):  # profusion: its q/k/v LoRA, then its PromptNet
                    name = adapter_name(subject_id, version)
                    self.pipes[base.spec].load_lora_weights(dict(entry.weights.lora), adapter_name=name)
                    if entry.weights.profusion is not None:
                        entry.weights.profusion.promptnet.to(self.device, self.dtype)
                    self.active[key] = name
                else:
                    entry.weights.to(self.device, self.dtype)
                    self.active[key] = "full"
            self.stats.swap_s.append(time.perf_counter() - t0)
            return entry

    def evict(self, subject_id: str, version: str) -> None:
        """Unload from the device (the host copy stays, unless the host LRU dropped it)."""
        with self.lock:
            key = (subject_id, version)
            what = self.active.pop(key, None)
            if what is None:
                return
            self.stats.evictions += 1
            entry = self.host.get(key)
            if what == "full":
                if entry is not None:
                    entry.weights.to("cpu")
                return
            if entry is not None and entry.weights.profusion is not None:
                entry.weights.profusion.promptnet.to("cpu")
            for pipe in self.pipes.values():
                if any(what in (names or []) for names in pipe.get_list_adapters().values()):
                    pipe.delete_adapters(what)

    def loaded(self) -> list[str]:
        with self.lock:
            return [str(ExpertKey(s, v)) for s, v in self.active]

    # ------------------------------------------------------------------ generation

    def _pipeline_for(self, entry: HostExpert):
        """A pipeline over the shared modules with this expert active and a fresh scheduler."""
        base = self.base(entry.info.base_model["spec"])
        owner = self.pipes[base.spec]
        loaded = owner.get_list_adapters()  # {"unet" or "transformer": [...], "text_encoder": [...], ...}
        if entry.info.method in ("lora", "profusion"):
            name = adapter_name(entry.info.subject_id, entry.version)
            for component, names in loaded.items():
                module = getattr(owner, component)
                if name in names:
                    module.enable_adapters()
                    module.set_adapter(name)
                else:  # e.g. a UNet-only expert while another expert's text-encoder adapter is loaded
                    module.disable_adapters()
            pipe = base.pipeline()  # shares the modules; its own scheduler instance
            if entry.weights.profusion is not None:  # Fusion Sampling, S* from the expert's PromptNet
                from dreamfleet.core.profusion import fusion_pipeline

                return fusion_pipeline(pipe, entry.info, entry.weights.profusion, base)
            return pipe
        for component in loaded:
            getattr(owner, component).disable_adapters()
        return expert_pipeline(base, entry.weights)  # the expert's UNet and text encoder, the base's VAE

    @staticmethod
    def _fusion(pipe, entry: HostExpert):
        """The pipeline sampled with Fusion Sampling: a ProFusion expert's already is; a
        DreamBooth expert's gets C = the prompt, C̃ = the prompt with the class noun for [V]."""
        from dreamfleet.core.fusion import FusionPipeline

        if isinstance(pipe, FusionPipeline):
            return pipe
        if entry.info.base_model.get("family", "sd") != "sd":
            from dreamfleet.core.errors import ConfigError

            raise ConfigError("Fusion Sampling runs on Stable Diffusion 1.x/2.x experts (DDIM over a UNet)")
        return FusionPipeline(pipe, identifier=entry.info.identifier, class_noun=entry.info.class_noun)

    def generate(self, subject_id: str, version: str, items: list[GenItem]) -> list[list[Image.Image]]:
        """Images for each item, in order. Items with the same shape share one pipeline call."""
        out: list[list[Image.Image] | None] = [None] * len(items)
        with self.lock:
            entry = self.load(subject_id, version)
            pipe = self._pipeline_for(entry)
            groups: dict[tuple, list[int]] = collections.defaultdict(list)
            for i, item in enumerate(items):
                groups[item.shape_key()].append(i)
            for (steps, guidance, width, height, fusion), idx in groups.items():
                prompts, generators = [], []
                gen_device = self.device if self.device.type == "cuda" else "cpu"
                for i in idx:
                    it = items[i]
                    prompts += [it.prompt] * it.num_images
                    generators += [torch.Generator(gen_device).manual_seed(it.seed + j) for j in range(it.num_images)]
                call = pipe if fusion is None else self._fusion(pipe, entry)
                with torch.inference_mode():
                    images = call(prompts, num_inference_steps=steps, guidance_scale=guidance, width=width,
                                  height=height, generator=generators, **dict(fusion or ())).images
                pos = 0
                for i in idx:
                    out[i] = images[pos:pos + items[i].num_images]
                    pos += items[i].num_images
                self.stats.generations += 1
                self.stats.images += len(images)
        return out  # type: ignore[return-value]

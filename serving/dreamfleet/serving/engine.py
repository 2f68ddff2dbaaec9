"""The generation engine of one replica: base pipelines, expert weights, batched generation.

Ray-free, so it is tested and benchmarked directly; the Ray Serve deployment wraps it.

- One base pipeline per base model. LoRA experts are adapters hot-swapped on it with the
  diffusers adapter API (``load_lora_weights`` / ``set_adapters`` / ``delete_adapters``);
  full-weight experts are whole UNets used in place of the base one.
- Expert weights are also kept in a host-memory LRU, so bringing an evicted expert back
  does not touch the disk.
- Plain LoRA experts (denoiser-only, no DoRA) go into a :class:`~dreamfleet.core.multilora.LoRABank`
  per base model instead: requests for different such experts with the same shape share one
  denoiser pass, each image through its own expert's adapter (mixed-subject batches).
- Generation holds a lock, and each pass routes every image to exactly one expert's weights,
  so concurrent requests never see another subject's adapter. Each call gets its own
  scheduler instance and its own per-image random generators.
- Each request carries a :class:`Ticket` (its deadline and a cancel flag). Dead requests are
  dropped before a pass, and a pass whose requests have all died stops between denoising steps.
"""

from __future__ import annotations

import collections
import inspect
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
from dreamfleet.core.multilora import LoRABank, split_lora

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


class Cancelled(Exception):
    """The request was cancelled by its client or ran past its deadline."""


class ExpertUnavailable(Exception):
    """An expert's weights could not be loaded (a missing or damaged file): its requests fail, others go on."""


@dataclass
class Ticket:
    """One request's deadline (``time.time()`` seconds, None: none) and cancel flag."""

    deadline: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def dead(self) -> bool:
        return self.cancelled.is_set() or (self.deadline is not None and time.time() > self.deadline)


@dataclass
class Job:
    """One request in a replica's batch: which expert, what to render, and its ticket."""

    subject_id: str
    version: str
    item: GenItem
    ticket: Ticket = field(default_factory=Ticket)

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject_id, self.version)


@dataclass
class HostExpert:
    """An expert's weights in host memory (all of them: LoRA, or UNet and text encoder)."""

    weights: ExpertWeights
    version: str
    bank_pairs: dict[str, Any] | None = None  # a plain denoiser LoRA, served from the base's LoRABank

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
    mixed_passes: int = 0  # passes that served more than one expert
    cancelled: int = 0
    swap_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        recent = self.swap_s[-100:]
        return {
            "loads_disk": self.loads_disk, "loads_host": self.loads_host, "evictions": self.evictions,
            "host_evictions": self.host_evictions, "generations": self.generations, "images": self.images,
            "mixed_passes": self.mixed_passes, "cancelled": self.cancelled,
            "last_swap_ms": round(recent[-1] * 1000, 2) if recent else None,
        }


def adapter_name(subject_id: str, version: str) -> str:
    # PEFT adapter names become module attribute keys: keep them to safe characters.
    return "x" + "".join(c if c.isalnum() else "_" for c in f"{subject_id}_{version}")


class ExpertEngine:
    def __init__(self, registry_uri: str, *, device: str = "auto", host_cache_size: int = 64,
                 max_active: int | None = None):
        """``max_active``: full fine-tunes and PEFT adapters kept on the device (least recently
        used leave first; None: no bound). Plain LoRA experts live in the bank, bounded by the
        host cache: a few MB each, they need no bound of their own."""
        from dreamfleet.registry import Registry

        self.registry = Registry(registry_uri, create=False)
        self.device = resolve_device(device)
        self.dtype = inference_dtype(self.device)
        self.host_cache_size, self.max_active = host_cache_size, max_active
        self.bases: dict[str, BaseModel] = {}
        self.pipes: dict[str, Any] = {}  # base spec -> pipeline that owns the PEFT adapters
        self.banks: dict[str, LoRABank] = {}  # base spec -> plain LoRA experts, routed per image
        self.host: collections.OrderedDict[tuple[str, str], HostExpert] = collections.OrderedDict()
        self.active: dict[tuple[str, str], str] = {}  # on the device: (subject, version) -> adapter/"bank"/"full"
        self.stats = EngineStats()
        self.lock = threading.RLock()
        self._pinned: set[tuple[str, str]] = set()  # the experts of the call running: evicted after it
        self._evict_later: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ weights

    def base(self, spec: str) -> BaseModel:
        if spec not in self.bases:
            base = load_base(spec)
            for m in base.modules().values():
                m.to(self.device, self.dtype).eval().requires_grad_(False)
            self.bases[spec] = base
            self.pipes[spec] = base.pipeline()
            self.banks[spec] = LoRABank(base.denoiser)
        return self.bases[spec]

    def _host(self, subject_id: str, version: str) -> HostExpert:
        key = (subject_id, version)
        if key in self.host:
            self.host.move_to_end(key)
            self.stats.loads_host += 1
            return self.host[key]
        folder = self.registry.fetch(subject_id, version)
        info = ExpertInfo.read(folder)
        base = self.base(info.base_model["spec"])
        entry = HostExpert(read_expert(folder, base, info), version)
        if info.method == "lora":
            pairs = split_lora(entry.weights.lora, base.kind.denoiser)
            entry.bank_pairs = pairs if self.banks[base.spec].supports(pairs) else None
        self.stats.loads_disk += 1
        self.host[key] = entry
        while len(self.host) > self.host_cache_size:
            old, _ = self.host.popitem(last=False)
            self.stats.host_evictions += 1
            self._evict_now(*old)
        return entry

    def load(self, subject_id: str, version: str) -> HostExpert:
        """Make the expert ready on the device (in the bank, adapter loaded, or UNet moved).

        An expert already active is a use, not a load: it only moves up the host LRU, with no
        load counted and no swap time (a replica's multiplexing loads it, then ``generate`` asks)."""
        with self.lock:
            if not self._pinned:
                self._drain_evictions()
            key = (subject_id, version)
            if key in self.active and key in self.host:
                self.host.move_to_end(key)
                return self.host[key]
            t0 = time.perf_counter()
            entry = self._host(subject_id, version)
            if key not in self.active:
                self.active[key] = self._activate(key, entry)
                self._bound_active()
            self.stats.swap_s.append(time.perf_counter() - t0)
            self.stats.swap_s = self.stats.swap_s[-100:]
            return entry

    def _bound_active(self) -> None:
        """Evict the least recently used full or PEFT experts beyond ``max_active``."""
        heavy = [k for k in self.host if self.active.get(k) not in (None, "bank") and k not in self._pinned]
        over = sum(1 for what in self.active.values() if what != "bank") - (self.max_active or len(self.active))
        for key in heavy[:max(0, over)]:
            self._evict_now(*key)

    def _activate(self, key: tuple[str, str], entry: HostExpert) -> str:
        base = self.base(entry.info.base_model["spec"])
        if entry.bank_pairs is not None:
            self.banks[base.spec].add(key, entry.bank_pairs)
            return "bank"
        if entry.info.method in ("lora", "profusion"):  # profusion: its q/k/v LoRA, then its PromptNet
            name = adapter_name(*key)
            self.pipes[base.spec].load_lora_weights(dict(entry.weights.lora), adapter_name=name)
            if entry.weights.profusion is not None:
                entry.weights.profusion.promptnet.to(self.device, self.dtype)
            return name
        entry.weights.to(self.device, self.dtype)
        return "full"

    def evict(self, subject_id: str, version: str) -> None:
        """Unload from the device (the host copy stays, unless the host LRU dropped it). While
        a pass runs (the multiplexing LRU may drop an expert at any time) it waits for the next call."""
        self._evict_later.append((subject_id, version))
        if self.lock.acquire(blocking=False):
            try:
                if not self._pinned:
                    self._drain_evictions()
            finally:
                self.lock.release()

    def _drain_evictions(self) -> None:
        while self._evict_later:
            self._evict_now(*self._evict_later.pop(0))

    def _evict_now(self, subject_id: str, version: str) -> None:
        key = (subject_id, version)
        if key in self._pinned:  # the running call renders it (the host LRU dropped it meanwhile)
            self._evict_later.append(key)
            return
        what = self.active.pop(key, None)
        if what is None:
            return
        self.stats.evictions += 1
        entry = self.host.get(key)
        if what == "bank":
            for bank in self.banks.values():
                bank.remove(key)
            return
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
        """The experts on the device. Lock-free (``list`` of a dict is atomic under the GIL): the
        replica's event loop calls it, and must not wait for a pass to end."""
        return [str(ExpertKey(s, v)) for s, v in list(self.active)]

    # ------------------------------------------------------------------ generation

    def _peft_off(self, owner) -> None:
        for component in owner.get_list_adapters():
            getattr(owner, component).disable_adapters()

    def _pipeline_for(self, entry: HostExpert):
        """A pipeline over the shared modules with this expert active and a fresh scheduler."""
        base = self.base(entry.info.base_model["spec"])
        owner = self.pipes[base.spec]
        if entry.bank_pairs is not None:  # routed per image by the bank
            self._peft_off(owner)
            return base.pipeline()
        if entry.info.method in ("lora", "profusion"):
            loaded = owner.get_list_adapters()  # {"unet" or "transformer": [...], "text_encoder": [...], ...}
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
        self._peft_off(owner)
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
        """Images for each item, in order (one expert; see :meth:`generate_jobs` for a mixed batch)."""
        out = self.generate_jobs([Job(subject_id, version, it) for it in items])
        for r in out:
            if isinstance(r, Exception):
                raise r
        return out  # type: ignore[return-value]

    def generate_jobs(self, jobs: list[Job]) -> list[list[Image.Image] | Exception]:
        """Images for each job, in order, or the exception that failed it (one expert's failure,
        or one request's cancellation, does not fail the others). Jobs with the same base model
        and shape share one pass: plain LoRA experts' across experts, the others' per expert."""
        out: list[list[Image.Image] | Exception | None] = [None] * len(jobs)
        with self.lock:
            self._drain_evictions()
            self._pinned = {job.key for job in jobs}
            try:
                entries = self._load_all(jobs, out)
                for idx in self._passes(jobs, entries, out).values():
                    self._run_pass(jobs, idx, entries, out)
            finally:
                self._pinned = set()
                self._drain_evictions()
                self._bound_active()
        return out  # type: ignore[return-value]

    def _load_all(self, jobs: list[Job], out: list) -> dict[tuple[str, str], HostExpert]:
        entries: dict[tuple[str, str], HostExpert] = {}
        for i, job in enumerate(jobs):
            if job.ticket.dead():
                out[i] = Cancelled("cancelled by the client or past its deadline before it started")
                self.stats.cancelled += 1
                continue
            try:
                if job.key not in entries:
                    entries[job.key] = self.load(*job.key)
            except Exception as e:
                log.exception("loading %s failed", ExpertKey(*job.key))
                out[i] = ExpertUnavailable(f"expert {ExpertKey(*job.key)} could not be loaded ({type(e).__name__}: {e})")
        return entries

    @staticmethod
    def _passes(jobs: list[Job], entries: dict, out: list) -> dict[tuple, list[int]]:
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, job in enumerate(jobs):
            if out[i] is not None:
                continue
            entry = entries[job.key]
            mixed = entry.bank_pairs is not None and job.item.fusion is None
            who = entry.info.base_model["spec"] if mixed else job.key
            groups[(mixed, who, job.item.shape_key())].append(i)
        return groups

    def _run_pass(self, jobs: list[Job], idx: list[int], entries: dict, out: list) -> None:
        first = entries[jobs[idx[0]].key]
        steps, guidance, width, height, fusion = jobs[idx[0]].item.shape_key()
        prompts, generators, route = [], [], []
        gen_device = self.device if self.device.type == "cuda" else "cpu"
        for i in idx:
            it = jobs[i].item
            prompts += [it.prompt] * it.num_images
            generators += [torch.Generator(gen_device).manual_seed(it.seed + j) for j in range(it.num_images)]
            route += [jobs[i].key] * it.num_images
        try:
            pipe = self._pipeline_for(first)
            call = pipe if fusion is None else self._fusion(pipe, first)
            extra = {}
            if "callback_on_step_end" in inspect.signature(call.__call__).parameters:  # not Fusion Sampling's
                extra["callback_on_step_end"] = self._stop_when_dead([jobs[i].ticket for i in idx])
            bank = self.banks[first.info.base_model["spec"]]
            with torch.inference_mode(), bank.route(route if first.bank_pairs is not None else None):
                images = call(prompts, num_inference_steps=steps, guidance_scale=guidance, width=width,
                              height=height, generator=generators, **dict(fusion or ()), **extra).images
        except Exception as e:
            if not isinstance(e, Cancelled):
                log.exception("generation failed for %s", sorted({str(ExpertKey(*jobs[i].key)) for i in idx}))
            self.stats.cancelled += len(idx) if isinstance(e, Cancelled) else 0
            for i in idx:
                out[i] = e
            return
        pos = 0
        for i in idx:
            out[i] = images[pos:pos + jobs[i].item.num_images]
            pos += jobs[i].item.num_images
        self.stats.generations += 1
        self.stats.mixed_passes += len({jobs[i].key for i in idx}) > 1
        self.stats.images += len(images)

    @staticmethod
    def _stop_when_dead(tickets: list[Ticket]):
        """A diffusers step callback that stops the pass once every request in it has died."""

        def check(pipe, step, timestep, kwargs):
            if all(t.dead() for t in tickets):
                raise Cancelled("every request of this pass was cancelled or ran past its deadline")
            return kwargs

        return check

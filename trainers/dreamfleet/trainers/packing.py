"""Multi-subject packing: several subjects' LoRA DreamBooth runs share one UNet pass.

A batch of LoRA DreamBooth is tiny (1 instance + 1 class image), so one subject's run leaves a
GPU mostly idle. Packing trains S subjects at once: each LoRA-targeted Linear of the frozen
UNet holds the S adapters stacked (A [S, r, in], B [S, out, r]), and sample i of the batch
goes through adapter ``subject[i]`` (batched LoRA, as in S-LoRA and Punica).

Each subject's micro-batch is drawn by its own :class:`DreamBoothObjective`, from its own
seed, exactly as its solo run draws it. The loss is the sum of the subjects' own DreamBooth
losses; samples do not interact in the UNet, so adapter s gets exactly the gradient of
subject s's loss. AdamW is elementwise and :class:`PackedEngine` clips each subject's
gradient by its own norm, so each adapter follows its solo run up to float summation order.
Each subject is published as an ordinary LoRA expert.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from dreamfleet.core.config import to_dict
from dreamfleet.core.errors import ConfigError
from dreamfleet.core.families import cat_cond, cat_noisy
from dreamfleet.trainers.dreambooth import (
    DreamBoothObjective,
    PreparedSubject,
    loop_settings,
    place_module,
    quantize_frozen,
    save_validation_grid,
    setup_frozen,
)
from dreamfleet.trainers.loop import LocalEngine, LoopResult, LoopSettings
from dreamfleet.trainers.lora import LoraWeights, initial_lora

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


class SubjectRouter:
    """Which adapter each sample of the next UNet pass goes through: a tensor of subject
    indices, one per sample, or one index for the whole batch (validation images)."""

    def __init__(self) -> None:
        self.subjects: torch.Tensor | int | None = None


class PackedLoRALinear(torch.nn.Module):
    """A frozen Linear plus S LoRA adapters: ``base(x) + scale * B[s] @ A[s] @ x`` with s the
    sample's subject, as PEFT's ``lora_B(lora_A(x)) * scaling`` for one adapter."""

    def __init__(
        self,
        base: torch.nn.Linear,
        a_sri: torch.Tensor,
        b_sor: torch.Tensor,
        scale: float,
        router: SubjectRouter,
        name: str,
    ):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Parameter(a_sri)
        self.lora_B = torch.nn.Parameter(b_sor)
        self.scale, self.router, self.name = scale, router, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)  # frozen weights in a low precision, adapter in fp32
        sel = self.router.subjects
        if isinstance(sel, int):
            delta = F.linear(F.linear(x, self.lora_A[sel]), self.lora_B[sel])
        else:
            n = x.shape[0]
            if sel is None or sel.numel() != n:
                got = "none" if sel is None else f"{sel.numel()}"
                raise RuntimeError(
                    f"packed LoRA {self.name}: input has {n} samples but {got} subject indices "
                    "were selected; call PackedLoRA.select before the UNet"
                )
            x_nti = x.reshape(n, -1, x.shape[-1])  # attention inputs are (batch, tokens, features)
            h_ntr = torch.bmm(x_nti, self.lora_A[sel].transpose(1, 2))
            delta = torch.bmm(h_ntr, self.lora_B[sel].transpose(1, 2)).reshape(*x.shape[:-1], -1)
        return out + (delta * self.scale).to(out.dtype)


class PackedLoRA:
    """S subjects' LoRA adapters on the target modules of one UNet."""

    def __init__(self, unet: torch.nn.Module, adapters: Sequence[LoraWeights]):
        first = adapters[0]
        for w in adapters[1:]:
            if w.layers.keys() != first.layers.keys() or w.metadata != first.metadata:
                raise ConfigError("packed adapters must have the same target modules, rank and alpha")
        self.unet, self.router, self.metadata = unet, SubjectRouter(), first.metadata
        self.layers: dict[str, PackedLoRALinear] = {}
        for name in [k[: -len(LORA_A)] for k in first.layers if k.endswith(LORA_A)]:
            base = unet.get_submodule(name)
            device = base.weight.device
            a_sri = torch.stack([w.layers[name + LORA_A] for w in adapters]).to(device)
            b_sor = torch.stack([w.layers[name + LORA_B] for w in adapters]).to(device)
            layer = PackedLoRALinear(base, a_sri, b_sor, first.scale, self.router, name)
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, layer)
            self.layers[name] = layer

    @property
    def num_subjects(self) -> int:
        return next(iter(self.layers.values())).lora_A.shape[0]

    def select(self, subjects: torch.Tensor | int) -> None:
        """Route the next UNet passes: one subject index per sample, or one for all samples."""
        self.router.subjects = subjects

    def adapter(self, i: int) -> LoraWeights:
        """Subject i's adapter, in the format :func:`dreamfleet.trainers.lora.write_lora` saves."""
        layers = {}
        for name, layer in self.layers.items():
            layers[name + LORA_A] = layer.lora_A[i].detach().to("cpu", torch.float32).contiguous()
            layers[name + LORA_B] = layer.lora_B[i].detach().to("cpu", torch.float32).contiguous()
        return LoraWeights(layers, self.metadata)

    def remove(self) -> None:
        """Put the plain Linear layers back (the UNet is the base model again)."""
        for name, layer in self.layers.items():
            parent, _, child = name.rpartition(".")
            setattr(self.unet.get_submodule(parent), child, layer.base)
        self.layers = {}


# --------------------------------------------------------------------------- objective and engine


class PackedObjective:
    """The sum of S subjects' DreamBooth losses, in one UNet pass (an :class:`Objective`)."""

    def __init__(
        self, objectives: Sequence[DreamBoothObjective], packed: PackedLoRA, subject_ids: Sequence[str]
    ):
        self.objectives, self.packed, self.subject_ids = list(objectives), packed, list(subject_ids)
        self.forward_unet = packed.unet
        self._routes: dict[tuple[int, ...], torch.Tensor] = {}

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.packed.unet}

    def _route(self, sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
        if sizes not in self._routes:
            index = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
            self._routes[sizes] = index.to(device)
        return self._routes[sizes]

    def loss(self, step: int, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batches = [o.batch(step, micro_step) for o in self.objectives]
        sizes = tuple(b.size for b in batches)
        noisy = cat_noisy([b.noisy for b in batches])
        self.packed.select(self._route(sizes, noisy.noisy.device))
        first = self.objectives[0]
        pred_bchw = first.kind.predict(self.forward_unet, noisy, cat_cond([b.cond for b in batches]), first.cfg)
        total, names, values = None, [], []
        for sid, o, b, pred_s in zip(
            self.subject_ids, self.objectives, batches, pred_bchw.split(sizes), strict=True
        ):
            terms = o.loss_terms(pred_s, b)
            total = terms["loss"] if total is None else total + terms["loss"]
            names += [f"{sid}/{k}" for k in terms]
            values += [v.detach() for v in terms.values()]
        metrics = dict(zip(names, torch.stack(values).tolist(), strict=True))  # one device sync
        for sid in self.subject_ids:
            if not math.isfinite(metrics[f"{sid}/loss"]):
                raise FloatingPointError(
                    f"subject {sid!r}: loss became {metrics[f'{sid}/loss']} at step {step + 1} "
                    "of a packed run; lower its learning rate or train it alone"
                )
        metrics["loss"] = sum(metrics[f"{sid}/loss"] for sid in self.subject_ids)
        return total, metrics


class PackedEngine(LocalEngine):
    """:class:`LocalEngine` with per-subject gradient clipping: every trainable tensor is
    stacked over subjects (dim 0), and subject s's slices are clipped by their own global norm,
    as ``clip_grad_norm_`` clips them in s's solo run. AdamW itself is elementwise."""

    def __init__(self, objective: PackedObjective, s: LoopSettings):
        super().__init__(objective, s)
        self.subject_ids = objective.subject_ids
        bad = [tuple(p.shape) for p in self.params if p.shape[0] != len(self.subject_ids)]
        if bad:
            raise RuntimeError(
                f"packed engine: trainable tensors not stacked over {len(self.subject_ids)} subjects: {bad}"
            )

    def clip_gradients(self) -> dict[str, float]:
        grads = [p.grad for p in self.params if p.grad is not None]
        # As clip_grad_norm_: the norm of the per-tensor norms, here one per subject.
        norms_ps = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])
        norm_s = torch.linalg.vector_norm(norms_ps, dim=0)
        coef_s = (self.s.optimizer.max_grad_norm / (norm_s + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef_s.to(g.dtype).view(-1, *[1] * (g.dim() - 1)))
        return {f"{sid}/grad_norm": v for sid, v in zip(self.subject_ids, norm_s.tolist(), strict=True)}


# --------------------------------------------------------------------------- setup


def check_packable(prepared: Sequence[PreparedSubject]) -> None:
    """Subjects pack when they share the base model and every config field but the seed."""
    if not prepared:
        raise ConfigError("packing needs at least one subject")
    ids = [p.subject.subject_id for p in prepared]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"subjects {dupes} appear more than once in the pack")
    first = prepared[0]
    cfg = first.cfg
    if any(p.cfg.method != "lora" or p.cfg.train_text_encoder or p.cfg.use_dora for p in prepared):
        raise ConfigError(
            "packing trains plain UNet LoRA adapters only (method=lora, train_text_encoder and use_dora off); "
            "train other subjects one at a time with train_subject (--pack 1)"
        )
    if first.autocast_dtype == torch.float16:
        raise ConfigError(
            "packing does not support fp16 mixed precision (one grad scaler would skip every "
            "subject's step when one overflows); use bf16 or no mixed precision"
        )
    shared = to_dict(dataclasses.replace(cfg, seed=0))
    for p in prepared[1:]:
        if p.base is not first.base:
            raise ConfigError(f"subject {p.subject.subject_id!r}: packed subjects must share one base model")
        other = to_dict(dataclasses.replace(p.cfg, seed=0))
        diff = [k for k in shared if shared[k] != other[k]]
        if diff:
            raise ConfigError(
                f"subject {p.subject.subject_id!r}: packed subjects share every config field but seed; "
                f"{diff[0]!r} is {other[diff[0]]!r} here and {shared[diff[0]]!r} for {ids[0]!r}"
            )


def setup_packed(prepared: Sequence[PreparedSubject]) -> PackedLoRA:
    """Freeze the base model and put each subject's initial adapter (the one its solo run
    starts from: same rank, alpha, targets, seed) into stacked packed layers."""
    check_packable(prepared)
    p0 = prepared[0]
    cfg, unet = p0.cfg, p0.base.denoiser
    setup_frozen(p0)
    place_module(unet, p0.device, p0.weight_dtype)
    quantize_frozen(p0)
    inits: dict[int, LoraWeights] = {}
    for p in prepared:
        if p.cfg.seed not in inits:
            inits[p.cfg.seed] = initial_lora(
                unet, cfg.lora_rank, cfg.lora_alpha, list(p0.base.kind.lora_targets), seed=p.cfg.seed
            )
    packed = PackedLoRA(unet, [inits[p.cfg.seed] for p in prepared])
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # recomputation sees the same routing: select() persists
    unet.train()
    return packed


def packed_objective(prepared: Sequence[PreparedSubject], packed: PackedLoRA) -> PackedObjective:
    objectives = [DreamBoothObjective.from_prepared(p) for p in prepared]
    return PackedObjective(objectives, packed, [p.subject.subject_id for p in prepared])


def packed_loop_settings(prepared: Sequence[PreparedSubject], *, progress: bool = True) -> LoopSettings:
    s = loop_settings(prepared[0], progress=progress)
    return dataclasses.replace(s, description=f"packed dreambooth x{len(prepared)}")


def subject_result(result: LoopResult, subject_id: str) -> LoopResult:
    """One subject's view of a packed run: its own losses and gradient norm, the shared lr."""
    prefix = f"{subject_id}/"
    history = [
        {
            "step": h["step"],
            **{k[len(prefix) :]: v for k, v in h.items() if k.startswith(prefix)},
            **({"lr": h["lr"]} if "lr" in h else {}),
        }
        for h in result.history
    ]
    return dataclasses.replace(result, history=history)


def pack_work_dir(out_dirs: Sequence[Path]) -> Path:
    """Checkpoints of a packed run: beside the first expert, named after all the pack's experts."""
    key = hashlib.sha256("\n".join(str(Path(o).resolve()) for o in out_dirs).encode()).hexdigest()[:12]
    return Path(out_dirs[0]).parent / f".pack-{key}.work"


# --------------------------------------------------------------------------- the trainer


def save_packed_validation(packed, prepared: Sequence[PreparedSubject], works: Sequence[Path], step: int) -> None:
    """Each packed subject's validation grid at ``step``, its adapter selected in turn."""
    for i, (p, work) in enumerate(zip(prepared, works, strict=True)):
        packed.select(i)
        save_validation_grid(p, work, step)

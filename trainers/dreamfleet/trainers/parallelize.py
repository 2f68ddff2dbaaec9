"""The distributed engine around the one loop, as torchtitan's ``parallelize.py``: the model
and the loop never know whether they run alone, under DDP or under DeepSpeed ZeRO-2/3.

Ray Train (or any launcher) has already created the process group; :func:`build_engine`
wraps a prepared objective for this rank and returns the loop's ``Engine``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamfleet.core.errors import ConfigError
from dreamfleet.trainers.loop import Engine, LocalEngine, LoopSettings, make_scheduler


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> DistContext:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            return cls(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()

    def broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        import torch.distributed as tdist

        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        if self.world_size == 1:
            return ok
        import torch.distributed as tdist

        flag = torch.tensor([0 if ok else 1])
        tdist.all_reduce(flag)
        return int(flag.item()) == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as tdist

            tdist.barrier()


def gather_pids(dist: DistContext) -> list[int]:
    if dist.world_size == 1:
        return [os.getpid()]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, os.getpid())
    return [int(x) for x in out]


# --------------------------------------------------------------------------- engines


def _skip_shm_comm_op() -> None:
    """DeepSpeed's CPU backend compiles its shared-memory all-reduce op with g++ in
    ``init_distributed`` (~50 s on 2 cores, again on every new machine or virtualenv). That op
    serves only ``inference_all_reduce`` (tensor-parallel inference); ZeRO training reduces
    through the gloo process group either way, so a CPU training run does not build it.
    ``deepspeed.ops.__compatible_ops__`` is one cached dict that DeepSpeed keeps edits to."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """The loop's Engine over ``deepspeed.initialize`` (ZeRO stage 2 or 3, optional CPU offload).

    Ray Train has already created the process group (gloo on CPU, NCCL on GPU); DeepSpeed
    adopts it. The loop divides the loss by the accumulation steps itself, so DeepSpeed's
    own scaling is switched off, and the micro-steps inside one optimizer step are stepped
    through DeepSpeed so that it knows where the accumulation boundary is.
    """

    def __init__(self, objective, s: LoopSettings, stage: int, offload: bool):
        import deepspeed

        if getattr(objective.cfg, "train_text_encoder", False):
            raise ConfigError("train_text_encoder is not supported with DeepSpeed ZeRO here; use --zero-stage 0")
        for name, value, plain in (("optimizer", getattr(s.optimizer, "optimizer", "adamw"), "adamw"),
                                   ("quantize_base", getattr(objective.cfg, "quantize_base", "no"), "no"),
                                   ("ema_decay", getattr(s.optimizer, "ema_decay", 0.0), 0.0)):
            if value != plain:
                raise ConfigError(f"{name}={value!r} is not supported with DeepSpeed ZeRO (ZeRO shards its own "
                                  f"AdamW states and fp32 weights); use --zero-stage 0 (DDP), or {name}={plain!r}")
        self.objective, self.s, o = objective, s, s.optimizer
        params = [p for p in objective.denoiser.parameters() if p.requires_grad]
        ds_config = {
            "train_micro_batch_size_per_gpu": objective.cfg.batch_size,
            "gradient_accumulation_steps": s.loop.gradient_accumulation_steps,
            "gradient_clipping": s.optimizer.max_grad_norm,
            "zero_optimization": {"stage": stage},
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": o.learning_rate, "betas": [o.adam_beta1, o.adam_beta2], "eps": o.adam_epsilon,
                           "weight_decay": o.adam_weight_decay, **({} if offload else {"torch_adam": True})},
            },
            "bf16": {"enabled": s.autocast_dtype == torch.bfloat16},
            "fp16": {"enabled": s.autocast_dtype == torch.float16},
            "checkpoint": {"use_node_local_storage": True},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if offload:
            ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if s.device.type == "cpu":
            _skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend="gloo" if s.device.type == "cpu" else "nccl")
        self.engine, _, _, _ = deepspeed.initialize(
            model=objective.denoiser,
            model_parameters=params,
            config=ds_config,
            lr_scheduler=lambda opt: make_scheduler(opt, s),
        )
        self.stage = stage
        self._micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self._micro += 1
        if self._micro < self.s.loop.gradient_accumulation_steps:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def step(self) -> dict[str, float]:
        self.engine.step()
        self._micro = 0
        out = {"lr": float(self.engine.get_lr()[0])}
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            out["grad_norm"] = float(norm)
        return out

    def save(self, folder: Path, *, is_main: bool) -> None:
        self.engine.save_checkpoint(str(folder), tag="ds")

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="ds", load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}")

    def full_unet_state(self) -> dict[str, torch.Tensor] | None:
        """The consolidated full weights (collective under ZeRO-3; rank 0 gets the dict)."""
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return None


def build_engine(objective, s: LoopSettings, dist: DistContext, zero_stage: int, offload: bool) -> Engine:
    if zero_stage in (2, 3):
        return DeepSpeedEngine(objective, s, zero_stage, offload)
    if zero_stage != 0:
        raise ConfigError(f"zero_stage must be 0, 2 or 3, got {zero_stage}")
    if offload:
        raise ConfigError("--offload needs DeepSpeed: pass --zero-stage 2 or 3")
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [s.device.index or 0] if s.device.type == "cuda" else None
        objective.forward_unet = DistributedDataParallel(objective.denoiser, device_ids=device_ids)
    return LocalEngine(objective, s)

"""Many LoRA experts on one frozen denoiser, each sample of a pass through its own adapter.

Serving uses this to render requests for different experts in one denoiser pass (batched
LoRA, as in S-LoRA and Punica); the trainer's packing (``trainers.packing``) is the same idea
with trainable adapters. Each LoRA-targeted ``Linear`` gets a forward hook that adds
``B[s] @ A[s] @ x`` for sample i's slot ``s = slots[i]``; slot -1 adds nothing. A hook
leaves the module itself in place, so PEFT adapters (which wrap the same ``Linear``) still
load beside the bank; :meth:`LoRABank.route` decides, per pass, whether the bank adds anything.

The adapters are kept stacked, ``A [S, r, in]`` and ``B [S, out, r]``, with smaller ranks
zero-padded (zero rows add exact zeros). The scale ``alpha / r`` is already folded into the
up-projections (:func:`dreamfleet.core.expert.read_lora`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

DOWN = (".lora.down.weight", ".lora_A.weight", ".lora_linear_layer.down.weight")
UP = (".lora.up.weight", ".lora_B.weight", ".lora_linear_layer.up.weight")


def split_lora(state: dict[str, torch.Tensor], component: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (A, B)}`` of one component's plain LoRA, or ``{}`` if the state holds
    anything a bank cannot add (another component's keys, DoRA magnitudes, biases)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    prefix = component + "."
    for key, value in state.items():
        if not key.startswith(prefix):
            return {}
        end = next((s for s in (*DOWN, *UP) if key.endswith(s)), None)
        if end is None:
            return {}
        pairs.setdefault(key[len(prefix):-len(end)], {})["A" if end in DOWN else "B"] = value
    if any(len(p) != 2 for p in pairs.values()):
        return {}
    return {name: (p["A"], p["B"]) for name, p in pairs.items()}


class _Layer:
    """One ``Linear``'s stacked adapters and the hook that applies them."""

    def __init__(self, bank: LoRABank, module: torch.nn.Linear, name: str):
        self.bank, self.name = bank, name
        w = module.weight
        self.a = w.new_zeros(0, 0, module.in_features)
        self.b = w.new_zeros(0, module.out_features, 0)
        self.handle = module.register_forward_hook(self._hook)

    def put(self, slot: int, a: torch.Tensor, b: torch.Tensor | None) -> None:
        rank = max(self.a.shape[1], a.shape[0] if b is not None else 0)
        slots = max(self.a.shape[0], slot + 1)
        if (slots, rank) != (self.a.shape[0], self.a.shape[1]):
            a_new = self.a.new_zeros(slots, rank, self.a.shape[2])
            b_new = self.b.new_zeros(slots, self.b.shape[1], rank)
            a_new[: self.a.shape[0], : self.a.shape[1]] = self.a
            b_new[: self.b.shape[0], :, : self.b.shape[2]] = self.b
            self.a, self.b = a_new, b_new
        self.a[slot].zero_()
        self.b[slot].zero_()
        if b is not None:
            self.a[slot, : a.shape[0]] = a.to(self.a)
            self.b[slot, :, : b.shape[1]] = b.to(self.b)

    def _hook(self, module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        sel = self.bank.slots
        if sel is None:
            return None
        x = args[0]
        n = x.shape[0]
        if n % sel.numel():
            raise RuntimeError(f"LoRA bank {self.name}: {n} samples for {sel.numel()} routed slots")
        sel = sel.repeat(n // sel.numel())  # classifier-free guidance stacks [uncond, cond]
        live = sel >= 0
        idx = sel.clamp(min=0)
        x_ntk = x.reshape(n, -1, x.shape[-1]).to(self.a.dtype)
        h = torch.bmm(x_ntk, self.a[idx].transpose(1, 2))
        delta = torch.bmm(h, self.b[idx].transpose(1, 2))
        delta = delta * live.view(n, 1, 1).to(delta.dtype)
        return out + delta.reshape(*out.shape).to(out.dtype)


class LoRABank:
    """Slots of plain-LoRA adapters on one denoiser; :meth:`route` picks one per sample."""

    def __init__(self, denoiser: torch.nn.Module):
        self.denoiser = denoiser
        self.layers: dict[str, _Layer] = {}
        self.slot_of: dict[Any, int] = {}
        self.slots: torch.Tensor | None = None  # per-sample slots of the current pass, None: off

    def supports(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Whether every adapted module is a ``Linear`` of this denoiser."""
        if not pairs:
            return False
        try:
            return all(isinstance(self.denoiser.get_submodule(n), torch.nn.Linear) for n in pairs)
        except AttributeError:
            return False

    def add(self, key: Any, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Load an adapter into a free slot (every layer it does not adapt gets zeros)."""
        if key in self.slot_of:
            return self.slot_of[key]
        used = set(self.slot_of.values())
        slot = next(i for i in range(len(used) + 1) if i not in used)
        for name in pairs:
            if name not in self.layers:
                self.layers[name] = _Layer(self, self.denoiser.get_submodule(name), name)
        for name, layer in self.layers.items():
            a, b = pairs.get(name, (layer.a.new_zeros(0, layer.a.shape[2]), None))
            layer.put(slot, a, b)
        self.slot_of[key] = slot
        return slot

    def remove(self, key: Any) -> None:
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            for layer in self.layers.values():
                layer.put(slot, layer.a.new_zeros(0, layer.a.shape[2]), None)

    @contextlib.contextmanager
    def route(self, keys: Sequence[Any] | None) -> Iterator[None]:
        """Passes inside the block send sample i through adapter ``keys[i]`` (None: the bank is off)."""
        if keys is None:
            yield
            return
        device = next(iter(self.layers.values())).a.device if self.layers else "cpu"
        self.slots = torch.tensor([self.slot_of[k] for k in keys], device=device)
        try:
            yield
        finally:
            self.slots = None

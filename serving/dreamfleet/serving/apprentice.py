"""Zero-shot generation for the server: the apprentice, one loaded model per replica.

Ray-free (the ``ApprenticeModel`` deployment in :mod:`dreamfleet.serving.deployments` wraps it).
Demonstrations arrive as image bytes, already checked by the ingress for count and size;
they are decoded and normalised here like any subject photo.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from dreamfleet.core.apprentice import Apprentice, fill_prompt
from dreamfleet.core.devices import inference_dtype, resolve_device
from dreamfleet.core.images import decode_image


@dataclass
class ApprenticeStats:
    generations: int = 0
    images: int = 0
    encode_ms: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"generations": self.generations, "images": self.images,
                "last_encode_ms": round(self.encode_ms[-1], 2) if self.encode_ms else None}


class ApprenticeEngine:
    def __init__(self, folder: str, *, device: str = "auto"):
        self.device = resolve_device(device)
        self.apprentice = Apprentice.load(folder, device=self.device, dtype=inference_dtype(self.device))
        self.pipe = self.apprentice.pipeline()
        self.lock = threading.Lock()
        self.stats = ApprenticeStats()

    @property
    def identifier(self) -> str:
        return self.apprentice.identifier

    def generate(self, demos: list[bytes], prompt: str, *, class_noun: str | None, num_images: int, steps: int,
                 guidance_scale: float, seed: int, width: int, height: int) -> list[Image.Image]:
        images = [decode_image(b, name=f"demonstrations[{i}]") for i, b in enumerate(demos)]
        text = fill_prompt(prompt, self.identifier, class_noun)
        gen_device = self.device if self.device.type == "cuda" else "cpu"
        with self.lock:
            t0 = time.perf_counter()
            latents = self.apprentice.encode(images)
            self.stats.encode_ms.append((time.perf_counter() - t0) * 1000)
            self.stats.encode_ms = self.stats.encode_ms[-100:]
            gens = [torch.Generator(gen_device).manual_seed(seed + j) for j in range(num_images)]
            out = self.apprentice.generate(latents, [text] * num_images, steps=steps, guidance_scale=guidance_scale,
                                           generators=gens, width=width, height=height, pipe=self.pipe)
            self.stats.generations += 1
            self.stats.images += len(out)
        return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()

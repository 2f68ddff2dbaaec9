"""`dreamfleet apprentice gather`: experts' renders, filtered, as a demonstration set (SuTI step 3-4).

A Ray Data batch job over the experts of a registry. For each expert (one actor call), for
each prompt template, K images are generated with the expert and K with the base model
(same prompt, same seeds); both are scored against the subject's real photos with a
fidelity metric (toy judge embeddings, or DINO), and a render is kept when

    fidelity(expert render) - fidelity(base render) >= threshold      (SuTI's delta filter)

and its prompt score is at least ``min_prompt_score``. The kept renders, with the subject's
real photos as demonstrations, are written as a demonstration set
(:mod:`dreamfleet.data.demos`: WebDataset shards + Parquet index); every generated pair,
kept or not, goes to ``triples.parquet``. One expert that fails is reported and skipped.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamfleet.core.config import cfg, from_dict, to_dict
from dreamfleet.core.errors import ConfigError, DataError
from dreamfleet.core.expert import expert_pipeline, read_expert

log = logging.getLogger("dreamfleet")

# Recontextualisation templates ('{0}': identifier, '{1}': class noun), DreamBench-style.
DEFAULT_TEMPLATES = [
    "a {0} {1}", "a {0} {1} on the grass", "a {0} {1} in the snow", "a {0} {1} on the beach",
    "a {0} {1} at night", "a {0} {1} on a rug",
]
THRESHOLD_GRID = (-1.0, 0.0, 0.02, 0.05, 0.1, 0.15, 0.2)


@dataclass
class GatherConfig:
    """How expert outputs are generated and filtered."""

    templates: list[str] = cfg(list(DEFAULT_TEMPLATES), "prompt templates ('{0}' identifier, '{1}' class noun)")
    images_per_prompt: int = cfg(2, "K: renders per expert and template")
    threshold: float = cfg(0.05, "keep a render when its fidelity exceeds the base render's by at least this")
    min_prompt_score: float = cfg(0.0, "and its prompt score (CLIP-T / toy prompt fidelity) is at least this")
    num_inference_steps: int = cfg(25, "denoising steps")
    guidance_scale: float = cfg(4.0, "classifier-free guidance")
    seed: int = cfg(0, "noise seed of render j is seed + j (the same for expert and base)")
    scorer: str = cfg("toy", "fidelity metric: 'toy' (toy judge) or 'dino' (DINO ViT from --dino-model)")
    dino_model: str | None = cfg(None, "local DINO ViT folder (scorer 'dino')")
    clip_model: str | None = cfg(None, "local CLIP folder for the prompt score (scorer 'dino'; optional)")
    concurrency: int = cfg(1, "Ray Data actors rendering in parallel")
    cpus_per_actor: float = cfg(1.0, "CPUs per actor")
    gpus_per_actor: float = cfg(0.0, "GPUs per actor")
    subjects: list[str] = cfg([], "only these subjects (default: every subject with a published expert)")

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1 or self.num_inference_steps < 1 or self.concurrency < 1:
            raise ConfigError("images_per_prompt, num_inference_steps and concurrency must be at least 1")
        if not self.templates:
            raise ConfigError("give at least one prompt template")
        for t in self.templates:
            if "{0}" not in t:
                raise ConfigError(f"template {t!r} has no '{{0}}' (the identifier)")


@dataclass
class GatherReport:
    out: Path
    experts: int
    generated: int
    kept: int
    failed: dict[str, str] = field(default_factory=dict)
    kept_at: dict[str, int] = field(default_factory=dict)
    wall_time_s: float = 0.0

    def format(self) -> str:
        rate = self.kept / self.generated if self.generated else 0.0
        lines = [f"{self.out}: {self.experts} expert(s), {self.generated} render(s) generated, {self.kept} kept "
                 f"({rate:.0%}) in {self.wall_time_s:.0f} s"]
        lines += [f"  failed {sid}: {err}" for sid, err in self.failed.items()]
        return "\n".join(lines)


def real_images(registry, subject_id: str, version: str):
    """The subject's photos: from its manifest when reachable, else the expert's own copies."""
    from PIL import Image

    from dreamfleet.core.expert import ExpertInfo

    folder = registry.fetch(subject_id, version)
    info = ExpertInfo.read(folder)
    source = info.source or ""
    if "#" in source:
        from dreamfleet.data.manifest import Manifest

        uri, _, sid = source.rpartition("#")
        try:
            return [im for _, im, _ in Manifest.open(uri).read_images(sid)], info, folder
        except DataError:
            pass
    files = sorted((folder / "instance").glob("*.png"))
    if not files:
        raise DataError(f"expert {subject_id}@{version}: no photos (manifest {source or '?'} unreadable, no instance/)")
    return [Image.open(f).convert("RGB") for f in files], info, folder


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class ExpertRenderer:
    """Ray Data actor: renders and scores one expert per call (base pipeline loaded once)."""

    def __init__(self, cfg_dict: dict[str, Any], registry_uri: str):
        import torch

        from dreamfleet.core.devices import resolve_device
        from dreamfleet.eval.fidelity import make_fidelity
        from dreamfleet.registry import Registry

        self.c = from_dict(GatherConfig, cfg_dict)
        torch.set_num_threads(max(1, int(self.c.cpus_per_actor)))  # Ray sets OMP_NUM_THREADS=1
        self.device = str(resolve_device("auto" if self.c.gpus_per_actor > 0 else "cpu"))
        self.registry = Registry(registry_uri, create=False)
        self.scorer = make_fidelity(self.c.scorer, dino_model=self.c.dino_model, clip_model=self.c.clip_model,
                                    device=self.device)
        self.bases: dict[str, tuple[Any, Any]] = {}
        from dreamfleet.trainers.runtime import ray_node

        self.node = ray_node() or ""  # recorded with each render ('' outside Ray)

    def _base(self, spec: str) -> tuple[Any, Any]:
        """(base model, its pipeline on the device), loaded once per base."""
        if spec not in self.bases:
            from dreamfleet.core.models import load_base

            base = load_base(spec)  # fresh: adapters are loaded into it
            self.bases[spec] = (base, base.pipeline(device=self.device))
        return self.bases[spec]

    def _render(self, pipe, prompts: list[str]):
        import torch

        c = self.c
        gens = [torch.Generator("cpu").manual_seed(c.seed + j) for _ in prompts for j in range(c.images_per_prompt)]
        flat = [p for p in prompts for _ in range(c.images_per_prompt)]
        with torch.inference_mode():
            return pipe(flat, num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
                        generator=gens).images

    def render_expert(self, subject_id: str, version: str) -> list[dict[str, Any]]:
        c = self.c
        real, info, folder = real_images(self.registry, subject_id, version)
        base, pipe = self._base(info.base_model["spec"])
        prompts = [" ".join(t.format(info.identifier, info.class_noun).split()) for t in c.templates]
        plain = [" ".join(t.format("", info.class_noun).split()) for t in c.templates]
        base_imgs = self._render(pipe, prompts)
        weights = read_expert(folder, base, info).to(self.device)
        try:
            expert_imgs = self._render(expert_pipeline(base, weights, pipe=pipe), prompts)
        finally:
            if weights.lora is not None:
                pipe.unload_lora_weights()
        s_exp = self.scorer.subject(expert_imgs, real)
        s_base = self.scorer.subject(base_imgs, real)
        flat_plain = [p for p in plain for _ in range(c.images_per_prompt)]
        s_prompt = self.scorer.prompt(expert_imgs, flat_plain)
        rows = []
        for i, img in enumerate(expert_imgs):
            t, j = divmod(i, c.images_per_prompt)
            gain = s_exp[i] - s_base[i]
            ps = s_prompt[i]
            rows.append({
                "subject_id": subject_id, "version": version, "class_noun": info.class_noun,
                "identifier": info.identifier, "template": c.templates[t], "prompt": prompts[t],
                "seed": c.seed + j, "expert_score": float(s_exp[i]), "base_score": float(s_base[i]),
                "gain": float(gain), "prompt_score": float(ps),
                "kept": bool(gain >= c.threshold and not (ps == ps and ps < c.min_prompt_score)),
                "target_png": _png(img), "error": "", "ray_node": self.node,
            })
        return rows

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows: list[dict[str, Any]] = []
        for sid, version in zip(batch["subject_id"], batch["version"], strict=True):
            try:
                rows += self.render_expert(str(sid), str(version))
            except Exception as e:  # one bad expert never stops the others
                log.exception("gather: expert %s@%s failed", sid, version)
                rows.append({"subject_id": str(sid), "version": str(version), "error": f"{type(e).__name__}: {e}",
                             "ray_node": self.node})
        keys = ["subject_id", "version", "class_noun", "identifier", "template", "prompt", "seed", "expert_score",
                "base_score", "gain", "prompt_score", "kept", "target_png", "error", "ray_node"]
        defaults = {"seed": -1, "expert_score": float("nan"), "base_score": float("nan"), "gain": float("nan"),
                    "prompt_score": float("nan"), "kept": False, "target_png": b""}
        return {k: [r.get(k, defaults.get(k, "")) for r in rows] for k in keys}


def _experts(registry, registry_uri: str, c: GatherConfig) -> list[dict[str, str]]:
    """The latest version of each chosen subject (all, unless ``c.subjects``)."""
    items = []
    for sid in c.subjects or registry.subjects():
        version = registry.latest(sid)
        if version is None:
            if c.subjects:
                raise DataError(f"subject {sid!r} has no published expert in {registry_uri}; train it first")
            continue
        items.append({"subject_id": sid, "version": version})
    if not items:
        raise DataError(f"{registry_uri}: no published experts to gather from; run `dreamfleet train` first")
    return items


@dataclass
class _Collected:
    table_rows: list[dict[str, Any]] = field(default_factory=list)
    kept: dict[str, list] = field(default_factory=dict)  # subject -> its kept Targets
    meta: dict[str, dict[str, str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def _collect(rows) -> _Collected:
    """The renderers' rows: every scored render for the triples table, the kept ones as targets."""
    from PIL import Image

    from dreamfleet.data.demos import Target

    got = _Collected()
    for row in rows:
        sid = row["subject_id"]
        if row["error"]:
            got.failed[sid] = row["error"]
            continue
        got.meta[sid] = {"version": row["version"], "class_noun": row["class_noun"]}
        got.table_rows.append({k: v for k, v in row.items() if k not in ("target_png", "error")})
        if row["kept"]:
            got.kept.setdefault(sid, []).append(Target(
                Image.open(io.BytesIO(row["target_png"])).convert("RGB"), row["template"],
                {"prompt": row["prompt"], "seed": int(row["seed"]), "expert_score": row["expert_score"],
                 "base_score": row["base_score"], "gain": row["gain"], "prompt_score": row["prompt_score"],
                 "expert": f"{sid}@{row['version']}"}))
    for sid, err in got.failed.items():
        log.warning("gather: expert %s skipped: %s", sid, err)
    return got


def gather(registry_uri: str, out: str | Path, c: GatherConfig | None = None, *, address: str | None = None,
           overwrite: bool = False) -> GatherReport:
    """Run the gather job on Ray (embedded local Ray unless ``address``); write the demonstration set."""
    import ray

    from dreamfleet.control.cluster import absolute, connect_ray
    from dreamfleet.registry import Registry

    c = c or GatherConfig()
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite")
    registry_uri = absolute(registry_uri)
    registry = Registry(registry_uri, create=False)
    items = _experts(registry, registry_uri, c)
    log.info("gather: %d expert(s) x %d template(s) x %d image(s)", len(items), len(c.templates), c.images_per_prompt)
    connect_ray(address)
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ExpertRenderer, fn_constructor_args=(to_dict(c), registry_uri), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=c.concurrency), num_cpus=c.cpus_per_actor,
        num_gpus=c.gpus_per_actor or None,
    )
    got = _collect(ds.iter_rows())
    return _write_gathered(got, registry, registry_uri, out, c, len(items), t0, overwrite)


def _write_gathered(got: _Collected, registry, registry_uri: str, out: Path, c: GatherConfig, n_experts: int,
                    t0: float, overwrite: bool) -> GatherReport:
    """The demonstration set (kept renders and each subject's photos), its triples table and report."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dreamfleet.core.artifacts import write_json
    from dreamfleet.core.version import code_version
    from dreamfleet.data.demos import GATHER_FILE, TRIPLES_FILE, DemoSubject, write_demo_set

    generated = len(got.table_rows)
    n_kept = sum(len(v) for v in got.kept.values())
    kept_at = {f"{t:+.2f}": sum(r["gain"] >= t for r in got.table_rows) for t in THRESHOLD_GRID}
    if not got.kept:
        raise DataError(f"gather kept none of {generated} renders at threshold {c.threshold}; lower --threshold "
                        f"(kept at other thresholds: {kept_at})")

    def subjects():
        for sid in sorted(got.kept):
            noun = got.meta[sid]["class_noun"]
            photos, _info, _ = real_images(registry, sid, got.meta[sid]["version"])
            yield DemoSubject(sid, noun, photos, got.kept[sid], [f"a {{0}} {noun}"] * len(photos))

    write_demo_set(subjects(), out, overwrite=overwrite,
                   builder={"kind": "apprentice-gather", "registry": registry_uri, "config": to_dict(c)})
    pq.write_table(pa.Table.from_pylist(got.table_rows), out / TRIPLES_FILE)
    report = GatherReport(out, n_experts, generated, n_kept, got.failed, kept_at, time.perf_counter() - t0)
    write_json(out / GATHER_FILE, {
        "registry": registry_uri, "config": to_dict(c), "code_version": code_version(),
        "experts": n_experts, "generated": generated, "kept": n_kept, "kept_at_threshold": kept_at,
        "failed": got.failed, "wall_time_s": round(report.wall_time_s, 2),
        "experts_used": {sid: m["version"] for sid, m in sorted(got.meta.items())},
    })
    return report

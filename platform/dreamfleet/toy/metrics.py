"""Toy metrics: DreamBooth's three measurements, read off generated images by the toy judge.

- **subject fidelity**: the judge's probability that a generated image shows the subject
  (its class, design and both colours), averaged over the images of the subject's prompts.
  The toy analogue of DINO / CLIP-I.
- **subject similarity**: mean pairwise cosine of judge embeddings, generated against real
  images (DINO's pairing, on the judge's features).
- **prompt fidelity**: the judge's probability of the prompt's class and of its context
  (mean of the two; class alone for a prompt without context). The toy analogue of CLIP-T.
- **prompt fidelity, novel contexts**: prompt fidelity over only the prompts whose context
  none of the subject's photos shows (recontextualisation proper).
- **class drift**: subject fidelity of images generated from the plain class prompt
  ("a ball") by the fine-tuned model: how much of the subject leaks into its class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreamfleet.toy.judge import NONE, ToyJudge
from dreamfleet.toy.subjects import SUBJECTS, random_subject_scene
from dreamfleet.toy.world import CLASSES, COLOURS, CONTEXT_PHRASES, CONTEXTS, random_scene, render, scene_rng


@dataclass(frozen=True)
class PromptContent:
    cls: str | None
    context: str | None


def parse_prompt(prompt: str) -> PromptContent:
    """The toy class and context a prompt asks for (None where it names none)."""
    words = prompt.lower().replace(",", " ").split()
    cls = next((w for w in words if w in CLASSES), None)
    context = next((c for c in CONTEXTS if c in words), None)
    return PromptContent(cls, context)


def subject_fidelity(judge: ToyJudge, images, subject_id: str) -> float:
    if subject_id not in judge.subjects or subject_id == NONE:
        raise KeyError(f"the toy judge does not know subject {subject_id!r}; it knows {', '.join(judge.subjects[:-1])}")
    _, probs = judge.predict(images)
    return float(probs["subject"][:, judge.subjects.index(subject_id)].mean())


def subject_similarity(judge: ToyJudge, generated, real) -> float:
    """Mean cosine over every (generated, real) pair of judge embeddings."""
    g, _ = judge.predict(generated)
    r, _ = judge.predict(real)
    g = torch.nn.functional.normalize(g, dim=-1)
    r = torch.nn.functional.normalize(r, dim=-1)
    return float((g @ r.T).mean())


def prompt_fidelity(judge: ToyJudge, images, prompt: str) -> float:
    _, probs = judge.predict(images)
    return _prompt_fidelity(probs, prompt)


def _prompt_fidelity(probs: dict[str, torch.Tensor], prompt: str) -> float:
    """The judge's mean probability of the prompted class and (where named) context."""
    content = parse_prompt(prompt)
    if content.cls is None:
        raise ValueError(f"prompt {prompt!r} names no toy class ({', '.join(CLASSES)})")
    scores = [probs["cls"][:, CLASSES.index(content.cls)]]
    if content.context is not None:
        scores.append(probs["context"][:, CONTEXTS.index(content.context)])
    return float(torch.stack(scores).mean())


def prompt_following(judge: ToyJudge, images_by_prompt: dict[str, list]) -> dict[str, float]:
    """How well samples follow their prompts, per attribute the judge reads: the mean
    probability, and the share of images where it is the judge's top choice, of the prompted
    class, context and colour (over the prompts that name one); ``prompt_fidelity`` is
    :func:`prompt_fidelity` averaged over the prompts. Patterns are not read by the judge."""
    sums: dict[str, list[float]] = {}
    for prompt, images in images_by_prompt.items():
        _, probs = judge.predict(images)
        content, words = parse_prompt(prompt), prompt.lower().split()
        asked = {"cls": CLASSES.index(content.cls) if content.cls else None,
                 "context": CONTEXTS.index(content.context) if content.context else None,
                 "colour": next((list(COLOURS).index(w) for w in words if w in COLOURS), None)}
        for head, index in asked.items():
            if index is not None:
                sums.setdefault(f"p_{head}", []).append(float(probs[head][:, index].mean()))
                sums.setdefault(f"{head}_accuracy", []).append(float((probs[head].argmax(-1) == index).float().mean()))
        sums.setdefault("prompt_fidelity", []).append(_prompt_fidelity(probs, prompt))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def photo_contexts(judge: ToyJudge, real_images) -> set[str]:
    """The contexts the judge reads in a subject's photos (it reads renders' contexts without error)."""
    _, probs = judge.predict(real_images)
    return {CONTEXTS[i] for i in probs["context"].argmax(-1).tolist()}


def novel_context_prompts(judge: ToyJudge, prompts: list[str], real_images) -> list[int]:
    """Indices of the prompts that ask for a context none of the subject's photos shows."""
    seen = photo_contexts(judge, real_images)
    return [i for i, p in enumerate(prompts) if (ctx := parse_prompt(p).context) is not None and ctx not in seen]


def class_drift(judge: ToyJudge, class_images, subject_id: str) -> float:
    """Subject fidelity of images of the plain class prompt: 0 means no drift."""
    return subject_fidelity(judge, class_images, subject_id)


# --------------------------------------------------------------------------- validation on renders


def validate_judge(judge: ToyJudge, n: int = 40, seed: int = 12345) -> dict:
    """The metrics on real renders never seen in training (another seed).

    For each subject: fidelity of its own renders (should be near 1), of the other subjects'
    renders (near 0) and of ordinary objects of its class (near 0); plus class and context
    accuracy and prompt fidelity of ordinary renders.
    """
    own: dict[str, list] = {}
    for k, s in enumerate(SUBJECTS):
        rng = scene_rng(seed, k, stream=21)
        own[s.subject_id] = [render(random_subject_scene(s, rng)) for _ in range(n)]
    rng = scene_rng(seed, 0, stream=22)
    world = [random_scene(rng) for _ in range(8 * n)]
    world_images = [render(s) for s in world]
    per_subject = {}
    for s in SUBJECTS:
        others = [im for sid, ims in own.items() if sid != s.subject_id for im in ims[: n // 4]]
        same_class = [im for sc, im in zip(world, world_images, strict=True) if sc.cls == s.cls]
        per_subject[s.subject_id] = {
            "own": round(subject_fidelity(judge, own[s.subject_id], s.subject_id), 4),
            "other_subjects": round(subject_fidelity(judge, others, s.subject_id), 4),
            "same_class_objects": round(subject_fidelity(judge, same_class, s.subject_id), 4),
        }
    _, probs = judge.predict(world_images)
    cls_acc = float((probs["cls"].argmax(-1) == torch.tensor([CLASSES.index(s.cls) for s in world])).float().mean())
    ctx_acc = float((probs["context"].argmax(-1) == torch.tensor([CONTEXTS.index(s.context) for s in world])).float().mean())
    pf = [prompt_fidelity(judge, [im], f"a {sc.cls} {CONTEXT_PHRASES[sc.context]}")
          for sc, im in zip(world[:80], world_images[:80], strict=True)]
    wrong = [prompt_fidelity(judge, [im], f"a {CLASSES[(CLASSES.index(sc.cls) + 1) % 4]} "
                             f"{CONTEXT_PHRASES[CONTEXTS[(CONTEXTS.index(sc.context) + 1) % 5]]}")
             for sc, im in zip(world[:80], world_images[:80], strict=True)]
    return {
        "subject_fidelity": per_subject,
        "class_accuracy": round(cls_acc, 4),
        "context_accuracy": round(ctx_acc, 4),
        "prompt_fidelity_matching": round(sum(pf) / len(pf), 4),
        "prompt_fidelity_mismatched": round(sum(wrong) / len(wrong), 4),
    }

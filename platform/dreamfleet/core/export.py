"""An expert as one file for the tools that load one file.

``kohya``: a LoRA expert in the kohya-ss / A1111 key layout (``lora_unet_..._to_q.lora_down.weight``,
``.lora_up.weight``, ``.alpha``; text encoders as ``lora_te1``/``lora_te2``), which ComfyUI,
the WebUIs, SD.Next and InvokeAI load, and which diffusers' ``load_lora_weights`` converts
back. It is what diffusers' SDXL DreamBooth script writes with ``--output_kohya_format``, with
the expert's own ``lora_alpha`` (diffusers' converter writes alpha = rank).

``ldm``: a full SD 1.x expert (method=full) as one checkpoint in the original single-file
layout (:mod:`dreamfleet.core.ldm`): the expert's UNet, its text encoder when it trained one
(else the base's), and the base's VAE, which A1111, ComfyUI and diffusers' ``from_single_file``
load. It needs the expert's base model (named, or its folder) on this machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from dreamfleet.core.errors import DataError
from dreamfleet.core.expert import ExpertInfo

FORMATS = ("kohya", "ldm")
KOHYA_FAMILIES = ("sd", "sdxl")  # UNet families with a kohya LoRA layout diffusers reads back
LORA_FILE = "pytorch_lora_weights.safetensors"


def export_expert(folder: str | Path, out: str | Path, fmt: str = "kohya") -> Path:
    """Write expert ``folder`` as the single file ``out`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise DataError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    folder, out = Path(folder), Path(out)
    info = ExpertInfo.read(folder)
    if fmt == "ldm":
        return export_ldm(folder, out, info)
    _check_kohya(folder, info)
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    kohya = convert_state_dict_to_kohya(_to_peft_keys(load_file(str(folder / LORA_FILE))))
    alpha = float(info.config.get("lora_alpha") or info.config.get("lora_rank") or 0)
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(alpha)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(out), metadata={
        "ss_network_module": "networks.lora", "ss_network_dim": str(info.config.get("lora_rank")),
        "ss_network_alpha": str(alpha), "ss_base_model_version": info.base_model.get("family", "sd"),
        "dreamfleet_expert": json.dumps({"subject_id": info.subject_id, "identifier": info.identifier,
                                         "instance_prompt": info.instance_prompt, "base_model": info.base_model}),
    })
    return out


def _to_peft_keys(state: dict) -> dict:
    """The expert file's diffusers keys (``unet.<module>.lora.down.weight``, text encoders'
    ``<module>.lora_linear_layer.down.weight``) in PEFT's naming (``lora_A``/``lora_B``), the
    input of diffusers' kohya converter. (diffusers' own ``convert_all_state_dict_to_peft``
    converts the text encoders' keys of such a file and leaves the UNet's as they are.)"""
    renames = ((".lora_linear_layer.down.", ".lora_A."), (".lora_linear_layer.up.", ".lora_B."),
               (".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."))
    out = {}
    for key, value in state.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def _check_kohya(folder: Path, info: ExpertInfo) -> None:
    if info.method != "lora":
        raise DataError(f"{folder}: a method={info.method} expert; --format kohya exports LoRA experts (a full "
                        "expert is a diffusers folder: load its unet/ with from_pretrained)")
    family = info.base_model.get("family", "sd")
    if family not in KOHYA_FAMILIES:
        raise DataError(f"{folder}: a {family} expert; the kohya layout here covers SD 1.x/2.x and SDXL LoRAs (load "
                        f"{LORA_FILE} from the expert folder with the {family} pipeline's load_lora_weights)")
    if info.config.get("use_dora"):
        raise DataError(f"{folder}: a DoRA expert; the kohya export does not carry DoRA's magnitude vectors yet (load "
                        f"{LORA_FILE} with diffusers' load_lora_weights)")
    if not (folder / LORA_FILE).is_file():
        raise DataError(f"{folder}: no {LORA_FILE}; nothing to export")


def export_ldm(folder: Path, out: Path, info: ExpertInfo) -> Path:
    """A full SD 1.x expert as one original-layout checkpoint at ``out``."""
    from safetensors.torch import save_file

    from dreamfleet.core.expert import read_expert
    from dreamfleet.core.ldm import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
    from dreamfleet.core.models import load_base

    if info.method != "full":
        raise DataError(f"{folder}: a method={info.method} expert; --format ldm writes full experts (method=full) as "
                        "one checkpoint; a LoRA expert exports with --format kohya")
    family = info.base_model.get("family", "sd")
    base = load_base(info.base_model.get("spec") or "")
    if family != "sd" or base.text_encoder.config.hidden_size == 1024:  # SD 2.x: an OpenCLIP ViT-H layout
        raise DataError(f"{folder}: a {family} expert on {info.base_model.get('spec')}; --format ldm covers SD 1.x "
                        "(a CLIP text encoder); load the expert folder's unet/ with from_pretrained instead")
    parts = read_expert(folder, base, info).components
    unet, text_encoder = parts["unet"], parts.get("text_encoder", base.text_encoder)
    state = {**unet_to_ldm(unet.state_dict(), dict(unet.config)),
             **vae_to_ldm(base.vae.state_dict(), len(base.vae.config.block_out_channels)),
             **text_encoder_to_ldm(text_encoder.state_dict())}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={
        "format": "pt", "dreamfleet_expert": json.dumps({"subject_id": info.subject_id, "identifier": info.identifier,
                                                         "instance_prompt": info.instance_prompt,
                                                         "base_model": info.base_model})})
    return out

"""LoRA adapters (peft) that adapt a trained ProGiDiff model to another modality (MR) from a few volumes.

An adapter lives in its own small folder, as peft's do: `adapter_config.json` (which modules, rank,
alpha, dropout) + `adapter_model.safetensors` (only the low-rank weights), never a copy of the model.
Several adapters can sit on one loaded model; `activate(model, name)` picks one, `activate(model,
None)` gives back the bare model exactly.

Default targets are the control branch's convolutions and attention projections: the scan encoder
(where CT and MR intensities differ most), its ResNet convolutions and cross-/self-attention.  The base
UNet's attention can be added (`base_attention=True`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from .intensity import PercentileNormalisation
from .io_utils import atomic_directory
from .model import ProGiDiffModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BRANCH_LAYERS = re.compile(r"\.(conv1|conv2|to_q|to_k|to_v|to_out\.0)$")
ATTENTION_LAYERS = re.compile(r"\.(to_q|to_k|to_v|to_out\.0)$")
PARTS = ("controlnet", "unet")


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    base_attention: bool = False  # also adapt the base UNet's attention projections


def plain_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """`named_modules()` as the model was built: a layer that peft has wrapped (an adapter was added, even if
    removed since) by its own name, and not the adapters' low-rank layers."""
    layers = []
    for name, layer in module.named_modules():
        if ".lora_" in name:
            continue
        layers.append((name.removesuffix(".base_layer"), layer))
    return layers


def branch_targets(controlnet: nn.Module) -> list[str]:
    """Every convolution of the scan encoder, the branch's ResNet convolutions and attention projections."""
    names = []
    for name, module in plain_layers(controlnet):
        if name.startswith("controlnet_cond_embedding.") and isinstance(module, nn.Conv2d):
            names.append(name)
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and BRANCH_LAYERS.search(name):
            names.append(name)
    return names


def base_attention_targets(unet: nn.Module) -> list[str]:
    return [n for n, m in plain_layers(unet) if isinstance(m, nn.Linear) and ATTENTION_LAYERS.search(n)]


def _lora_config(settings: LoraSettings, targets: list[str]) -> LoraConfig:
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, init_lora_weights=True)


def add_adapter(model: ProGiDiffModel, name: str, settings: LoraSettings) -> int:
    """Add a fresh (zero-effect) adapter `name`, freeze everything else, make it the active one.

    Returns the number of trainable parameters."""
    model.requires_grad_(False)
    model.controlnet.add_adapter(_lora_config(settings, branch_targets(model.controlnet)), adapter_name=name)
    if settings.base_attention:
        model.unet.add_adapter(_lora_config(settings, base_attention_targets(model.unet)), adapter_name=name)
    activate(model, name)
    for param_name, param in model.named_parameters():
        param.requires_grad_(f"lora_A.{name}." in param_name or f"lora_B.{name}." in param_name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _adapted_parts(model: ProGiDiffModel, name: str) -> dict[str, nn.Module]:
    return {part: getattr(model, part) for part in PARTS
            if name in (getattr(getattr(model, part), "peft_config", None) or {})}


def save_adapter(model: ProGiDiffModel, name: str, directory: str | Path, settings: LoraSettings,
                 extra: dict | None = None) -> None:
    """Write adapter `name` alone (config + low-rank weights), atomically."""
    parts = _adapted_parts(model, name)
    if not parts:
        raise KeyError(f"the model has no adapter {name!r}")
    state: dict[str, torch.Tensor] = {}
    for part, module in parts.items():
        for key, value in get_peft_model_state_dict(module, adapter_name=name).items():
            state[f"{part}.{key}"] = value.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "settings": asdict(settings),
        "target_modules": {part: sorted(module.peft_config[name].target_modules) for part, module in parts.items()},
        **(extra or {}),
    }
    with atomic_directory(directory) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(state, tmp / ADAPTER_WEIGHTS)


def adapter_record(modality: str, base_model: str | Path, normalisation: PercentileNormalisation | None) -> dict:
    """What an adapter's config says besides its layers: the modality it serves, the model it adapts, and the
    intensity normalisation its studies get first (`progidiff.intensity`)."""
    return {"modality": modality.upper(), "base_model": str(base_model),
            "intensity": normalisation.to_dict() if normalisation is not None else None}


def load_adapter(model: ProGiDiffModel, directory: str | Path, name: str) -> dict:
    """Add the adapter saved in `directory` under `name` (the active adapter does not change).

    Returns its config (`adapter_config.json`). An adapter trained on another model (other layers or layer
    shapes, e.g. a 2.5D model's scan encoder) raises ValueError and leaves the model as it was."""
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter {name!r}; remove it first")
    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    settings = LoraSettings(**config["settings"])
    weights = load_file(directory / ADAPTER_WEIGHTS)
    active = active_adapter(model)
    try:
        for part, targets in config["target_modules"].items():
            module = getattr(model, part)
            module.add_adapter(_lora_config(settings, list(targets)), adapter_name=name)
            prefix = f"{part}."
            state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(module, state, adapter_name=name)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"unexpected keys {result.unexpected_keys[:3]}")
    except (RuntimeError, ValueError) as error:  # torch's "size mismatch for ...", peft's missing target layers
        activate(model, active)
        remove_adapter(model, name)
        raise ValueError(f"{directory} does not fit this model (it was trained on "
                         f"{config.get('base_model', 'another model')}; retrain it on this one): "
                         f"{str(error).strip().splitlines()[-1].strip()}") from None
    activate(model, active)
    model.requires_grad_(False)
    return config


def activate(model: ProGiDiffModel, name: str | None) -> None:
    """Make adapter `name` the one in use, or (None) run the bare model, exactly as it was trained."""
    if name is not None and name not in adapter_names(model):
        raise KeyError(f"the model has no adapter {name!r}; it has: {', '.join(adapter_names(model)) or 'none'}")
    model.active_lora = name
    for part in PARTS:
        module = getattr(model, part)
        if not getattr(module, "peft_config", None):
            continue
        if name is not None and name in module.peft_config:
            module.enable_adapters()
            module.set_adapter(name)
        else:
            module.disable_adapters()


def remove_adapter(model: ProGiDiffModel, name: str) -> None:
    """Drop adapter `name` from every part that has it (it must not be the active one)."""
    if active_adapter(model) == name:
        raise ValueError(f"adapter {name!r} is in use; activate another before removing it")
    for part in PARTS:
        module = getattr(model, part)
        if name in (getattr(module, "peft_config", None) or {}):
            module.delete_adapters(name)


def active_adapter(model: ProGiDiffModel) -> str | None:
    return getattr(model, "active_lora", None)


def adapter_names(model: ProGiDiffModel) -> list[str]:
    return sorted(getattr(model.controlnet, "peft_config", None) or {})

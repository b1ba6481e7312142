"""Pure torch modules: the backbone builder, the UNETR nuclei head and the attention-MIL slide head.

Importing this package is cheap: the names below load their module (and torch, timm) on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names resolve lazily below
    from ._timm_compat import import_timm
    from .backbone import (PRESETS, Backbone, BackbonePreset, build_backbone, get_preset,
                           load_state_dict_file, resolve_weights, weights_sha256)
    from .checkpoint import load_mil, load_nuclei_head, read_metadata, save_mil, save_nuclei_head
    from .curriculum import CurriculumSampler, instance_density
    from .losses import LossWeights, NucleiLoss
    from .mil import GatedAttentionMIL, MILOutput, fit_mil, predict_mil
    from .profiles import BUILTIN_PROFILES, CONSEP, PANNUKE, PUMA_NUCLEI, PUMA_TISSUE, ClassProfile, get_profile
    from .unetr import FULL_DECODER, SMALL_DECODER, NucleiOutput, UNETRHead

#: public name -> submodule that defines it
_LAZY: dict[str, str] = {
    "Backbone": ".backbone",
    "BackbonePreset": ".backbone",
    "PRESETS": ".backbone",
    "build_backbone": ".backbone",
    "get_preset": ".backbone",
    "load_state_dict_file": ".backbone",
    "resolve_weights": ".backbone",
    "weights_sha256": ".backbone",
    "import_timm": "._timm_compat",
    "UNETRHead": ".unetr",
    "NucleiOutput": ".unetr",
    "SMALL_DECODER": ".unetr",
    "FULL_DECODER": ".unetr",
    "NucleiLoss": ".losses",
    "LossWeights": ".losses",
    "GatedAttentionMIL": ".mil",
    "MILOutput": ".mil",
    "fit_mil": ".mil",
    "predict_mil": ".mil",
    "ClassProfile": ".profiles",
    "get_profile": ".profiles",
    "BUILTIN_PROFILES": ".profiles",
    "PANNUKE": ".profiles",
    "PUMA_NUCLEI": ".profiles",
    "PUMA_TISSUE": ".profiles",
    "CONSEP": ".profiles",
    "CurriculumSampler": ".curriculum",
    "instance_density": ".curriculum",
    "save_nuclei_head": ".checkpoint",
    "load_nuclei_head": ".checkpoint",
    "save_mil": ".checkpoint",
    "load_mil": ".checkpoint",
    "read_metadata": ".checkpoint",
}

__all__: tuple[str, ...] = tuple(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""Save and load head checkpoints (nuclei UNETR, attention-MIL) as safetensors with metadata inside.

A checkpoint is one ``.safetensors`` file: the head's ``state_dict`` plus string metadata — the format
tag, the head's constructor kwargs (JSON), the class profile(s) (JSON), the backbone preset id and
weights hash it was trained on, the nuclei MPP (nuclei heads) and the package version. Loading rebuilds
the head from its kwargs and checks everything before any weight is copied, raising
:class:`~cellvit_optimus.engine.errors.WeightsError` that names the file and what was expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellvit_optimus.engine.errors import ConfigError, WeightsError

from .mil import GatedAttentionMIL
from .profiles import ClassProfile
from .unetr import UNETRHead

__all__ = (
    "NUCLEI_FORMAT",
    "MIL_FORMAT",
    "LoadedNucleiHead",
    "LoadedMIL",
    "save_nuclei_head",
    "load_nuclei_head",
    "save_mil",
    "load_mil",
    "read_metadata",
    "state_hash",
    "EMBEDDED_BACKBONE_PREFIX",
)

NUCLEI_FORMAT = "cellvit-optimus/nuclei-head"
MIL_FORMAT = "cellvit-optimus/mil-head"
FORMAT_VERSION = "1"


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("cellvit-optimus")
    except Exception:  # not installed (e.g. running from a source tree)
        return "unknown"


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared / non-contiguous storage: give each tensor its own contiguous copy
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def _write(path: str | PathLike[str], module: nn.Module, meta: dict[str, str],
           extra_tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    from safetensors.torch import save_file

    p = Path(path)
    tensors = _state_tensors(module)
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.detach().to("cpu").contiguous().clone()
    save_file(tensors, str(p), metadata=meta)
    return p


#: key prefix of the backbone tensors a nuclei checkpoint may carry (a backbone trained with its head)
EMBEDDED_BACKBONE_PREFIX = "backbone."


def state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` over a state dict's names, dtypes, shapes and bytes (order-independent).

    The identity of an embedded backbone: the same weights give the same hash whichever file holds
    them, so embedding caches and safety states bound to it stay valid.
    """
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def read_metadata(path: str | PathLike[str]) -> dict[str, str]:
    """The metadata of a safetensors checkpoint (raises WeightsError naming the file if unreadable)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: checkpoint not found")
    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise WeightsError(f"{p}: not a readable safetensors file ({exc})") from exc


def _read_tensors(p: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from .backbone import check_finite  # imported here: backbone is the heavier module

    try:
        tensors = load_file(str(p), device=str(device))
    except Exception as exc:
        raise WeightsError(f"{p}: cannot read tensors ({exc})") from exc
    # NaN/Inf weights compute NaN everywhere yet still yield plausible-looking outputs: refuse them here,
    # once for every checkpoint kind (nuclei heads, MIL) read through this function
    check_finite(tensors, p)
    return tensors


def _require(p: Path, meta: Mapping[str, str], key: str) -> str:
    if key not in meta:
        raise WeightsError(f"{p}: metadata key {key!r} missing (found {sorted(meta)})")
    return meta[key]


def _json(p: Path, meta: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(_require(p, meta, key))
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{p}: metadata {key!r} is not valid JSON ({exc})") from exc


def _check_format(p: Path, meta: Mapping[str, str], fmt: str) -> None:
    found = meta.get("format")
    if found != fmt:
        raise WeightsError(f"{p}: format is {found!r}, expected {fmt!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{p}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION!r}")


def _check_backbone(
    p: Path, meta: Mapping[str, str], backbone_id: str | None, backbone_hash: str | None
) -> None:
    found_id = _require(p, meta, "backbone_id")
    if backbone_id is not None and found_id != backbone_id:
        raise WeightsError(f"{p}: head was trained on backbone {found_id!r}, expected {backbone_id!r}")
    found_hash = _require(p, meta, "backbone_hash")
    if backbone_hash is not None and found_hash != backbone_hash:
        raise WeightsError(
            f"{p}: head was trained on backbone weights with hash {found_hash!r}, expected {backbone_hash!r}"
        )


def _load_into(p: Path, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{p}: state does not match the head built from its kwargs: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    bad = [
        f"{k}: file {tuple(tensors[k].shape)} vs expected {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise WeightsError(f"{p}: shape mismatch: {'; '.join(bad[:8])}")
    module.load_state_dict(tensors, strict=True)


def _common_meta(
    fmt: str, hparams: Mapping[str, Any], backbone_id: str, backbone_hash: str
) -> dict[str, str]:
    if not backbone_id:
        raise ConfigError("backbone_id must be a non-empty preset id")
    if not backbone_hash:
        raise ConfigError("backbone_hash must be a non-empty weights hash")
    return {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "head_kwargs": json.dumps(dict(hparams), sort_keys=True),
        "backbone_id": backbone_id,
        "backbone_hash": backbone_hash,
        "package_version": _package_version(),
    }


def _extra(extra: Mapping[str, Any] | None) -> dict[str, str]:
    return {"extra": json.dumps(dict(extra), sort_keys=True)} if extra else {}


def _save(
    path: str | PathLike[str], module: nn.Module, fmt: str, *, backbone_id: str, backbone_hash: str,
    fields: Mapping[str, str], extra: Mapping[str, Any] | None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``module`` as a ``fmt`` checkpoint: the common metadata, the kind's ``fields`` and ``extra``."""
    meta = _common_meta(fmt, module.hparams, backbone_id, backbone_hash)
    meta.update(fields)
    meta.update(_extra(extra))
    return _write(path, module, meta, extra_tensors)


def _open(
    path: str | PathLike[str], fmt: str, backbone_id: str | None, backbone_hash: str | None,
    dim_key: str, dim: int | None, what: str,
) -> tuple[Path, dict[str, str], dict[str, Any]]:
    """Path, metadata and head kwargs of a ``fmt`` checkpoint checked against the backbone it will run on:
    its id, its weights hash and the width ``dim`` it gives (the head's ``dim_key`` kwarg)."""
    p = Path(path)
    meta = read_metadata(p)
    _check_format(p, meta, fmt)
    _check_backbone(p, meta, backbone_id, backbone_hash)
    kwargs = _json(p, meta, "head_kwargs")
    if dim is not None and kwargs.get(dim_key) != dim:
        raise WeightsError(f"{p}: {what} expects {dim_key}={kwargs.get(dim_key)}, the backbone gives {dim}")
    return p, meta, kwargs


@contextmanager
def _invalid_metadata(p: Path) -> Iterator[None]:
    """Turn a head or profile that cannot be rebuilt from the file's metadata into a WeightsError
    naming ``p``."""
    try:
        yield
    except (ConfigError, TypeError) as exc:
        raise WeightsError(f"{p}: invalid head metadata ({exc})") from exc


# -- nuclei head --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedNucleiHead:
    """A rebuilt nuclei head (eval mode) and what its checkpoint says about it."""

    head: UNETRHead
    profile: ClassProfile
    tissue_profile: ClassProfile | None
    backbone_id: str
    backbone_hash: str
    nuclei_mpp: float
    metadata: dict[str, str]
    #: the backbone's own weights when it was trained with the head and shipped inside the checkpoint
    backbone_state: dict[str, torch.Tensor] | None = None


def _profiles_mismatch(profile: ClassProfile, tissue_profile: ClassProfile | None, head: Any) -> str | None:
    """why the class profiles do not fit the head (None when they do): checked on save (a caller's
    mistake, ConfigError) and on load (a bad file, WeightsError naming it)"""
    if profile.num_classes != head.num_nuclei_types:
        return (f"class profile {profile.name!r} has {profile.num_classes} classes but the head has "
                f"num_nuclei_types={head.num_nuclei_types}")
    if (tissue_profile.num_classes if tissue_profile else 0) != head.tissue_classes:
        return (f"tissue profile {tissue_profile.name if tissue_profile else None!r} does not match the head's "
                f"tissue_classes={head.tissue_classes}")
    return None


def save_nuclei_head(
    path: str | PathLike[str],
    head: UNETRHead,
    *,
    profile: ClassProfile,
    backbone_id: str,
    backbone_hash: str,
    nuclei_mpp: float,
    tissue_profile: ClassProfile | None = None,
    extra: Mapping[str, Any] | None = None,
    backbone_state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``head`` with its class profile(s) and provenance to ``path`` (``.safetensors``).

    ``nuclei_mpp`` is the microns-per-pixel the head was trained at (tiles are resampled to it).
    ``extra`` is any JSON-serialisable training record (data sets, epochs, metrics).
    ``backbone_state``: the backbone's weights when they were trained with the head; they are stored
    under :data:`EMBEDDED_BACKBONE_PREFIX` and ``backbone_hash`` must then be their :func:`state_hash`.
    """
    problem = _profiles_mismatch(profile, tissue_profile, head)
    if problem:
        raise ConfigError(problem)
    if not (nuclei_mpp > 0 and math.isfinite(nuclei_mpp)):
        raise ConfigError(f"nuclei_mpp={nuclei_mpp} must be a positive number")
    fields = {"class_profile": profile.to_json()}
    if tissue_profile is not None:
        fields["tissue_profile"] = tissue_profile.to_json()
    fields["nuclei_mpp"] = repr(float(nuclei_mpp))
    prefixed = None
    if backbone_state is not None:
        if state_hash(backbone_state) != backbone_hash:
            raise ConfigError("backbone_hash must be state_hash(backbone_state) for an embedded backbone")
        fields["embedded_backbone"] = "1"
        prefixed = {EMBEDDED_BACKBONE_PREFIX + k: v for k, v in backbone_state.items()}
    return _save(path, head, NUCLEI_FORMAT, backbone_id=backbone_id, backbone_hash=backbone_hash,
                 fields=fields, extra=extra, extra_tensors=prefixed)


def load_nuclei_head(
    path: str | PathLike[str],
    *,
    backbone_id: str | None = None,
    backbone_hash: str | None = None,
    embed_dim: int | None = None,
    device: str | torch.device = "cpu",
) -> LoadedNucleiHead:
    """Rebuild a nuclei head from ``path``, checking it against the backbone it will run on.

    Parameters
    ----------
    backbone_id, backbone_hash, embed_dim : optional
        What the running backbone is; a checkpoint trained on anything else raises WeightsError.

    Raises
    ------
    WeightsError
        Missing/unreadable file, wrong format, other backbone, inconsistent profile, missing or
        unexpected keys, shape mismatch. The message names the file and the expected value.
    """
    p, meta, kwargs = _open(path, NUCLEI_FORMAT, backbone_id, backbone_hash, "embed_dim", embed_dim, "head")
    with _invalid_metadata(p):
        profile = ClassProfile.from_dict(_json(p, meta, "class_profile"))
        tissue_profile = (
            ClassProfile.from_dict(_json(p, meta, "tissue_profile")) if "tissue_profile" in meta else None
        )
        head = UNETRHead(**kwargs)
    problem = _profiles_mismatch(profile, tissue_profile, head)
    if problem:
        raise WeightsError(f"{p}: {problem}")
    try:
        mpp = float(_require(p, meta, "nuclei_mpp"))
    except ValueError as exc:
        raise WeightsError(f"{p}: nuclei_mpp {meta['nuclei_mpp']!r} is not a number") from exc
    tensors = _read_tensors(p, "cpu")
    n = len(EMBEDDED_BACKBONE_PREFIX)
    bb_state = {k[n:]: v for k, v in tensors.items() if k.startswith(EMBEDDED_BACKBONE_PREFIX)} or None
    if (bb_state is not None) != (meta.get("embedded_backbone") == "1"):
        raise WeightsError(f"{p}: embedded backbone tensors and the 'embedded_backbone' metadata disagree")
    if bb_state is not None:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(EMBEDDED_BACKBONE_PREFIX)}
        if state_hash(bb_state) != meta["backbone_hash"]:
            raise WeightsError(f"{p}: embedded backbone weights do not match their recorded hash "
                               f"{meta['backbone_hash']!r} (file altered or corrupt)")
    _load_into(p, head, tensors)
    head.to(device).eval()
    return LoadedNucleiHead(
        head, profile, tissue_profile, meta["backbone_id"], meta["backbone_hash"], mpp, meta, bb_state
    )


# -- MIL head -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedMIL:
    """A rebuilt MIL head (eval mode) and its checkpoint's provenance."""

    model: GatedAttentionMIL
    output_names: tuple[str, ...] | None
    backbone_id: str
    backbone_hash: str
    metadata: dict[str, str]


def save_mil(
    path: str | PathLike[str],
    model: GatedAttentionMIL,
    *,
    backbone_id: str,
    backbone_hash: str,
    output_names: tuple[str, ...] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write an attention-MIL head; ``output_names`` labels its logits (e.g. class names)."""
    if output_names is not None and len(output_names) != model.n_outputs:
        raise ConfigError(f"{len(output_names)} output_names for a model with n_outputs={model.n_outputs}")
    fields = {} if output_names is None else {"output_names": json.dumps(list(output_names))}
    return _save(path, model, MIL_FORMAT, backbone_id=backbone_id, backbone_hash=backbone_hash,
                 fields=fields, extra=extra)


def load_mil(
    path: str | PathLike[str],
    *,
    backbone_id: str | None = None,
    backbone_hash: str | None = None,
    in_dim: int | None = None,
    device: str | torch.device = "cpu",
) -> LoadedMIL:
    """Rebuild an attention-MIL head from ``path`` (raises WeightsError like :func:`load_nuclei_head`)."""
    p, meta, kwargs = _open(path, MIL_FORMAT, backbone_id, backbone_hash, "in_dim", in_dim, "MIL head")
    with _invalid_metadata(p):
        model = GatedAttentionMIL(**kwargs)
    names = tuple(_json(p, meta, "output_names")) if "output_names" in meta else None
    _load_into(p, model, _read_tensors(p, "cpu"))
    model.to(device).eval()
    return LoadedMIL(model, names, meta["backbone_id"], meta["backbone_hash"], meta)

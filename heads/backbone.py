"""The foundation-model backbone: presets, weight loading and the module the runner drives.

H-optimus-0 is a DINOv2-style ViT-g/14 with four register tokens, built here through timm
(``vit_giant_patch14_reg4_dinov2``). Smaller presets of the same family (same block type: SwiGLU MLP,
LayerScale, four registers, patch 14, 224-pixel tiles at 0.5 µm/px) stand in for it in tests and CPU
runs. :func:`build_backbone` returns a :class:`Backbone`, a plain ``nn.Module`` that takes normalised
``(B, 3, 224, 224)`` tiles and returns the tile embedding plus the intermediate token maps the UNETR
nuclei head consumes. Device placement, precision, normalisation and CUDA graphs belong to
``cellvit_optimus.engine.pipeline.runner``.

Weights come from a local file (safetensors, or a torch checkpoint read with ``weights_only=True``) or
from the local Hugging Face cache (``"hf-hub:bioptimus/H-optimus-0"``); the network is never used. No
weights means a seeded random initialisation (tests, benchmarks).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import types
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from cellvit_optimus.engine.errors import ConfigError, WeightsError
from torch import nn

from ._timm_compat import import_timm

__all__ = (
    "HF_HUB_PREFIX",
    "PRESETS",
    "Backbone",
    "BackbonePreset",
    "build_backbone",
    "backbone_from_state",
    "check_finite",
    "evenly_spaced_blocks",
    "get_preset",
    "load_state_dict_file",
    "resolve_weights",
    "weights_sha256",
)

logger = logging.getLogger(__name__)

#: a weights spec of this form names a Hugging Face repository, read from the local cache only;
#: the bare prefix means the preset's own ``hf_hub_id``
HF_HUB_PREFIX = "hf-hub:"
#: files looked for in a cached Hugging Face repository, in order of preference
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

#: H-optimus-0's normalisation (from its model card), shared by the family presets
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

WeightsSpec = str | os.PathLike[str] | None


def evenly_spaced_blocks(depth: int, n: int = 4) -> tuple[int, ...]:
    """``n`` evenly spaced 1-based block indices ending at the last block (40 blocks -> 10, 20, 30, 40)."""
    if depth < 1 or n < 1:
        raise ConfigError(f"depth={depth}, n={n}: both must be >= 1")
    return tuple(sorted({max(1, depth * k // n) for k in range(1, n + 1)}))


@dataclass(frozen=True)
class BackbonePreset:
    """Architecture and input facts of one backbone; the timm call is derived from them.

    Block indices (``default_blocks``) are 1-based: block 40 is the last block of the 40-block model.
    """

    name: str
    #: the timm architecture function the model is built with (its recipe: SwiGLU MLP, registers, ...)
    timm_name: str
    embed_dim: int
    depth: int
    num_heads: int
    #: MLP width over embed_dim as timm takes it (for a packed SwiGLU the fc1 output, i.e. both halves)
    mlp_ratio: float
    patch_size: int = 14
    num_reg_tokens: int = 4
    #: packed SwiGLU MLP (fc1 -> 2 halves, fc2 from one half), as H-optimus-0 / DINOv2-g
    swiglu: bool = True
    init_values: float = 1e-5
    tile_size: int = 224
    mpp: float = 0.5
    mean: tuple[float, float, float] = HOPTIMUS_MEAN
    std: tuple[float, float, float] = HOPTIMUS_STD
    #: intermediate blocks (1-based) whose token maps the runner returns; empty -> four evenly spaced
    default_blocks: tuple[int, ...] = ()
    hf_hub_id: str | None = None
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"preset {self.name!r}: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if self.tile_size % self.patch_size:
            raise ConfigError(
                f"preset {self.name!r}: tile_size={self.tile_size} is not a multiple of patch_size={self.patch_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(
                f"preset {self.name!r}: mean={self.mean}, std={self.std}: need 3 values, std > 0"
            )
        if not self.default_blocks:
            object.__setattr__(self, "default_blocks", evenly_spaced_blocks(self.depth))
        self.validate_blocks(self.default_blocks)

    # -- derived facts -------------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """Patch tokens per side (16 for 224 / 14)."""
        return self.tile_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus registers."""
        return 1 + self.num_reg_tokens

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2 + self.num_prefix_tokens

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)  # timm's own rounding

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model(self.timm_name, **kwargs)``."""
        return {
            "img_size": self.tile_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "reg_tokens": self.num_reg_tokens,
            "init_values": self.init_values,
            "num_classes": 0,
            "dynamic_img_size": False,
        }

    def validate_blocks(self, blocks: Sequence[int]) -> tuple[int, ...]:
        """Check 1-based block indices (strictly increasing, within 1..depth) and return them as a tuple."""
        blocks = tuple(blocks)
        ok = (
            len(blocks) > 0
            and all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)
            and all(1 <= b <= self.depth for b in blocks)
            and all(a < b for a, b in pairwise(blocks))
        )
        if not ok:
            raise ConfigError(
                f"blocks={blocks!r}: need strictly increasing 1-based block indices in 1..{self.depth} "
                f"for preset {self.name!r} (e.g. {self.default_blocks})"
            )
        return blocks

    def flops_per_tile(self) -> int:
        """Matmul FLOPs (2 per multiply-add) of one forward pass over one tile, counted analytically.

        Counts the patch embedding, qkv/proj, both attention products and the MLP; norms, softmax and
        elementwise work are left out (well under 1 % for these sizes), as hardware peak figures are for
        matmuls.
        """
        d, n = self.embed_dim, self.num_tokens
        patches = self.grid_size**2
        flops = 2 * patches * (3 * self.patch_size**2) * d  # patch embedding conv
        hidden = self.mlp_hidden
        fc2_in = hidden // 2 if self.swiglu else hidden
        per_block = (
            2 * n * d * 3 * d  # qkv
            + 2 * 2 * n * n * d  # q @ k^T and attn @ v
            + 2 * n * d * d  # proj
            + 2 * n * d * hidden  # fc1 (both SwiGLU halves when packed)
            + 2 * n * fc2_in * d  # fc2
        )
        return flops + self.depth * per_block


PRESETS: Mapping[str, BackbonePreset] = types.MappingProxyType(
    {
        p.name: p
        for p in (
            BackbonePreset(
                name="hoptimus0",
                timm_name="vit_giant_patch14_reg4_dinov2",
                embed_dim=1536,
                depth=40,
                num_heads=24,
                mlp_ratio=2.66667 * 2,
                hf_hub_id="bioptimus/H-optimus-0",
                description="H-optimus-0: ViT-g/14, 4 registers, 1.1B parameters (Bioptimus)",
            ),
            BackbonePreset(
                name="small",
                timm_name="vit_giant_patch14_reg4_dinov2",
                embed_dim=384,
                depth=12,
                num_heads=6,
                mlp_ratio=2.66667 * 2,
                description="H-optimus-0 recipe at ViT-S/14 size (random init; CPU runs)",
            ),
            BackbonePreset(
                name="tiny",
                timm_name="vit_giant_patch14_reg4_dinov2",
                embed_dim=192,
                depth=4,
                num_heads=3,
                mlp_ratio=2.66667 * 2,
                description="H-optimus-0 recipe at 192 dims x 4 blocks (random init; tests)",
            ),
        )
    }
)


def get_preset(preset: str | BackbonePreset) -> BackbonePreset:
    """Look a preset up by name (a :class:`BackbonePreset` passes through)."""
    if isinstance(preset, BackbonePreset):
        return preset
    try:
        return PRESETS[preset]
    except (KeyError, TypeError):
        raise ConfigError(
            f"preset={preset!r}: unknown backbone preset (known: {', '.join(PRESETS)})"
        ) from None


# -- weights ------------------------------------------------------------------------------------------

_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a weights file, cached per resolved path, mtime and size.

    The embedding cache keys on this, so a replaced file invalidates cached embeddings.
    """
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as exc:
        raise WeightsError(f"{p}: cannot read weights file to hash it ({exc.strerror})") from exc
    key = (str(p), st.st_mtime_ns, st.st_size)
    with _hash_lock:
        cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _hash_lock:
        _hash_cache[key] = digest
    return digest


def _hf_cache_dir(hf_cache_dir: str | os.PathLike[str] | None) -> str:
    if hf_cache_dir is not None:
        return str(hf_cache_dir)
    # read the environment now rather than huggingface_hub's import-time constant, so a cache location
    # set after import (tests, notebooks) is honoured
    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return env
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_weights(
    weights: str | os.PathLike[str],
    preset: str | BackbonePreset,
    *,
    hf_cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Turn a weights spec into an existing local file, never touching the network.

    ``weights`` is a path, ``"hf-hub:<org>/<repo>"`` (looked up in the local Hugging Face cache) or
    ``"hf-hub"`` for the preset's own repository.
    """
    p = get_preset(preset)
    spec = os.fspath(weights)
    if spec == HF_HUB_PREFIX.rstrip(":") or spec == HF_HUB_PREFIX:
        if p.hf_hub_id is None:
            raise ConfigError(f"weights={spec!r}: preset {p.name!r} has no Hugging Face repository")
        spec = HF_HUB_PREFIX + p.hf_hub_id
    if not spec.startswith(HF_HUB_PREFIX):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found (preset {p.name!r})")
        return path

    repo_id = spec[len(HF_HUB_PREFIX) :]
    cache_dir = _hf_cache_dir(hf_cache_dir)
    from huggingface_hub import try_to_load_from_cache

    for filename in HF_WEIGHT_FILES:
        try:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        except Exception as exc:  # malformed repo id and the like
            raise WeightsError(
                f"{spec}: cannot look {filename} up in the Hugging Face cache ({exc})"
            ) from exc
        if isinstance(found, str):
            return Path(found)
    raise WeightsError(
        f"{spec}: not in the local Hugging Face cache {cache_dir} (looked for {', '.join(HF_WEIGHT_FILES)}; "
        f"preset {p.name!r}). Downloads are never attempted; fetch it once with "
        f"`huggingface-cli download {repo_id}` (gated repositories need the licence accepted first)"
    )


def load_state_dict_file(
    path: str | os.PathLike[str], preset: str | BackbonePreset | None = None
) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch checkpoint (``weights_only=True``) onto the CPU.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and a ``module.`` prefix on every key.
    """
    path = Path(path)
    where = f" (preset {get_preset(preset).name!r})" if preset is not None else ""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise WeightsError(f"{path}: weights file not found{where}") from exc
    except Exception as exc:  # truncated/corrupt file, pickle refused by weights_only, ...
        raise WeightsError(f"{path}: unreadable weights file{where}: {type(exc).__name__}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not sd:
        raise WeightsError(f"{path}: expected a state dict of tensors{where}, got {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: non-tensor entries in state dict{where}: {_brief(bad)}")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    check_finite(sd, path, where)
    return dict(sd)


def check_finite(
    tensors: Mapping[str, torch.Tensor] | nn.Module, path: str | os.PathLike[str] | None, where: str = ""
) -> None:
    """Refuse weights holding NaN or infinity (raises :class:`WeightsError` naming the file, the first
    tensors and how many values): a model loaded from them computes NaN everywhere and, unchecked,
    would still write a plausible-looking result. ``tensors`` is a state dict or a module (its
    parameters and buffers)."""
    if isinstance(tensors, nn.Module):
        tensors = dict(tensors.state_dict())
    bad: list[str] = []
    for k, v in tensors.items():
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
            n = int((~torch.isfinite(v)).sum())
            if n:
                bad.append(f"{k} ({n} of {v.numel()} values)")
    if bad:
        raise WeightsError(f"{path or 'in-memory weights'}: NaN or infinite values in {len(bad)} "
                           f"tensor(s){where}: {_brief(bad)}")


def _brief(items: Sequence[str], n: int = 3) -> str:
    head = ", ".join(items[:n])
    return head + (f", ... +{len(items) - n} more" if len(items) > n else "")


def _check_state_dict(
    model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, preset: BackbonePreset
) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_brief(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_brief(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({_brief(shapes)})")
    if problems:
        raise WeightsError(
            f"{path}: weights do not fit preset {preset.name!r} ({preset.timm_name}, embed_dim "
            f"{preset.embed_dim}, depth {preset.depth}): " + "; ".join(problems)
        )


# -- the module -----------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """A frozen timm ViT returning the tile embedding and intermediate token maps.

    ``forward`` takes normalised tiles ``(B, 3, S, S)`` (S = ``preset.tile_size``) and returns
    ``(embedding, tokens)``: the embedding ``(B, D)`` is the CLS token after the final norm (what timm's
    ``forward_features`` + ``forward_head`` give with ``num_classes=0``); ``tokens`` holds one
    ``(B, D, g, g)`` map per configured block (g = S / patch; raw block outputs, registers and CLS
    dropped), or is empty when ``tokens=False``.
    """

    def __init__(
        self,
        model: nn.Module,
        preset: BackbonePreset,
        *,
        blocks: Sequence[int] | None = None,
        weights_path: Path | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.preset = preset
        self.blocks: tuple[int, ...] = preset.validate_blocks(
            preset.default_blocks if blocks is None else blocks
        )
        self.weights_path = weights_path
        self._seed = seed
        self._unseeded = uuid.uuid4().hex  # a random init without seed matches nothing else
        #: identity of weights that came from no file and no seed (a backbone trained with its head)
        self.weights_id_override: str | None = None
        self._take = [b - 1 for b in self.blocks]  # timm counts blocks from 0

    @property
    def embed_dim(self) -> int:
        return self.preset.embed_dim

    @property
    def weights_id(self) -> str:
        """Identity of the weights for cache keys: ``sha256:<hex>`` of the file, or the random-init seed."""
        if self.weights_id_override is not None:
            return self.weights_id_override
        if self.weights_path is not None:
            return "sha256:" + weights_sha256(self.weights_path)
        if self._seed is None:
            return f"random:{self.preset.name}:unseeded-{self._unseeded}"
        return f"random:{self.preset.name}:seed={self._seed}"

    def forward(
        self, x: torch.Tensor, tokens: bool = True, blocks: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``blocks`` overrides the configured blocks for this call (1-based, validated by the caller)."""
        if not tokens:
            return self.model.forward_head(self.model.forward_features(x)), ()
        take = self._take if blocks is None else [b - 1 for b in blocks]
        final, inter = self.model.forward_intermediates(x, indices=take, norm=False, output_fmt="NCHW")
        return self.model.forward_head(final), tuple(inter)


def build_backbone(
    preset: str | BackbonePreset,
    weights: WeightsSpec = None,
    *,
    blocks: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = 0,
    hf_cache_dir: str | os.PathLike[str] | None = None,
) -> Backbone:
    """Build a preset's backbone, frozen and in eval mode.

    ``weights=None`` initialises randomly (seeded, on the CPU so every device gets the same numbers);
    ``device="meta"`` builds the architecture without allocating. With weights, the model is built on the
    meta device and the checkpoint's tensors are adopted as they are (dtype included), so a 1.1B model
    is never held twice. Raises :class:`WeightsError` for missing, unreadable or mismatched weights.
    """
    p = get_preset(preset)
    timm = import_timm()
    device = torch.device(device)
    weights_path: Path | None = None
    if weights is None:
        init_device = torch.device("meta") if device.type == "meta" else torch.device("cpu")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            with init_device:
                model = timm.create_model(p.timm_name, pretrained=False, **p.timm_kwargs)
    else:
        weights_path = resolve_weights(weights, p, hf_cache_dir=hf_cache_dir)
        sd = load_state_dict_file(weights_path, p)
        model = _create_on_meta(timm, p)
        _check_state_dict(model, sd, weights_path, p)
        model.load_state_dict(sd, strict=True, assign=True)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:  # not in the state dict yet not reported missing: non-persistent buffers
            raise WeightsError(
                f"{weights_path}: weights leave {_brief(left)} uninitialised (preset {p.name!r})"
            )
        seed = None
        logger.info("loaded %s weights from %s", p.name, weights_path)
    model.eval().requires_grad_(False)
    if device.type != "meta":
        model.to(device)
    return Backbone(model, p, blocks=blocks, weights_path=weights_path, seed=seed).eval()


def _create_on_meta(timm: Any, p: BackbonePreset) -> torch.nn.Module:
    """the preset's architecture on the meta device, for weights to be assigned into

    timm's random init is skipped (``weight_init="skip"``): every tensor is replaced by the weights, and
    on the meta device ``trunc_normal_`` runs through torch's reference ops, whose wrapper imports
    ``torch._dynamo`` (about 1 s of start-up on a quiet 2-core machine, several under load)."""
    with torch.device("meta"):
        try:
            return timm.create_model(p.timm_name, pretrained=False, weight_init="skip", **p.timm_kwargs)
        except (AssertionError, TypeError, ValueError):  # a timm without the "skip" choice
            return timm.create_model(p.timm_name, pretrained=False, **p.timm_kwargs)


def backbone_from_state(
    preset: str | BackbonePreset,
    state: Mapping[str, torch.Tensor],
    weights_id: str,
    *,
    blocks: Sequence[int] | None = None,
    source: str = "state dict",
) -> Backbone:
    """A frozen :class:`Backbone` with weights from an in-memory state dict (e.g. the backbone a nuclei
    checkpoint carries, trained with its head); ``weights_id`` becomes its cache identity."""
    p = get_preset(preset)
    model = _create_on_meta(import_timm(), p)
    _check_state_dict(model, state, Path(source), p)
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise WeightsError(f"{source}: weights leave {_brief(left)} uninitialised (preset {p.name!r})")
    model.eval().requires_grad_(False)
    bb = Backbone(model, p, blocks=blocks, seed=None)
    bb.weights_id_override = weights_id
    return bb.eval()

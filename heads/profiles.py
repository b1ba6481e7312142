"""Class profiles: the nucleus / tissue class names and display colours of a head, as data.

A head's NT (and tissue) branch has ``len(profile.classes) + 1`` output channels: channel 0 is always
background and is *not* listed in ``classes``; channel ``k`` (k >= 1) is ``classes[k - 1]``. The same
numbering is used for type maps (0 background, 1..K classes), so a CoNSeP ``type_map`` or a PUMA tissue
mask indexes the profile directly. Profiles travel inside head checkpoints as JSON (see
:mod:`cellvit_optimus.heads.checkpoint`) and drive the colours of QuPath / GeoJSON exports.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from cellvit_optimus.engine.errors import ConfigError

__all__ = (
    "ClassProfile",
    "BUILTIN_PROFILES",
    "get_profile",
    "PANNUKE",
    "PUMA_NUCLEI",
    "CONSEP",
    "PUMA_TISSUE",
)

RGB = tuple[int, int, int]
BACKGROUND = "background"


@dataclass(frozen=True)
class ClassProfile:
    """Names and colours of the foreground classes of one head branch.

    Parameters
    ----------
    name : str
        Profile id (``"pannuke"``, ``"consep"``, ...).
    classes : tuple of str
        Foreground class names, in channel order 1..K (background is implicit channel 0).
    colors : tuple of (r, g, b)
        One distinct 0-255 RGB colour per class (QuPath ``PathClass`` colours).
    kind : {"nuclei", "tissue"}
        What the classes label.
    """

    name: str
    classes: tuple[str, ...]
    colors: tuple[RGB, ...]
    kind: Literal["nuclei", "tissue"] = "nuclei"

    def __post_init__(self) -> None:
        # accept lists (e.g. from JSON) but store tuples so the profile stays hashable
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        try:
            colors = tuple(tuple(int(v) for v in c) for c in self.colors)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"profile {self.name!r}: colors must be (r, g, b) integer triples") from exc
        object.__setattr__(self, "colors", colors)
        if not self.name:
            raise ConfigError("profile name must be a non-empty string")
        if self.kind not in ("nuclei", "tissue"):
            raise ConfigError(f"profile {self.name!r}: kind={self.kind!r}, expected 'nuclei' or 'tissue'")
        if not self.classes:
            raise ConfigError(f"profile {self.name!r}: classes is empty")
        if any(not c for c in self.classes):
            raise ConfigError(f"profile {self.name!r}: class names must be non-empty")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"profile {self.name!r}: duplicate class names in {self.classes}")
        if BACKGROUND in self.classes:
            raise ConfigError(
                f"profile {self.name!r}: {BACKGROUND!r} is implicit (channel 0) and must not be listed"
            )
        if len(colors) != len(self.classes):
            raise ConfigError(f"profile {self.name!r}: {len(colors)} colors for {len(self.classes)} classes")
        for c in colors:
            if len(c) != 3 or any(v < 0 or v > 255 for v in c):
                raise ConfigError(f"profile {self.name!r}: color {c} is not an RGB triple in 0..255")
        if len(set(colors)) != len(colors):
            raise ConfigError(f"profile {self.name!r}: colors must be distinct, got {colors}")

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K."""
        return len(self.classes)

    @property
    def num_channels(self) -> int:
        """Output channels of the matching head branch (K + 1, background first)."""
        return len(self.classes) + 1

    def label(self, index: int) -> str:
        """Class name of channel/type id ``index`` (0 is ``"background"``)."""
        if not 0 <= index <= len(self.classes):
            raise IndexError(
                f"profile {self.name!r}: class index {index} out of range 0..{len(self.classes)}"
            )
        return BACKGROUND if index == 0 else self.classes[index - 1]

    def index(self, class_name: str) -> int:
        """Channel/type id of ``class_name`` (1..K; ``"background"`` is 0)."""
        if class_name == BACKGROUND:
            return 0
        try:
            return self.classes.index(class_name) + 1
        except ValueError:
            raise KeyError(
                f"profile {self.name!r} has no class {class_name!r}; classes: {self.classes}"
            ) from None

    def color(self, index: int) -> RGB:
        """RGB colour of type id ``index`` (background is black)."""
        if index == 0:
            return (0, 0, 0)
        self.label(index)  # range check
        return self.colors[index - 1]

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "classes": list(self.classes),
            "colors": [list(c) for c in self.colors],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassProfile:
        missing = {"name", "classes", "colors"} - set(data)
        if missing:
            raise ConfigError(f"class profile is missing {sorted(missing)} (got keys {sorted(data)})")
        return cls(
            name=str(data["name"]),
            classes=tuple(data["classes"]),
            colors=tuple(tuple(c) for c in data["colors"]),  # type: ignore[misc]
            kind=data.get("kind", "nuclei"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClassProfile:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"class profile is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"class profile JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)

    def save(self, path: str | PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | PathLike[str]) -> ClassProfile:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read class profile ({exc})") from exc
        try:
            return cls.from_json(text)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from exc


# CellViT's PanNuke colours
PANNUKE = ClassProfile(
    name="pannuke",
    classes=("neoplastic", "inflammatory", "connective", "dead", "epithelial"),
    colors=((255, 0, 0), (34, 221, 77), (35, 92, 236), (254, 255, 0), (255, 159, 68)),
)

# PUMA track-2 nucleus classes, in the challenge's order (files name them nuclei_tumor, nuclei_lymphocyte,
# nuclei_plasma_cell, nuclei_histiocyte, nuclei_melanophage, nuclei_neutrophil, nuclei_stroma,
# nuclei_epithelium, nuclei_endothelium, nuclei_apoptosis)
PUMA_NUCLEI = ClassProfile(
    name="puma_nuclei",
    classes=(
        "tumour",
        "lymphocyte",
        "plasma cell",
        "histiocyte",
        "melanophage",
        "neutrophil",
        "stromal",
        "epithelium",
        "endothelium",
        "apoptotic",
    ),
    colors=(
        (200, 0, 0),
        (0, 200, 0),
        (0, 170, 255),
        (255, 140, 0),
        (120, 70, 20),
        (255, 0, 255),
        (150, 150, 255),
        (255, 220, 0),
        (0, 130, 130),
        (128, 0, 128),
    ),
)

# HoVer-Net's merged CoNSeP scheme: type ids 1..4 as in type_mat/inst_type; HoVer-Net's overlay colours
CONSEP = ClassProfile(
    name="consep",
    classes=("other", "inflammatory", "epithelial", "spindle-shaped"),
    colors=((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)),
)

# PUMA tissue masks code 1 stroma, 2 blood vessel, 3 tumour, 4 epidermis, 5 necrosis; the profile follows
# the file codes so a mask value is its channel index without a lookup table
PUMA_TISSUE = ClassProfile(
    name="puma_tissue",
    classes=("stroma", "blood vessel", "tumour", "epidermis", "necrosis"),
    colors=((0, 180, 255), (230, 0, 0), (200, 0, 200), (255, 200, 0), (40, 40, 40)),
    kind="tissue",
)

BUILTIN_PROFILES: Mapping[str, ClassProfile] = MappingProxyType(
    {p.name: p for p in (PANNUKE, PUMA_NUCLEI, CONSEP, PUMA_TISSUE)}
)


def get_profile(name: str) -> ClassProfile:
    """A built-in profile by id (``pannuke``, ``puma_nuclei``, ``consep``, ``puma_tissue``)."""
    try:
        return BUILTIN_PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown class profile {name!r}; built-in: {sorted(BUILTIN_PROFILES)}") from None

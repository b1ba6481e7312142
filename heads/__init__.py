"""Pure torch modules: the backbone builder, the UNETR nuclei head and the attention-MIL slide head."""

from __future__ import annotations

__all__: tuple[str, ...] = ()

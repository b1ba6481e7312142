"""Training the heads: dataset readers, training tiles and their token cache, augmentation, the
frozen-backbone and end-to-end loops, and the ``train`` / ``segment`` CLI commands.

The names below are the wing's public API: other wings import them from here
(``from cellvit_optimus.engine.training import train``), never from its modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellvit_optimus.engine.lazy import exports

if TYPE_CHECKING:
    from cellvit_optimus.engine.training.cli import segment, train
    from cellvit_optimus.engine.training.datasets import (CONSEP_CLASSES, NucleiSample, load_consep,
                                                          load_monuseg, read_dataset, split_by_group)
    from cellvit_optimus.engine.training.tiles import TokenCache, make_tiles
    from cellvit_optimus.engine.training.train import NucleiTrainConfig, train_mil, train_nuclei
    from cellvit_optimus.engine.training.train_e2e import E2ETrainConfig, train_nuclei_e2e

_EXPORTS = {
    "segment": ".cli", "train": ".cli",
    "CONSEP_CLASSES": ".datasets", "NucleiSample": ".datasets", "load_consep": ".datasets",
    "load_monuseg": ".datasets", "read_dataset": ".datasets", "split_by_group": ".datasets",
    "TokenCache": ".tiles", "make_tiles": ".tiles",
    "NucleiTrainConfig": ".train", "train_mil": ".train", "train_nuclei": ".train",
    "E2ETrainConfig": ".train_e2e", "train_nuclei_e2e": ".train_e2e",
}

__all__ = ("segment", "train", "CONSEP_CLASSES", "NucleiSample", "load_consep", "load_monuseg",
           "read_dataset", "split_by_group", "TokenCache", "make_tiles", "NucleiTrainConfig", "train_mil",
           "train_nuclei", "E2ETrainConfig", "train_nuclei_e2e")

__getattr__, __dir__ = exports(__name__, _EXPORTS)

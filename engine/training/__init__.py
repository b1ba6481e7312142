"""Training the heads: dataset readers, training tiles and their token cache, augmentation, the
frozen-backbone and end-to-end loops, and the ``train`` / ``segment`` CLI commands.

The names below are the wing's public API: other wings import them from here
(``from cellvit_optimus.engine.training import train_nuclei``), never from its modules. The CLI's
``train`` and ``segment`` groups are ``train_command`` and ``segment_command`` here: ``train`` is also the
name of a submodule, which replaces a package attribute of that name once imported."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellvit_optimus.engine.lazy import exports

if TYPE_CHECKING:
    from cellvit_optimus.engine.training.cli import segment_command, train_command
    from cellvit_optimus.engine.training.datasets import (CONSEP_CLASSES, NucleiSample, load_consep,
                                                          load_monuseg, read_dataset, split_by_group)
    from cellvit_optimus.engine.training.scoring import evaluate, score_predictions
    from cellvit_optimus.engine.training.tiles import TokenCache, make_tiles
    from cellvit_optimus.engine.training.train import NucleiTrainConfig, train_mil, train_nuclei
    from cellvit_optimus.engine.training.train_e2e import E2ETrainConfig, train_nuclei_e2e

_EXPORTS = {
    "segment_command": ".cli", "train_command": ".cli",
    "CONSEP_CLASSES": ".datasets", "NucleiSample": ".datasets", "load_consep": ".datasets",
    "load_monuseg": ".datasets", "read_dataset": ".datasets", "split_by_group": ".datasets",
    "evaluate": ".scoring", "score_predictions": ".scoring",
    "TokenCache": ".tiles", "make_tiles": ".tiles",
    "NucleiTrainConfig": ".train", "train_mil": ".train", "train_nuclei": ".train",
    "E2ETrainConfig": ".train_e2e", "train_nuclei_e2e": ".train_e2e",
}

__all__ = ("segment_command", "train_command", "CONSEP_CLASSES", "NucleiSample", "load_consep", "load_monuseg",
           "read_dataset", "split_by_group", "evaluate", "score_predictions", "TokenCache", "make_tiles",
           "NucleiTrainConfig", "train_mil",
           "train_nuclei", "E2ETrainConfig", "train_nuclei_e2e")

__getattr__, __dir__ = exports(__name__, _EXPORTS)

"""Every default is written once, in ``engine.settings``: the config dataclasses and the CLI's flags
both read it there. Equal values are not enough (a CLI that hard-codes the same number agrees today and
drifts tomorrow), so the second test changes the settings in a fresh interpreter and checks that the
configs and the CLI both follow."""

from __future__ import annotations

import json
import subprocess
import sys

from cellvit_optimus.engine import settings
from cellvit_optimus.engine.cli import cli
from cellvit_optimus.engine.pipeline.scheduler import SchedulerConfig
from cellvit_optimus.engine.triage.config import TriageConfig
from cellvit_optimus.engine.wsi.tissue import TilingConfig

#: (command, flag's parameter name) -> the settings name its default must be
CLI_DEFAULTS = {("triage", "overlap_px"): "TRIAGE_OVERLAP_PX", ("triage", "min_tissue"): "MIN_TISSUE_FRACTION",
                ("triage", "workers"): "READER_THREADS", ("triage", "device"): "DEFAULT_DEVICE",
                ("extract", "min_tissue"): "MIN_TISSUE_FRACTION", ("extract", "workers"): "READER_THREADS",
                ("extract", "device"): "DEFAULT_DEVICE"}

#: what the probe prints: the configs' defaults and the CLI's, in a fresh interpreter after ``PATCH``
PROBE = """
import json, sys
from cellvit_optimus.engine import settings
for k, v in json.loads(sys.argv[1]).items():
    setattr(settings, k, v)
from cellvit_optimus.engine.cli import cli
from cellvit_optimus.engine.pipeline.scheduler import SchedulerConfig
from cellvit_optimus.engine.triage.config import TriageConfig
from cellvit_optimus.engine.wsi.tissue import TilingConfig
t = TriageConfig()
out = {"config": {"triage_read_chunk": t.scheduler.batch_tiles, "overlap_px": t.overlap_px,
                  "min_tissue": t.min_tissue_fraction, "reader_threads": SchedulerConfig().reader_threads,
                  "extract_read_chunk": SchedulerConfig().batch_tiles,
                  "tiling_min_tissue": TilingConfig().min_tissue_fraction},
       "cli": {f"{c} {p.name}": p.default for c in ("triage", "extract") for p in cli.commands[c].params}}
print(json.dumps(out, default=repr))
"""

PATCH = {"TRIAGE_READ_CHUNK": 7, "EXTRACT_READ_CHUNK": 11, "READER_THREADS": 5, "MIN_TISSUE_FRACTION": 0.37,
         "TRIAGE_OVERLAP_PX": 48, "DEFAULT_DEVICE": "cpu"}


def _cli_default(command: str, name: str) -> object:
    return next(p.default for p in cli.commands[command].params if p.name == name)


def test_the_configs_and_the_cli_show_the_settings_values():
    t = TriageConfig()
    assert t.scheduler.batch_tiles == settings.TRIAGE_READ_CHUNK == 16
    assert SchedulerConfig().batch_tiles == settings.EXTRACT_READ_CHUNK == 32
    assert SchedulerConfig().reader_threads == t.scheduler.reader_threads == settings.READER_THREADS
    assert t.overlap_px == settings.TRIAGE_OVERLAP_PX
    assert t.min_tissue_fraction == TilingConfig().min_tissue_fraction == settings.MIN_TISSUE_FRACTION
    for (command, name), setting in CLI_DEFAULTS.items():
        assert _cli_default(command, name) == getattr(settings, setting), (command, name)
    assert settings.forward_batch("cpu") == 4 and settings.forward_batch("cuda:1") == 16
    assert settings.resolve_device("cpu") == "cpu"


def test_changing_a_setting_changes_the_configs_and_the_cli():
    """fails if a config or a CLI flag writes its own default instead of reading the settings"""
    got = json.loads(subprocess.run([sys.executable, "-c", PROBE, json.dumps(PATCH)], capture_output=True,
                                    text=True, check=True, timeout=300).stdout)
    assert got["config"] == {"triage_read_chunk": 7, "overlap_px": 48, "min_tissue": 0.37, "reader_threads": 5,
                             "extract_read_chunk": 11, "tiling_min_tissue": 0.37}
    for (command, name), setting in CLI_DEFAULTS.items():
        assert got["cli"][f"{command} {name}"] == PATCH[setting], (command, name)

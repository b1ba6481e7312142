"""Train the bundled default nuclei model (or its 0.5 MPP twin for the resolution study).

Equivalent CLI: ``cellvit-optimus train nuclei --dataset consep --dataset monuseg --held-out <groups...>
--mpp M --epochs N --lr 2e-3 --out OUT``. The bundled model: ``python bench/train_default_nuclei.py
--mpp 0.5 --epochs 8 --out ...`` (its 0.25 MPP twin for the resolution study: ``--mpp 0.25 --epochs 2``,
the same number of training crops).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from cellvit_optimus.engine.datasets import load_consep, load_monuseg
from cellvit_optimus.engine.train import NucleiTrainConfig, split_by_group, train_nuclei

#: whole source images held out (never tiled into the training set)
HELD_OUT = (
    "consep/test_2",
    "monuseg/TCGA-A7-A13E-01Z-00-DX1",
    "monuseg/TCGA-B0-5710-01Z-00-DX1",
    "monuseg/TCGA-G9-6362-01Z-00-DX1",
)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train, test = split_by_group(load_consep() + load_monuseg(), HELD_OUT)
    cfg = NucleiTrainConfig(nuclei_mpp=a.mpp, epochs=a.epochs, lr=a.lr, threads=a.threads,
                            max_minutes=a.max_minutes)
    t = time.time()
    r = train_nuclei(train, a.out, cfg, val_samples=[], progress=lambda rec: print(json.dumps(rec), flush=True),
                     extra_record={"command": "python bench/train_default_nuclei.py " + " ".join(
                         f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None)})
    print(json.dumps({"wall_s": round(time.time() - t, 1), "tiles": r.n_train_tiles, "ckpt": str(r.checkpoint)}))

"""Train the bundled default nuclei model: tiny ViT + UNETR head, end to end, on CPU (resumable).

Equivalent CLI::

    cellvit-optimus train nuclei --end-to-end --dataset consep --dataset monuseg \\
        --held-out <HELD_OUT groups> --val <VAL groups> --negatives-from-bundled-slide \\
        --mpp 0.5 --steps 1400 --work-dir WORK --out OUT [--resume]

``python bench/train_default_nuclei.py --work-dir WORK --out OUT [--resume]``: the state is saved every
50 steps in WORK; a killed run continues with ``--resume`` and ends with the same weights. Splits are by
source image: HELD_OUT is never seen (bench/eval_nuclei.py scores it), VAL is scored during training
and is what bench/tune_postprocess.py tunes the post-processing on.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

#: whole source images held out for the final evaluation (never tiled into training or validation, never
#: used to tune or choose): all five CoNSeP test images in shared/data and three MoNuSeg images
HELD_OUT = (
    "consep/test_1", "consep/test_2", "consep/test_3", "consep/test_4", "consep/test_5",
    "monuseg/TCGA-A7-A13E-01Z-00-DX1",
    "monuseg/TCGA-B0-5710-01Z-00-DX1",
    "monuseg/TCGA-G9-6362-01Z-00-DX1",
)
#: the validation rule, written down before the run that trained on it (issue 27): four CoNSeP
#: *training* images drawn with ``random.Random(0).sample(sorted(train_1..train_27), 4)`` and two
#: MoNuSeg training images, the earlier validation image TCGA-21-5786 and TCGA-CH-5767 (the first of the
#: ``Random(0)`` draw of the previous rule). Everything else of consep-train and monuseg-train trains.
CONSEP_VAL_DRAW = (0, 4)
VAL = ("consep/train_20", "consep/train_7", "consep/train_21", "consep/train_10",
       "monuseg/TCGA-21-5786-01Z-00-DX1", "monuseg/TCGA-CH-5767-01Z-00-DX1")
#: validation sets by name ("v3": the one above). The earlier v1/v2 sets held the CoNSeP *test* images
#: that are all held out now; their runs' logs in bench/checkpoints name them.
VAL_SETS = {"v3": VAL}


def consep_val_draw() -> list[str]:
    """The CoNSeP part of :data:`VAL`, drawn again by its written rule."""
    import random

    seed, k = CONSEP_VAL_DRAW
    return random.Random(seed).sample(sorted(f"consep/train_{i}" for i in range(1, 28)), k)


def all_samples(held_out: bool = True) -> list:
    """Every annotated image: CoNSeP train and test as whole 1000x1000 images, and MoNuSeg; with
    ``held_out=False`` the held-out images are not even read (training, tuning and fitting scripts)."""
    from cellvit_optimus.engine.training.datasets import load_consep, load_monuseg

    if not held_out:
        return load_consep(split="train", whole=True) + load_monuseg(exclude=HELD_OUT)
    return load_consep(split="train", whole=True) + load_consep(split="test", whole=True) + load_monuseg()


def splits(val_set: str = "v3", held_out: bool = True):
    """(train, val, held-out) samples; ``val_set`` names a :data:`VAL_SETS` entry; with ``held_out=False``
    the held-out images are never read and the third list is empty"""
    from cellvit_optimus.engine.training.datasets import split_by_group

    samples = all_samples(held_out)
    rest, test = split_by_group(samples, HELD_OUT) if held_out else (samples, [])
    train, val = split_by_group(rest, VAL_SETS[val_set])
    return train, val, test


if __name__ == "__main__":
    from cellvit_optimus.engine.data import DATA_DIR
    from cellvit_optimus.engine.training.augment import AugmentConfig
    from cellvit_optimus.engine.training.train_e2e import E2ETrainConfig, background_crops, train_nuclei_e2e

    ap = argparse.ArgumentParser()
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-from", default=None, help="warm start from this end-to-end checkpoint")
    ap.add_argument("--nt-balanced", action="store_true", help="class-balanced typed cross-entropy")
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0, help="batch/augmentation seed (use a new one for a warm start)")
    ap.add_argument("--lowres-p", type=float, default=0.0,
                    help="probability of a 2x coarser scan (box down, bilinear up) per crop: 20x slides at "
                         "0.25 um/px")
    ap.add_argument("--hed-sigma", type=float, default=0.05,
                    help="HED stain jitter (Tellez et al.; 0.05 'light')")
    ap.add_argument("--val-set", choices=tuple(VAL_SETS), default="v3",
                    help="validation images (kept out of training)")
    ap.add_argument("--mosaic", choices=("pool", "image"), default="pool",
                    help="fill small patches out with patches of any image of the source, or of the same "
                         "image")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    train, val, _ = splits(a.val_set, held_out=False)
    neg = background_crops([DATA_DIR / "cmu_small_region.svs"], a.mpp)
    cfg = E2ETrainConfig(nuclei_mpp=a.mpp, steps=a.steps, lr=a.lr, threads=a.threads, eval_every=a.eval_every,
                         init_from=a.init_from, nt_balanced=a.nt_balanced, warmup_steps=a.warmup, seed=a.seed,
                         mosaic=a.mosaic,
                         augment=AugmentConfig(lowres_p=a.lowres_p, hed_sigma=a.hed_sigma))
    # the record's command: the run's options, each optional flag only where it differs from its default
    command = (f"python bench/train_default_nuclei.py --mpp {a.mpp} --steps {a.steps} --lr {a.lr} "
               f"--seed {a.seed}")
    for flag in ("--init-from", "--nt-balanced", "--lowres-p", "--hed-sigma", "--mosaic", "--val-set"):
        dest = flag[2:].replace("-", "_")
        value = getattr(a, dest)
        if value != ap.get_default(dest):
            command += f" {flag}" if value is True else f" {flag} {value}"
    t = time.time()
    r = train_nuclei_e2e(train, a.work_dir, a.out, cfg, val_samples=val, negatives=neg, resume=a.resume,
                         progress=lambda rec: print(json.dumps(rec), flush=True),
                         extra_record={"command": command, "held_out": list(HELD_OUT),
                                       "val": list(VAL_SETS[a.val_set])})
    print(json.dumps({"wall_s": round(time.time() - t, 1), "finished": r.finished, "step": r.step,
                      "ckpt": str(r.checkpoint)}), flush=True)

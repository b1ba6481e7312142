"""Gated attention-MIL: unit behaviour, and a known-signal task built from real CoNSeP crops.

The real task: 64x64 crops of the CoNSeP patches (stride 32) carry per-pixel nucleus types. A crop is
a *signal* crop when inflammatory nuclei cover >= 300 px and >= half of its nuclear pixels, a
*negative* crop when it holds no inflammatory pixel (crops in between are left out of the task). Each
crop becomes a deterministic hand-made feature vector (optical-density colour statistics,
haematoxylin percentiles and blob statistics, gradient texture; no backbone). Bags of 20-40 crops are
positive when they contain 3-5 signal crops. Train and held-out bags come from different CoNSeP source
images (``group``), so no image contributes to both sides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from cellvit_optimus.heads.mil import GatedAttentionMIL, fit_mil, pad_bags, predict_mil

CROP, STRIDE = 64, 32
INFLAMMATORY = 2  # merged CoNSeP type id
TRAIN_GROUPS = ("consep/test_2", "consep/test_3", "consep/test_5")
HELD_OUT_GROUPS = ("consep/test_1", "consep/test_4")
NEG_PER_GROUP = 300

# Ruifrok & Johnston H&E stain vectors (rows H, E, residual) in optical density
_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_UNMIX = np.linalg.inv(_STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True))


def _blob_stats(mask: np.ndarray) -> list[float]:
    lab, n = ndi.label(mask)
    if n == 0:
        return [0.0] * 6
    areas = np.bincount(lab.ravel())[1:].astype(np.float64)
    boxes = ndi.find_objects(lab)
    hw = np.array([(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in boxes], dtype=np.float64)
    elong = hw.max(1) / np.maximum(hw.min(1), 1.0)
    small_round = float(((areas >= 12) & (areas <= 150) & (elong < 1.6)).sum())
    return [
        float(n),
        small_round,
        float((areas > 150).sum()),
        float(np.median(areas)),
        float(np.median(elong)),
        float(mask.mean()),
    ]


def crop_features(rgb: np.ndarray) -> np.ndarray:
    """37 deterministic colour/texture features of an RGB uint8 crop."""
    od = -np.log((rgb.astype(np.float64) + 1.0) / 256.0)
    conc = od.reshape(-1, 3) @ _UNMIX
    h = conc[:, 0].reshape(rgb.shape[:2])
    e = conc[:, 1]
    f = list(od.reshape(-1, 3).mean(0)) + list(od.reshape(-1, 3).std(0))
    f += list(np.percentile(h, [10, 50, 75, 90, 97])) + [h.std()]
    f += list(np.percentile(e, [10, 50, 90]))
    for thr in (0.5, 0.7, 0.9):
        f += _blob_stats(ndi.binary_opening(h > thr))
    gy, gx = np.gradient(h)
    g = np.hypot(gx, gy)
    log = ndi.laplace(ndi.gaussian_filter(h, 1.5))
    f += [g.mean(), g.std(), log.mean(), log.std()]
    return np.asarray(f, dtype=np.float32)


@pytest.fixture(scope="module")
def crop_pools(nuclei_dir: Path) -> dict[str, dict[int, np.ndarray]]:
    """Per source image: features of negative (0) and signal (1) crops."""
    from cellvit_optimus.engine.training.datasets import load_consep

    rng = np.random.default_rng(0)
    crops: dict[str, dict[int, list[np.ndarray]]] = {}
    for s in load_consep(nuclei_dir):
        assert s.type_map is not None
        h, w = s.type_map.shape
        for y in range(0, h - CROP + 1, STRIDE):
            for x in range(0, w - CROP + 1, STRIDE):
                t = s.type_map[y : y + CROP, x : x + CROP]
                nuc = int((t > 0).sum())
                inf = int((t == INFLAMMATORY).sum())
                label = 1 if (inf >= 300 and 2 * inf >= nuc) else (0 if inf == 0 else -1)
                if label >= 0:
                    crops.setdefault(s.group, {0: [], 1: []})[label].append(
                        s.image[y : y + CROP, x : x + CROP]
                    )
    pools: dict[str, dict[int, np.ndarray]] = {}
    for g in sorted(crops):
        neg = crops[g][0]
        keep = rng.choice(len(neg), min(NEG_PER_GROUP, len(neg)), replace=False)
        pools[g] = {
            0: np.stack([crop_features(neg[i]) for i in sorted(keep)]),
            1: np.stack([crop_features(c) for c in crops[g][1]])
            if crops[g][1]
            else np.zeros((0, 37), np.float32),
        }
    return pools


@pytest.fixture(autouse=True)
def _one_thread():
    # these models are tiny: intra-op threads on a shared 2-core machine only add overhead
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _make_bags(neg: np.ndarray, sig: np.ndarray, n_bags: int, rng: np.random.Generator):
    bags, labels, is_signal = [], [], []
    for i in range(n_bags):
        positive = i % 2 == 0
        size = int(rng.integers(20, 41))
        k = int(rng.integers(3, 6)) if positive else 0
        x = np.concatenate(
            [neg[rng.choice(len(neg), size - k, replace=False)], sig[rng.choice(len(sig), k, replace=False)]]
        )
        flag = np.r_[np.zeros(size - k, bool), np.ones(k, bool)]
        perm = rng.permutation(size)
        bags.append(x[perm])
        is_signal.append(flag[perm])
        labels.append(float(positive))
    return bags, np.asarray(labels), is_signal


def _pool(pools, groups):
    neg = np.concatenate([pools[g][0] for g in groups])
    sig = np.concatenate([pools[g][1] for g in groups])
    return neg, sig


def test_mil_finds_inflammatory_crops_on_held_out_images(crop_pools) -> None:
    from sklearn.metrics import roc_auc_score

    assert set(TRAIN_GROUPS).isdisjoint(HELD_OUT_GROUPS)
    assert set(TRAIN_GROUPS) | set(HELD_OUT_GROUPS) == set(crop_pools)
    tr_neg, tr_sig = _pool(crop_pools, TRAIN_GROUPS)
    ho_neg, ho_sig = _pool(crop_pools, HELD_OUT_GROUPS)
    assert len(tr_sig) >= 40 and len(ho_sig) >= 10, (len(tr_sig), len(ho_sig))
    rng = np.random.default_rng(101)
    train_bags, train_y, _ = _make_bags(tr_neg, tr_sig, 120, rng)
    test_bags, test_y, test_signal = _make_bags(ho_neg, ho_sig, 60, rng)

    model = fit_mil(
        train_bags, train_y, hidden_dim=128, attn_dim=64, epochs=20, lr=5e-4, batch_size=1, seed=0
    )
    pred = predict_mil(model, test_bags)
    auroc = roc_auc_score(test_y, pred.logits[:, 0])
    top1 = np.mean(
        [test_signal[i][np.argmax(pred.attention[i])] for i in range(len(test_bags)) if test_y[i] == 1]
    )
    print(f"held-out AUROC {auroc:.4f}, top-1 attended crop is a signal crop in {top1:.1%} of positive bags")
    assert auroc >= 0.95
    assert top1 >= 0.90
    for a in pred.attention:
        np.testing.assert_allclose(a.sum(), 1.0, rtol=1e-5)


def test_fit_mil_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(int(rng.integers(3, 9)), 8)).astype(np.float32) for _ in range(12)]
    y = np.arange(12) % 2
    a = fit_mil(bags, y, hidden_dim=16, attn_dim=8, epochs=3, seed=7, batch_size=3)
    b = fit_mil(bags, y, hidden_dim=16, attn_dim=8, epochs=3, seed=7, batch_size=3)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k
    np.testing.assert_array_equal(predict_mil(a, bags).logits, predict_mil(b, bags).logits)


def test_padding_mask_does_not_change_outputs() -> None:
    torch.manual_seed(0)
    m = GatedAttentionMIL(6, hidden_dim=16, attn_dim=8, n_outputs=3).eval()
    bags = [torch.randn(5, 6), torch.randn(2, 6), torch.randn(7, 6)]
    x, mask = pad_bags(bags)
    batched = m(x, mask)
    assert batched.logits.shape == (3, 3) and batched.attention.shape == (3, 7)
    for i, bag in enumerate(bags):
        single = m(bag)
        torch.testing.assert_close(batched.logits[i], single.logits[0])
        torch.testing.assert_close(batched.attention[i, : len(bag)], single.attention[0])
        assert torch.all(batched.attention[i, len(bag) :] == 0)


def test_regression_and_multiclass_train() -> None:
    rng = np.random.default_rng(1)
    bags = [rng.normal(size=(6, 4)).astype(np.float32) for _ in range(8)]
    reg = fit_mil(bags, np.linspace(0, 1, 8), task="regression", hidden_dim=8, attn_dim=4, epochs=2)
    assert predict_mil(reg, bags).logits.shape == (8, 1)
    mc = fit_mil(bags, np.arange(8) % 3, n_outputs=3, hidden_dim=8, attn_dim=4, epochs=2)
    assert predict_mil(mc, bags).logits.shape == (8, 3)


def test_invalid_inputs() -> None:
    from cellvit_optimus.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="task="):
        GatedAttentionMIL(4, task="ranking")  # type: ignore[arg-type]
    m = GatedAttentionMIL(4)
    with pytest.raises(ValueError, match=r"expected \(N, 4\)"):
        m(torch.randn(3, 5))
    with pytest.raises(ValueError, match="at least one unmasked"):
        m(torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cellvit_optimus.heads.losses import (
    LossWeights,
    NucleiLoss,
    dice_loss,
    focal_tversky_loss,
    msge_loss,
    sobel_kernels,
)
from cellvit_optimus.heads.unetr import NucleiOutput


def _perfect_logits(target: torch.Tensor, c: int, scale: float = 50.0) -> torch.Tensor:
    return F.one_hot(target, c).permute(0, 3, 1, 2).float() * scale


def _labels(seed: int = 0, c: int = 4) -> torch.Tensor:
    return torch.randint(0, c, (2, 12, 12), generator=torch.Generator().manual_seed(seed))


def test_dice_perfect_and_known_answer() -> None:
    t = _labels()
    assert dice_loss(_perfect_logits(t, 4), t).item() == pytest.approx(0.0, abs=1e-6)
    # uniform logits on 2 classes: probs 0.5 everywhere; 1 image of 4 pixels, 1 nucleus pixel
    t2 = torch.tensor([[[0, 0], [0, 1]]])
    s = 1e-3
    want = (1 - (2 * 1.5 + s) / (2 + 3 + s)) + (1 - (2 * 0.5 + s) / (2 + 1 + s))
    assert dice_loss(torch.zeros(1, 2, 2, 2), t2).item() == pytest.approx(want, rel=1e-6)


def test_focal_tversky_perfect_and_known_answer() -> None:
    t = _labels(1)
    assert focal_tversky_loss(_perfect_logits(t, 4), t).item() == pytest.approx(0.0, abs=1e-6)
    t2 = torch.tensor([[[0, 0], [0, 1]]])
    # class 0: tp 1.5, fn 1.5, fp 0.5; class 1: tp 0.5, fn 0.5, fp 1.5
    ti0 = 1.5 / (1.5 + 0.7 * 1.5 + 0.3 * 0.5)
    ti1 = 0.5 / (0.5 + 0.7 * 0.5 + 0.3 * 1.5)
    want = ((1 - ti0) ** (4 / 3) + (1 - ti1) ** (4 / 3)) / 2
    assert focal_tversky_loss(torch.zeros(1, 2, 2, 2), t2).item() == pytest.approx(want, rel=1e-5)


def test_sobel_kernels_orientation() -> None:
    kx, ky = sobel_kernels(5)
    assert kx[0, 0, 2, 3] == 1.0 and kx[0, 0, 3, 2] == 0.0  # one pixel right: h=1, v=0
    assert kx[0, 0, 0, 0] == pytest.approx(-2 / 8)
    torch.testing.assert_close(ky, kx.transpose(-1, -2))


def test_msge_zero_for_identical_maps_and_known_ramp() -> None:
    g = torch.Generator().manual_seed(0)
    hv = torch.rand(2, 2, 16, 16, generator=g) * 2 - 1
    focus = torch.rand(2, 16, 16, generator=g) > 0.5
    assert msge_loss(hv, hv.clone(), focus).item() == 0.0
    # add a ramp a*x to the horizontal map: away from the zero-padded border its x-gradient changes by
    # a * sum_{v,h} h^2 / (h^2 + v^2), the vertical map's y-gradient not at all
    a = 0.1
    x = torch.arange(16.0).expand(16, 16)
    pred = hv.clone()
    pred[:, 0] += a * x
    interior = torch.zeros(2, 16, 16, dtype=torch.bool)
    interior[:, 2:-2, 2:-2] = True
    k = sum(h * h / (h * h + v * v) for h in range(-2, 3) for v in range(-2, 3) if (h, v) != (0, 0))
    want = (a * k) ** 2 / 2  # averaged over both channels, only the x channel differs
    assert msge_loss(pred, hv, interior).item() == pytest.approx(want, rel=1e-5)


def test_nuclei_loss_perfect_prediction_and_terms() -> None:
    np_t = _labels(2, c=2)
    nt_t = np_t * _labels(3, c=3).clamp_min(1)  # types only inside nuclei
    tis_t = _labels(4, c=3)
    hv_t = torch.rand(2, 2, 12, 12, generator=torch.Generator().manual_seed(5)) * 2 - 1
    out = NucleiOutput(
        _perfect_logits(np_t, 2), hv_t.clone(), _perfect_logits(nt_t, 3), _perfect_logits(tis_t, 3)
    )
    res = NucleiLoss()(out, np_t, hv_t, nt_t, tis_t)
    assert set(res.terms) == {
        "np_dice",
        "np_ft",
        "hv_mse",
        "hv_msge",
        "nt_ce",
        "nt_dice",
        "nt_ft",
        "tissue_ce",
        "tissue_dice",
    }
    assert res.total.item() == pytest.approx(0.0, abs=1e-4)
    # HoVer-Net weights: CE instead of focal Tversky
    res = NucleiLoss(LossWeights.hovernet())(out, np_t, hv_t, nt_t, tis_t)
    assert "np_ce" in res.terms and "np_ft" not in res.terms


def test_nuclei_loss_weighted_sum_and_gradients() -> None:
    g = torch.Generator().manual_seed(6)
    np_t, nt_t = _labels(7, c=2), _labels(8, c=4)
    hv_t = torch.rand(2, 2, 12, 12, generator=g) * 2 - 1
    out = NucleiOutput(*(torch.randn(2, c, 12, 12, generator=g).requires_grad_() for c in (2, 2, 4)), None)
    w = LossWeights()
    res = NucleiLoss(w)(out, np_t, hv_t, nt_t)
    manual = sum(getattr(w, k) * v for k, v in res.terms.items())
    assert res.total.item() == pytest.approx(float(manual), rel=1e-5)
    assert math.isclose(res.terms["hv_mse"].item(), F.mse_loss(out.hv, hv_t).item(), rel_tol=1e-6)
    res.total.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in out[:3])


def test_errors() -> None:
    from cellvit_optimus.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="hv_msge=-1"):
        LossWeights(hv_msge=-1)
    with pytest.raises(ValueError, match=r"logits \(1, 2, 4, 4\)"):
        dice_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 5, 5, dtype=torch.long))
    out = NucleiOutput(
        torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    )
    t = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="no tissue_target"):
        NucleiLoss()(out, t, torch.zeros(1, 2, 4, 4), t)

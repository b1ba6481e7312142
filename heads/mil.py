"""Gated-attention multiple-instance learning (Ilse, Tomczak & Welling, ICML 2018) for slide-level heads.

Sits after the backbone: a slide is a bag of tile embeddings ``(N, D)``; the model scores each tile
with a gated attention ``a_i ∝ exp(w^T (tanh(V h_i) ⊙ sigm(U h_i)))``, pools ``z = Σ a_i h_i`` and
predicts slide logits (or a regression value) from ``z``. The attention weights are the tile
heat-map. :func:`fit_mil` / :func:`predict_mil` are a small deterministic training loop for bags that
fit in memory (feature caches); the engine's slide pipeline calls the module directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellvit_optimus.engine.errors import ConfigError

__all__ = ("GatedAttentionMIL", "MILOutput", "MILPrediction", "fit_mil", "predict_mil", "pad_bags")

Task = Literal["classification", "regression"]
BagLike = np.ndarray | Tensor


class MILOutput(NamedTuple):
    """``logits`` (B, n_outputs); ``attention`` (B, N) softmax weights (0 on masked instances)."""

    logits: Tensor
    attention: Tensor


class GatedAttentionMIL(nn.Module):
    """Gated attention-MIL.

    Parameters
    ----------
    in_dim : int
        Instance (tile embedding) dimension D.
    hidden_dim, attn_dim : int
        Width of the instance embedding ``h`` and of the attention's V/U projections.
    n_outputs : int
        Logits per bag: 1 for binary classification (sigmoid), C for C-class, or regression targets.
    task : {"classification", "regression"}
        Selects the training loss in :func:`fit_mil` and is stored in checkpoints.
    dropout : float
        Dropout on the instance embedding (as CLAM).

    The buffers ``input_mean`` / ``input_std`` standardise instances inside the model (set by
    :func:`fit_mil` from its training instances; identity by default), so a checkpoint carries them.
    """

    input_mean: Tensor
    input_std: Tensor

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 256,
        attn_dim: int = 128,
        n_outputs: int = 1,
        task: Task = "classification",
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        if in_dim <= 0 or hidden_dim <= 0 or attn_dim <= 0 or n_outputs <= 0:
            raise ConfigError(
                f"in_dim={in_dim}, hidden_dim={hidden_dim}, attn_dim={attn_dim}, n_outputs={n_outputs} "
                "must all be positive"
            )
        if task not in ("classification", "regression"):
            raise ConfigError(f"task={task!r}, expected 'classification' or 'regression'")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout={dropout} must be in [0, 1)")
        self.hparams = {
            "in_dim": int(in_dim),
            "hidden_dim": int(hidden_dim),
            "attn_dim": int(attn_dim),
            "n_outputs": int(n_outputs),
            "task": task,
            "dropout": float(dropout),
        }
        self.in_dim = in_dim
        self.n_outputs = n_outputs
        self.task = task
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden_dim, attn_dim)
        self.attention_u = nn.Linear(hidden_dim, attn_dim)
        self.attention_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(hidden_dim, n_outputs)

    def forward(self, bag: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Pool a bag.

        Parameters
        ----------
        bag : Tensor (N, D) or (B, N, D)
        mask : Tensor (N,) or (B, N) bool, optional
            True for real instances, False for padding (see :func:`pad_bags`).
        """
        if bag.dim() == 2:
            bag = bag.unsqueeze(0)
            if mask is not None and mask.dim() == 1:
                mask = mask.unsqueeze(0)
        if bag.dim() != 3 or bag.shape[-1] != self.in_dim:
            raise ValueError(
                f"bag has shape {tuple(bag.shape)}, expected (N, {self.in_dim}) or (B, N, {self.in_dim})"
            )
        if mask is not None:
            if tuple(mask.shape) != tuple(bag.shape[:2]):
                raise ValueError(
                    f"mask has shape {tuple(mask.shape)}, expected {tuple(bag.shape[:2])} "
                    f"for bag {tuple(bag.shape)}"
                )
            mask = mask.to(torch.bool)
            if not bool(mask.any(dim=1).all()):
                raise ValueError("every bag needs at least one unmasked instance")
        if bag.shape[1] == 0:
            raise ValueError("empty bag (N = 0)")
        x = (bag.to(self.input_mean.dtype) - self.input_mean) / self.input_std
        h = self.embed(x)  # (B, N, H)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        scores = self.attention_w(gate).squeeze(-1)  # (B, N)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=1)
        z = torch.bmm(attn.unsqueeze(1), h).squeeze(1)  # (B, H)
        return MILOutput(self.classifier(z), attn)


def _as_tensor(bag: BagLike) -> Tensor:
    t = torch.as_tensor(np.asarray(bag) if not isinstance(bag, Tensor) else bag)
    return t.to(torch.float32)


def pad_bags(bags: Sequence[BagLike]) -> tuple[Tensor, Tensor]:
    """Stack variable-size bags ``(N_i, D)`` into ``(B, max N, D)`` zeros-padded, plus a (B, max N) mask."""
    ts = [_as_tensor(b) for b in bags]
    if not ts:
        raise ValueError("no bags given")
    dims = {t.shape[-1] for t in ts}
    if any(t.dim() != 2 or t.shape[0] == 0 for t in ts) or len(dims) != 1:
        raise ValueError(
            f"bags must be non-empty (N, D) arrays of one D; got shapes {[tuple(t.shape) for t in ts]}"
        )
    n = max(t.shape[0] for t in ts)
    out = torch.zeros(len(ts), n, ts[0].shape[1])
    mask = torch.zeros(len(ts), n, dtype=torch.bool)
    for i, t in enumerate(ts):
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return out, mask


def _loss(model: GatedAttentionMIL, logits: Tensor, y: Tensor) -> Tensor:
    if model.task == "regression":
        return F.mse_loss(logits, y.view_as(logits).float())
    if model.n_outputs == 1:
        return F.binary_cross_entropy_with_logits(logits.squeeze(1), y.float().view(-1))
    return F.cross_entropy(logits, y.long().view(-1))


def fit_mil(
    bags: Sequence[BagLike],
    labels: Sequence[float] | np.ndarray | Tensor,
    *,
    task: Task = "classification",
    n_outputs: int = 1,
    hidden_dim: int = 256,
    attn_dim: int = 128,
    dropout: float = 0.25,
    epochs: int = 40,
    lr: float = 2e-4,
    weight_decay: float = 1e-4,
    batch_size: int = 1,
    standardize: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> GatedAttentionMIL:
    """Train a :class:`GatedAttentionMIL` on in-memory bags (Adam, deterministic for a given seed on CPU).

    Parameters
    ----------
    bags : sequence of (N_i, D) arrays or Tensors
    labels : (n_bags,) or (n_bags, n_outputs)
        0/1 for binary classification (``n_outputs=1``), class ids for ``n_outputs > 1``, values for
        regression.
    batch_size : int
        Bags per optimisation step (padded and masked); 1 is the classic MIL setting.
    standardize : bool
        Store the mean/std of all training instances in the model's input buffers.
    seed : int
        Seeds initialisation, dropout and bag order without touching the global RNG state.

    Returns
    -------
    GatedAttentionMIL in eval mode.
    """
    if len(bags) == 0:
        raise ValueError("fit_mil: no bags")
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
    if y.shape[0] != len(bags):
        raise ValueError(f"fit_mil: {len(bags)} bags but {y.shape[0]} labels")
    if epochs <= 0 or batch_size <= 0 or lr <= 0:
        raise ConfigError(f"epochs={epochs}, batch_size={batch_size}, lr={lr} must be positive")
    ts = [_as_tensor(b) for b in bags]
    in_dim = ts[0].shape[-1]
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = GatedAttentionMIL(in_dim, hidden_dim, attn_dim, n_outputs, task, dropout)
        if standardize:
            allx = torch.cat(ts, dim=0)
            model.input_mean.copy_(allx.mean(0))
            model.input_std.copy_(allx.std(0, unbiased=False).clamp_min(1e-6))
        model.to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        n_batches = math.ceil(len(ts) / batch_size)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(ts), generator=gen).tolist()
            for b in range(n_batches):
                idx = order[b * batch_size : (b + 1) * batch_size]
                x, m = pad_bags([ts[i] for i in idx])
                out = model(x.to(device), m.to(device))
                loss = _loss(model, out.logits, y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model.eval()


class MILPrediction(NamedTuple):
    """``logits`` (n_bags, n_outputs) numpy; ``attention`` one (N_i,) array of weights per bag."""

    logits: np.ndarray
    attention: list[np.ndarray]


@torch.no_grad()
def predict_mil(model: GatedAttentionMIL, bags: Sequence[BagLike], *, batch_size: int = 16) -> MILPrediction:
    """Run ``model`` (in eval mode) on bags of any sizes; returns logits and per-bag attention."""
    was_training = model.training
    model.eval()
    device = model.input_mean.device
    logits: list[np.ndarray] = []
    attention: list[np.ndarray] = []
    try:
        for s in range(0, len(bags), batch_size):
            chunk = bags[s : s + batch_size]
            x, m = pad_bags(chunk)
            out = model(x.to(device), m.to(device))
            logits.append(out.logits.float().cpu().numpy())
            n = m.sum(1).tolist()
            attention.extend(out.attention[i, : n[i]].float().cpu().numpy() for i in range(len(chunk)))
    finally:
        model.train(was_training)
    return MILPrediction(np.concatenate(logits, axis=0), attention)

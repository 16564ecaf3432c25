"""The loss side of a Gauss-Newton matrix ``J^T H J``: the curvature ``H`` of the loss in
the module's output ``z``, exact, or as sampled rows ``g_s`` with ``E[g g^T] = H``
(``method="mc"``, the Monte-Carlo Gauss-Newton / Fisher of BackPACK's ``*MC``
extensions and KFAC).

The sampled rows are those of the model's own predictive distribution: for
cross-entropy a label ``y ~ softmax(z)`` per position gives ``g = p - e_y`` (its mean
outer product is ``diag(p) - p p^T``); for the mean squared error a Gaussian ``g``
scaled to the loss Hessian ``(2 / N) I``. Their random numbers are drawn outside vmap
from each sample's seed (`torchcurv._runner.draws`): Gumbel numbers for the labels
(``argmax(log p + gumbel)``), standard normal numbers for the Gaussian.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._errors import TorchcurvError, argument_error

__all__ = ["Sampling", "curvature", "mc_sampling", "sampled_rows"]


def curvature(obj: Any, objective: Any, out: Tensor, target: Any) -> tuple[Tensor, Tensor]:
    """The Hessian ``[C, C]`` and gradient ``[C]`` of `objective` in the module's output
    `out` (one sample, a batch of one): by autograd, or the closed form of
    cross-entropy with class indices (``diag(p) - p p^T`` and ``p - e_t``: the same
    values, without a double backward)."""
    c = out.numel()
    if (
        obj.loss is F.cross_entropy
        and out.dim() == 2
        and isinstance(target, Tensor)
        and target.dim() == 0
        and not target.is_floating_point()
    ):
        p = torch.softmax(out[0], dim=0)
        e = (torch.arange(c, device=p.device) == target).to(p.dtype)
        kept = (target != -100).to(p.dtype)  # cross_entropy's default ignore_index
        return (torch.diag(p) - torch.outer(p, p)) * kept, (p - e) * kept
    h = torch.func.jacrev(torch.func.grad(objective))(out).reshape(c, c)
    return h, torch.func.grad(objective)(out).reshape(c)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a recognised loss's curvature is sampled.

    Attributes:
        law: ``"gumbel"`` (cross-entropy: labels drawn from the softmax) or
            ``"gaussian"`` (mean squared error).
        mean: The loss averages over its entries (``reduction="mean"``).
        ignore_index: Cross-entropy's ignored class index.
        label_smoothing: Cross-entropy's label smoothing (it leaves ``H`` of a class
            index as it is; it scales the probability mass of soft labels).
    """

    law: str
    mean: bool = True
    ignore_index: int = -100
    label_smoothing: float = 0.0


def mc_sampling(function: str, loss: Any) -> Sampling:
    """The sampling of `loss` for ``method="mc"``; other losses are refused with the fix
    (their curvature is not that of a predictive distribution torchcurv knows)."""
    if loss is F.cross_entropy:
        return Sampling("gumbel")
    if loss is F.mse_loss:
        return Sampling("gaussian")
    reduction = getattr(loss, "reduction", None)
    if isinstance(loss, nn.CrossEntropyLoss) and loss.weight is None and reduction != "none":
        return Sampling("gumbel", reduction == "mean", loss.ignore_index, loss.label_smoothing)
    if isinstance(loss, nn.MSELoss) and reduction != "none":
        return Sampling("gaussian", reduction == "mean")
    if isinstance(loss, nn.CrossEntropyLoss) and loss.weight is not None:
        argument_error(
            function,
            "loss",
            "has class weights, which method='mc' does not sample (its rows are those of "
            "the unweighted softmax)",
            loss,
            "Drop weight=, or pass method='exact' (its exact Hessian, weights included).",
        )
    argument_error(
        function,
        "loss",
        "has no sampled curvature: method='mc' draws from the predictive distribution of "
        "F.cross_entropy / nn.CrossEntropyLoss (without class weights) or F.mse_loss / "
        "nn.MSELoss (a reduction of 'mean' or 'sum'), passed as themselves (a "
        "functools.partial or a wrapper is not recognised: nn.CrossEntropyLoss("
        "label_smoothing=...) takes the options)",
        loss,
        "Pass one of those losses, or method='exact' (any loss: its exact Hessian).",
    )


def sampled_rows(sampling: Sampling, out: Tensor, target: Tensor, noise: Tensor) -> Tensor:
    """``[S, *out.shape]`` rows ``g_s`` with ``E[g g^T] = H`` for one sample's output `out`
    (a batch of one) and target, from `noise` (``[S, out.numel()]``, drawn by the
    sampling's law): ``J^T`` of them gives the Monte-Carlo Gauss-Newton matrix
    ``(1 / S) sum_s (J^T g_s)(J^T g_s)^T``."""
    s = noise.shape[0]
    noise = noise.reshape(s, *out.shape)
    t = target.unsqueeze(0)
    if sampling.law == "gaussian":
        entries = out.numel() if sampling.mean else 1
        return noise * math.sqrt(2.0 / entries)
    if out.dim() < 2:
        raise TorchcurvError(
            "method='mc' with cross-entropy needs the module to return logits [C] (or "
            f"[C, d1, ...]) per sample, got a sample output of shape {tuple(out.shape[1:])}; "
            "return the logits, or pass method='exact'."
        )
    log_p = torch.log_softmax(out, dim=1)
    labels = (log_p + noise).argmax(dim=2, keepdim=True)  # [S, 1, 1, *positions]
    classes = torch.arange(out.shape[1], device=out.device).reshape(
        1, 1, -1, *[1] * (out.dim() - 2)
    )
    rows = log_p.exp() - (classes == labels).to(out.dtype)  # p - e_y, [S, *out.shape]
    positions = out.numel() // out.shape[1]
    if t.is_floating_point():  # probabilities: H = (their mass) (diag(p) - p p^T)
        mass = t.sum(dim=1, keepdim=True)
        mass = (1.0 - sampling.label_smoothing) * mass + sampling.label_smoothing
        scale = mass.clamp(min=0.0) / (positions if sampling.mean else 1)
        return rows * scale.sqrt()
    kept = (t != sampling.ignore_index).to(out.dtype).unsqueeze(1)  # [1, 1, *positions]
    count = kept.sum().clamp(min=1.0) if sampling.mean else torch.ones((), dtype=out.dtype)
    return rows * (kept / count).sqrt()

"""Type aliases and the names of modes shared by several modules (a leaf: no imports
from torchcurv)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

__all__ = [
    "BATCH_RANDOMNESS",
    "HESSIAN_MODES",
    "JACOBIAN_MODES",
    "RANDOMNESS",
    "WRT",
    "BatchChunk",
    "HessianChunk",
    "HessianMode",
    "JacobianMode",
    "LossFunction",
    "ModuleChunk",
    "OutputSelection",
    "ParamSelection",
    "Randomness",
    "Wrt",
]

JacobianMode = Literal["rev", "fwd", "auto"]
HessianMode = Literal["fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd", "auto"]
Randomness = Literal["error", "same"]
HessianChunk = int | tuple[int | None, int | None] | None
BatchChunk = int | Literal["auto"] | None

JACOBIAN_MODES: tuple[str, ...] = ("rev", "fwd", "auto")
HESSIAN_MODES: tuple[str, ...] = (
    "fwd-over-rev",
    "rev-over-rev",
    "rev-over-fwd",
    "fwd-over-fwd",
    "auto",
)
RANDOMNESS: tuple[str, ...] = ("error", "same")
BATCH_RANDOMNESS: tuple[str, ...] = ("error", "different", "same")

ParamSelection = (
    None
    | str
    | Sequence[str]
    | Callable[[str, torch.Tensor], bool]
    | Callable[[str], bool]
    | Mapping[str, torch.Tensor]
)
Wrt = Literal["inputs", "params", "both"]
WRT: tuple[str, ...] = ("inputs", "params", "both")
OutputSelection = None | int | slice | tuple[Any, ...] | Callable[[Any], torch.Tensor]
LossFunction = Callable[[Any, torch.Tensor], torch.Tensor]
ModuleChunk = int | Literal["auto"] | tuple[int | None, ...] | None

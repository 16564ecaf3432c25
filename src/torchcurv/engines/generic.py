"""The generic engine: torch.func's modes, vmapped over the batch.

`torchcurv.jacobian` / `torchcurv.hessian` differentiate the objective of one sample
(chunked over their basis axes); the runner vmaps that over a batch slice. Ops whose
second-order rules are wrong upstream are routed through decompositions
(`torchcurv._decompositions.corrected_ops`) inside the derivative.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._decompositions import corrected_ops
from .._runner import Work, vmapped
from .._transforms import hessian, hessian_basis_sizes, jacobian
from . import Request

__all__ = ["GenericEngine"]


def _corrected(func: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        with corrected_ops():
            return func(*args)

    return run


class GenericEngine:
    """torch.func modes: ``"rev"``/``"fwd"`` (Jacobians), ``"<outer>-over-<inner>"``
    (Hessians)."""

    def __init__(self, mode: str, order: int) -> None:
        self.mode, self.order = mode, order
        self.name = mode

    def obstacle(self, request: Request) -> str | None:
        return None

    def predicted_faster(self, request: Request) -> bool:
        return True

    def axes(self, request: Request) -> tuple[int, ...]:
        m, n = request.out_numel, request.in_numel
        if self.order == 1:
            return (n if self.mode == "fwd" else m,)
        return hessian_basis_sizes(self.mode, m, n)

    def work(self, request: Request, chunks: tuple[int | None, ...]) -> Work:
        obj = request.objective
        inner = "error" if request.randomness == "error" else "same"
        if self.order == 1:
            transform = jacobian(
                obj.per_sample,
                mode=self.mode,  # type: ignore[arg-type]
                chunk_size=chunks[0],
                randomness=inner,  # type: ignore[arg-type]
            )
        else:
            transform = hessian(
                obj.per_sample,
                mode=self.mode,  # type: ignore[arg-type]
                chunk_size=(chunks[0], chunks[1]),
                randomness=inner,  # type: ignore[arg-type]
            )
        work = vmapped(transform, obj.in_dims(), 0, request.randomness)
        assert work.single is not None
        return Work(_corrected(work.batched), _corrected(work.single))

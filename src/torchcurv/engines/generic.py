"""The generic engine: torch.func's modes, vmapped over the batch.

`torchcurv.jacobian` / `torchcurv.hessian` differentiate the objective of one sample
(chunked over their basis axes, with the ops whose second-order rules are wrong upstream
routed through `torchcurv._decompositions.corrected_ops`); the runner vmaps that over a
batch slice.
"""

from __future__ import annotations

from .._runner import Work, vmapped
from .._transforms import hessian, hessian_basis_sizes, jacobian
from . import Request

__all__ = ["GenericEngine"]


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
        return vmapped(transform, obj.in_dims(), 0, request.randomness)

"""Engines: the ways torchcurv can compute a per-sample derivative, and the one rule
that chooses between them.

An engine answers three questions about a `Request` (an objective, the derivative's
order and the per-sample sizes):

- `Engine.obstacle`: why it cannot compute the request, or None if it can;
- `Engine.axes`: the sizes of the basis axes it can chunk (the planner measures the
  real computation at small chunk sizes of these axes to plan within the budget);
- `Engine.work`: a `torchcurv._runner.Work` that computes a slice of the batch with
  given chunk sizes.

Every module-level call goes: objective -> `choose` -> plan (`torchcurv._planner`) ->
`torchcurv._runner.run_batches` -> result. No engine gets an argument another lacks:
output selection, losses, hooks, randomness, ``create_graph`` and errors are the
objective's, shared by all.

The ``"auto"`` rule, the same words at function and module level: *the fastest engine
that can compute it*. For a Hessian that is the structured engine (Hessian
backpropagation: whole input Hessians of layer stacks, and per-sample Hessian and
Gauss-Newton diagonals of parameters over the traced graph, `torchcurv.engines.diagonals`)
when it applies and its cost model predicts it faster; for an input Laplacian or
Hessian diagonal next Taylor mode (`torchcurv.engines.taylor`) when it applies and
every op has a cheap rule; otherwise
forward-over-reverse with the inner stage chosen by size (reverse unless the output has
more entries than the input). For a Jacobian: reverse mode unless the output has more
entries than the input, then forward mode. The function-level transforms have no
structured engine, so their ``"auto"`` is the second half of the same rule.

A generic mode with a forward stage is probed once per module and request (one sample,
one basis vector per stage): when it lacks a rule for an op of the forward (forward-mode
AD not implemented, e.g. ``_weight_norm_interface``; in-place ops on inputs under
vmapped forward mode), ``"auto"`` takes reverse(-over-reverse) instead, and an explicit
mode is refused with a `TorchcurvError` that names it and suggests that one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .._errors import UnsupportedModuleError
from .._objective import Objective
from .._runner import Work

__all__ = [
    "Engine", "Request", "choose", "directions", "embedded", "engine_named",
    "trace_coefficients",
]  # fmt: skip


@dataclass(frozen=True)
class Request:
    """What a module-level call asks for.

    Attributes:
        function: The public function (for messages).
        objective: The per-sample objective.
        order: 1 for a Jacobian, 2 for a Hessian.
        randomness: ``"error"``, ``"different"`` or ``"same"``.
        out_shape: Shape of one sample's differentiated output (``()`` for a scalar).
        in_numel: Entries of one sample's differentiated pytree.
        quantity: What of the second derivative (order 2): ``"hessian"`` (the whole
            matrix), ``"diagonal"`` or ``"trace"``, reduced as each basis chunk is
            computed; ``"ggn"`` / ``"ggn_diagonal"``: the generalized Gauss-Newton
            matrix ``J^T H_loss J`` of the module output and the loss (its diagonal).
        coordinates: For a trace: the flat indices of the differentiated entries it
            runs over (None: all of them).
        weights: For a trace: one weight per coordinate (None: all ones), the same for
            every sample.
        sigma: For a trace ``tr(sigma sigma^T H)``: the coefficient matrix ``[D, K]``
            (``D`` coordinates), the same for every sample; its columns are the
            directions ``d_k`` of ``sum_k d_k^T H d_k``.
        per_sample: ``"weights"`` or ``"sigma"`` when that coefficient differs per
            sample (``[B, D]``, ``[B, D, K]``): it travels with the batch as the
            objective's vectors (after the seeds of an estimate: ``(seeds, it)``), not
            in the request (see `trace_coefficients`).
        rank: ``K``, the columns of sigma (shared or per sample); 0 without it.
        method: For a diagonal or a trace: ``"exact"``, or an estimator
            (``"hutchinson"``, ``"hutch++"``) from `num_samples` Hessian-vector products
            with Rademacher probes (their seeds are the objective's per-sample vectors);
            for eigenvalues ``"lanczos"``, `num_samples` being its iterations.
        k: For eigenvalues: how many, the algebraically largest.
        model_numel: For a Gauss-Newton matrix (quantity ``"ggn"`` or
            ``"ggn_diagonal"``): the entries of one sample's module output, where the
            objective splits into the module and its loss.
    """

    function: str
    objective: Objective
    order: int
    randomness: str
    out_shape: tuple[int, ...]
    in_numel: int
    quantity: str = "hessian"
    coordinates: tuple[int, ...] | None = None
    weights: torch.Tensor | None = None
    method: str = "exact"
    num_samples: int | None = None
    k: int | None = None
    model_numel: int = 0
    sigma: torch.Tensor | None = None
    per_sample: str | None = None
    rank: int = 0

    @property
    def out_numel(self) -> int:
        return math.prod(self.out_shape)


def trace_coefficients(
    request: Request, vectors: Any
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(probes, weights, sigma)`` of a trace or a diagonal inside a per-sample
    function, from its vectors: the drawn probes of an estimate (None when exact), and
    the coefficients, the request's own or this sample's (`Request.per_sample`)."""
    if request.per_sample is None:
        return vectors, request.weights, request.sigma
    probes, given = (None, vectors) if request.method == "exact" else vectors
    if request.per_sample == "weights":
        return probes, given, None
    return probes, None, given


def directions(request: Request) -> int:
    """The vectors an exact trace or diagonal pushes through: sigma's columns, else the
    basis vectors of its coordinates (of every entry without them)."""
    if request.rank:
        return request.rank
    return request.in_numel if request.coordinates is None else len(request.coordinates)


def embedded(sigma: torch.Tensor, coordinates: tuple[int, ...] | None, n: int) -> torch.Tensor:
    """`sigma` (``[D, K]``, one row per coordinate) as ``[n, K]``: zero rows elsewhere
    (out of place: a sample's sigma may be batched)."""
    if coordinates is None:
        return sigma
    rows = torch.eye(n, dtype=sigma.dtype, device=sigma.device)[list(coordinates)]
    return rows.T @ sigma


class Engine(Protocol):
    """The interface every engine implements (see the module docstring)."""

    name: str

    def obstacle(self, request: Request) -> str | None: ...

    def axes(self, request: Request) -> tuple[int, ...]: ...

    def work(self, request: Request, chunks: tuple[int | None, ...]) -> Work: ...

    def predicted_faster(self, request: Request) -> bool: ...


def engine_named(mode: str, order: int) -> Engine:
    """The engine of an explicit mode (``"structured"``, ``"taylor"`` or a torch.func
    mode)."""
    from .generic import GenericEngine
    from .structured import StructuredEngine
    from .taylor import TaylorEngine

    if mode == "structured":
        return StructuredEngine()
    if mode == "taylor":
        return TaylorEngine()
    return GenericEngine(mode, order)


def choose(request: Request, mode: str) -> tuple[Engine, str]:
    """The engine for `mode`, and why: ``"auto"`` follows the rule in the module docstring.

    Raises:
        UnsupportedModuleError: If an explicitly named engine cannot compute the request.
    """
    from .generic import fallback_mode

    fallback = fallback_mode(request.order)
    if mode != "auto":
        engine = engine_named(mode, request.order)
        obstacle = engine.obstacle(request)
        if obstacle is not None:
            advice = (
                f"Pass mode={fallback!r} (it needs no forward-mode rules) or mode='auto'."
                if mode not in ("structured", "taylor")
                else "Pass mode='auto' (which takes an engine that applies) or a generic "
                "mode such as mode='fwd-over-rev'."
            )
            raise UnsupportedModuleError(
                f"{request.function}: mode={mode!r} cannot be used here: {obstacle}. {advice}"
            )
        return engine, f"mode={mode!r} was given"
    if request.order == 2:
        structured = engine_named("structured", 2)
        obstacle = structured.obstacle(request)
        if obstacle is None and structured.predicted_faster(request):
            return structured, "auto: the structured engine applies and is predicted faster"
        why = (
            f"auto: the structured engine does not apply ({obstacle})"
            if obstacle is not None
            else "auto: the structured engine applies but is predicted slower"
        )
        if request.quantity in ("trace", "diagonal") and request.objective.wrt == "inputs":
            taylor = engine_named("taylor", 2)
            hurdle = taylor.obstacle(request)
            if hurdle is None and taylor.predicted_faster(request):
                return taylor, f"{why}; Taylor mode applies and is predicted faster"
            why += (
                f"; Taylor mode does not apply ({hurdle})"
                if hurdle is not None
                else "; Taylor mode applies but is predicted slower (an op without a cheap rule)"
            )
        return _usable_generic(request, _auto_generic(request), fallback, why)
    why = "auto: reverse mode unless the output is larger than the input"
    return _usable_generic(request, _auto_generic(request), fallback, why)


def _usable_generic(request: Request, mode: str, fallback: str, why: str) -> tuple[Engine, str]:
    """The generic engine of `mode`, or of `fallback` when `mode` lacks a rule here."""
    engine = engine_named(mode, request.order)
    obstacle = engine.obstacle(request)
    if obstacle is None:
        return engine, why
    return engine_named(fallback, request.order), f"{why}; {obstacle}: {fallback}"


def _auto_generic(request: Request) -> str:
    larger_output = request.out_numel > request.in_numel
    if request.order == 1:
        return "fwd" if larger_output else "rev"
    return "fwd-over-fwd" if larger_output else "fwd-over-rev"

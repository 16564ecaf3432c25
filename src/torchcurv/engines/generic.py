"""The generic engine: torch.func's modes, vmapped over the batch.

Unchunked, a mode is torch.func's own composition (``jacfwd(jacrev(f))`` ...), so the
engine adds nothing to raw torch.func but the batch runner; chunked on a basis axis,
`torchcurv.jacobian` / `torchcurv.hessian` differentiate the objective of one sample
(chunked over their basis axes, with the ops whose second-order rules are wrong upstream
routed through `torchcurv._decompositions.corrected_ops`, a mode entered only when the
cached first forward of the module called such an op); the runner vmaps that over a
batch slice.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .._compat import DERIVATIVE_LOCK, tree_flatten, tree_unflatten
from .._decompositions import unrouted
from .._losses import mc_sampling, sampled_rows
from .._runner import Batch, Work, cuda_devices, draws, vmapped, with_draws, with_nones
from .._transforms import (
    HESSIAN_STAGES,
    hessian,
    hessian_basis_sizes,
    hessian_diagonal,
    hessian_vector_product,
    hutchpp_trace,
    jacobian,
    lanczos_eigvalsh,
    probing,
    vectorised_chunks,
)
from . import Request, directions, embedded, trace_coefficients

__all__ = ["GGN_QUANTITIES", "GenericEngine", "fallback_mode"]

#: The quantities of a generalized Gauss-Newton matrix (`Request.quantity`).
GGN_QUANTITIES = ("ggn", "ggn_diagonal")

# Messages of torch errors that mean "this mode has no rule for an op of the forward"
# (forward-mode AD not implemented, in-place ops under vmapped forward mode, a missing
# higher-order derivative); another mode can compute the same derivative.
_MODE_LACKS = (
    "forward ad",
    "forward-mode ad",
    "not implemented",
    "vmap: inplace arithmetic",
    "setup_context",
    "jvp",
    "zerotensors are immutable",  # forward over the double backward of F.mse_loss
)

# Probe results per module and request signature (weakly keyed by the module).
_PROBED: weakref.WeakKeyDictionary[nn.Module, dict[Any, str | None]] = weakref.WeakKeyDictionary()


def _planned(transform: Any, routed: bool, vectorised: bool = True) -> Any:
    """`transform` with its planned chunks vmapped (a chunk of one too): see
    `torchcurv._transforms.vectorised_chunks` (``vectorised=False``: a transform with
    no chunks of torchcurv's); without the `corrected_ops` mode of torchcurv's
    transforms when the first forward called no routed op (``routed=False``)."""
    if not vectorised:
        return transform  # the objective's forward skips the mode itself when not routed

    def planned(*args: Any) -> Any:
        with (
            vectorised_chunks() if vectorised else nullcontext(),
            nullcontext() if routed else unrouted(),
        ):
            return transform(*args)

    return planned


def fallback_mode(order: int) -> str:
    """The mode that needs no forward-mode rules: reverse(-over-reverse)."""
    return "rev-over-rev" if order == 2 else "rev"


def _probe(engine: GenericEngine, request: Request) -> str | None:
    """Run `engine` on one sample with chunks of one basis vector (probe mode: two
    chunks per stage) and say why it failed, if it failed for want of a rule."""
    obj = request.objective
    batch = Batch(request.function, obj.args(), obj.in_dims())
    chunks = tuple(1 for _ in engine.axes(request))
    work = engine.work(request, chunks)
    try:
        with (
            DERIVATIVE_LOCK,
            torch.random.fork_rng(devices=cuda_devices(batch.leaves)),
            probing(),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # the real run warns, if it must
            work.batched(*batch.first(1))
    except (NotImplementedError, RuntimeError) as error:
        text = str(error)
        if isinstance(error, NotImplementedError) or any(s in text.lower() for s in _MODE_LACKS):
            first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
            return f"{engine.mode!r} cannot differentiate this module ({first})"
    except Exception:  # any other failure is the real run's to report
        return None
    return None


def _torch_func_stage(mode: str, func: Any, randomness: str) -> Any:
    """`torch.func.jacrev` or `torch.func.jacfwd` of `func` (argument 0), unchunked."""
    if mode == "rev":
        return torch.func.jacrev(func)
    return torch.func.jacfwd(func, randomness=randomness)


class GenericEngine:
    """torch.func modes: ``"rev"``/``"fwd"`` (Jacobians), ``"<outer>-over-<inner>"``
    (Hessians)."""

    def __init__(self, mode: str, order: int) -> None:
        self.mode, self.order = mode, order
        self.name = mode

    def obstacle(self, request: Request) -> str | None:
        """Why this mode cannot compute `request` (a missing forward-mode rule), or None.

        Modes with a forward stage are probed once per module and request signature
        (one sample, a chunk of one basis vector per stage); reverse-over-reverse is
        not (it needs only the double backward every differentiable op has).
        """
        if request.quantity == "hvp" and self.mode == "fwd-over-fwd":
            return "forward-over-forward gives v^T H v, not H v"
        if "fwd" not in self.mode or request.out_numel == 0 or request.in_numel == 0:
            return None
        obj = request.objective
        key = (self.mode, self.order, request.randomness, obj.signature())
        cache = _PROBED.setdefault(obj.module, {})
        if key not in cache:
            cache[key] = _probe(self, request)
        return cache[key]

    def predicted_faster(self, request: Request) -> bool:
        return True

    def axes(self, request: Request) -> tuple[int, ...]:
        m, n = request.out_numel, request.in_numel
        if request.quantity == "hvp":
            return ()  # one product per sample: no basis
        if request.quantity in GGN_QUANTITIES:  # the vector-Jacobian products: one per
            # output entry, or per sampled row (method="mc")
            return (
                (request.num_samples or 0,) if request.method == "mc" else (request.model_numel,)
            )
        if self.order == 1:
            return (n if self.mode == "fwd" else m,)
        inner, outer = hessian_basis_sizes(self.mode, m, n)
        if request.quantity == "hessian":
            return inner, outer
        if request.method in ("hutch++", "lanczos"):
            return ()  # its products depend on each other: no chunks
        if request.method == "hutchinson":
            assert request.num_samples is not None
            return inner, request.num_samples  # the probes, through the outer stage
        # A diagonal or a trace pushes the input's basis (its selected coordinates, or
        # sigma's columns) through the outer stage.
        return inner, directions(request)

    def work(self, request: Request, chunks: tuple[int | None, ...]) -> Work:
        obj = request.objective
        inner = "error" if request.randomness == "error" else "same"
        whole = all(c is None or c >= a for c, a in zip(chunks, self.axes(request), strict=True))
        absent = obj.absent()
        count = len(obj.in_dims())
        func = with_nones(obj.per_sample, absent, count)
        vectorised = True
        if request.quantity in GGN_QUANTITIES:
            return _ggn_work(self.mode, request, chunks, absent, count, inner)
        if request.quantity in ("diagonal", "trace") and request.method in ("exact", "hutchinson"):
            return _diagonal_work(self.mode, request, chunks, absent, count, inner)
        if request.method != "exact":
            return _estimator_work(self.mode, request, chunks, absent, count, inner)
        if request.quantity == "hvp":
            product = hessian_vector_product(obj.per_sample, self.mode)
            transform = with_nones(product, absent, count)
            vectorised = False  # no chunks of torchcurv's
        elif whole and request.out_numel and request.in_numel:
            # Unchunked: torch.func's own composition, which the objective's forward
            # routes itself (`torchcurv.functional`): nothing added to raw torch.func.
            stages = (self.mode,) if self.order == 1 else HESSIAN_STAGES[self.mode]
            transform = func
            for stage in stages:
                transform = _torch_func_stage(stage, transform, inner)
            vectorised = False  # no chunks of torchcurv's
        elif self.order == 1:
            transform = jacobian(
                func,
                mode=self.mode,  # type: ignore[arg-type]
                chunk_size=chunks[0],
                randomness=inner,  # type: ignore[arg-type]
            )
        else:
            transform = hessian(
                func,
                mode=self.mode,  # type: ignore[arg-type]
                chunk_size=(chunks[0], chunks[1]),
                randomness=inner,  # type: ignore[arg-type]
            )
        planned = _planned(transform, obj.routed, vectorised)
        return vmapped(planned, obj.in_dims(), 0, request.randomness, absent)


def _ggn_work(
    mode: str,
    request: Request,
    chunks: tuple[int | None, ...],
    absent: tuple[int, ...],
    count: int,
    randomness: str,
) -> Work:
    """Work of a generalized Gauss-Newton matrix ``G = J^T H J`` (or its diagonal) per
    sample: one forward with its vector-Jacobian products against the module output's
    basis (``J^T``, one row per output entry, in chunks of ``chunks[0]``), the loss
    Hessian ``H`` of that output in `mode` (exact for any loss: closed forms need not be
    recognised, and an indefinite ``H`` is kept as it is), contracted: ``G[a][b] =
    sum_cd J_ca H_cd J_db``, the diagonal ``sum_c J_c * (H J)_c``. Differentiable with
    ``create_graph`` like every engine's result."""
    obj = request.objective
    diagonal = request.quantity == "ggn_diagonal"
    sampling = mc_sampling(request.function, obj.loss) if request.method == "mc" else None

    def ggn(diff: Any, xs: Any, target: Any, buffers: Any, vectors: Any) -> Any:
        out, pull = torch.func.vjp(lambda d: obj.sample_output(d, xs, buffers), diff)[:2]
        if sampling is not None:  # method="mc": the loss's sampled rows, H = I / S
            basis = sampled_rows(sampling, out, target, vectors)
            h = torch.eye(len(basis), dtype=out.dtype, device=out.device) / len(basis)
        else:
            n = out.numel()
            h = hessian(
                lambda o: obj.sample_loss(o, target),
                mode=mode,  # type: ignore[arg-type]
                randomness=randomness,  # type: ignore[arg-type]
            )(out).reshape(n, n)
            basis = torch.eye(n, dtype=out.dtype, device=out.device).reshape(n, *out.shape)
        rows = torch.vmap(lambda v: pull(v)[0], chunk_size=chunks[0], randomness=randomness)(basis)
        flat, spec = tree_flatten(rows)  # leaves [n, *leaf]: the rows of J^T
        weighted = [torch.tensordot(h, j, dims=1) for j in flat]  # H J
        if diagonal:
            return tree_unflatten([(j * w).sum(0) for j, w in zip(flat, weighted, strict=True)],
                                  spec)  # fmt: skip
        # rows of the pytree outside, columns inside, as torch.func nests a Hessian
        return tree_unflatten(
            [tree_unflatten([torch.tensordot(j, w, dims=([0], [0])) for w in weighted], spec)
             for j in flat],
            spec,
        )  # fmt: skip

    func = with_nones(ggn, absent, count)
    work = vmapped(_planned(func, obj.routed), obj.in_dims(), 0, request.randomness, absent)
    if sampling is None:
        return work
    like = tree_flatten(obj.diff(obj.xs))[0][0]
    shape = (request.num_samples or 0, request.model_numel)
    return with_draws(
        work, lambda seeds: draws(seeds, shape, like.dtype, like.device, sampling.law)
    )


def _diagonal_work(
    mode: str,
    request: Request,
    chunks: tuple[int | None, ...],
    absent: tuple[int, ...],
    count: int,
    randomness: str,
) -> Work:
    """Work of an exact or Hutchinson diagonal or trace (`hessian_diagonal`), with the
    coefficients of this sample (`trace_coefficients`): the objective's vectors carry
    the seeds of the probes, drawn for each slice of the batch (outside vmap, sample
    ``i``'s from its own seed, so the chunking never changes them), and per-sample
    weights or sigma."""
    obj = request.objective
    objective = with_nones(obj.per_sample, (*absent, count - 1), count)  # no vectors
    carried = count - 1 not in absent
    n = request.in_numel

    def quantity(*args: Any) -> Any:
        vectors = args[-1] if carried else None
        probes, weights, sigma = trace_coefficients(request, vectors)
        transform = hessian_diagonal(
            objective,
            mode=mode,
            chunk_size=(chunks[0], chunks[1]),
            randomness=randomness,
            trace=request.quantity == "trace",
            coordinates=request.coordinates,
            weights=weights,
            sigma=None if sigma is None else embedded(sigma, request.coordinates, n),
            estimate=probes is not None,
        )
        given = args[:-1] if carried else args
        return transform(*given, *(() if probes is None else (probes,)))

    work = vmapped(_planned(quantity, obj.routed), obj.in_dims(), 0, request.randomness, absent)
    if request.method == "exact":
        return work
    like = tree_flatten(obj.diff(obj.xs))[0][0]
    shape = (request.num_samples or 0, request.rank or n)  # sigma's probes: K entries
    return with_draws(work, lambda seeds: draws(seeds, shape, like.dtype, like.device))


def _estimator_work(
    mode: str,
    request: Request,
    chunks: tuple[int | None, ...],
    absent: tuple[int, ...],
    count: int,
    randomness: str,
) -> Work:
    """Work of a Hutch++ estimate or of Lanczos: the objective's per-sample
    vectors are seeds; each slice of the batch draws its samples' probes (start vectors)
    from them (outside vmap,
    sample ``i``'s from its own seed, so the chunking never changes them) and passes
    them in batched."""
    obj = request.objective
    assert request.num_samples is not None
    # The objective ignores the vectors: the estimate takes the probes as its last argument.
    func = with_nones(obj.per_sample, (*absent, count - 1), count)
    rows = request.num_samples
    if request.method == "lanczos":
        assert request.k is not None
        transform = lanczos_eigvalsh(func, mode, request.k, rows)
    else:
        assert request.method == "hutch++"
        rows = 2 * (request.num_samples // 3)
        transform = hutchpp_trace(func, mode, request.num_samples // 3)
    work = vmapped(_planned(transform, obj.routed), obj.in_dims(), 0, request.randomness, absent)
    like = tree_flatten(obj.diff(obj.xs))[0][0]

    def probes(seeds: torch.Tensor) -> torch.Tensor:
        # Lanczos starts (and restarts) from Gaussian vectors: a restart must leave the
        # span of the basis so far, which a repeated sign vector does not.
        law = "gaussian" if request.method == "lanczos" else "rademacher"
        return draws(seeds, (rows, request.in_numel), like.dtype, like.device, law)

    return with_draws(work, probes)

"""Public per-sample API: objective -> engine -> plan -> run.

Every module-level function builds the per-sample `torchcurv._objective.Objective`,
chooses an engine with `torchcurv.engines.choose` (the one ``"auto"`` rule), plans
chunk sizes within the memory budget from measurements of the real derivative
(`torchcurv._memory`), and runs the batch with `torchcurv._runner.run_batches`.
`explain` stops before the last step and says what would happen.

Grad mode: with ``create_graph=False`` inputs and parameters are detached, so nothing
is recorded and the call works under `torch.no_grad` and `torch.inference_mode`; with
``create_graph=True`` the module's own parameters and the caller's inputs are used, so
the results carry gradients to them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (
    check_estimator,
    check_flag,
    check_layers,
    check_mode,
    check_module_chunk,
    check_randomness,
)
from ._compat import DERIVATIVE_LOCK, tree_flatten, tree_map
from ._errors import (
    MemoryBudgetError,
    TorchcurvError,
    TorchcurvFallbackWarning,
    argument_error,
    describe,
)
from ._functional import functional as functional
from ._functional import has_backward_hooks
from ._layout import to_matrix
from ._losses import mc_sampling
from ._memory import (
    DEFAULT_WORKING_SET,
    SAFETY_MARGIN,
    Plan,
    fit,
    format_bytes,
    heap_reserve,
    heap_slack,
    parse_budget,
    plan,
)
from ._objective import (
    FirstForward,
    Objective,
    itemsize,
    label,
    module_state,
    numel,
    per_sample_objective,
    usable,
)
from ._runner import (
    Batch,
    Work,
    budget_after_setup,
    cuda_devices,
    measure_work,
    random_error,
    run_batches,
    sample_seeds,
    unbatchable,
)
from ._transforms import hessian
from ._types import (
    BATCH_RANDOMNESS,
    HESSIAN_MODES,
    JACOBIAN_MODES,
    LossFunction,
    ModuleChunk,
    OutputSelection,
    ParamSelection,
    Wrt,
)
from .engines import Engine, Request, choose
from .engines.generic import GGN_QUANTITIES

logger = logging.getLogger("torchcurv")

__all__ = [
    "Decision",
    "batch_hessian",
    "explain",
    "functional",
    "per_sample_ggn",
    "per_sample_ggn_diag",
    "per_sample_hessian",
    "per_sample_hessian_diag",
    "per_sample_hessian_eigvalsh",
    "per_sample_hvp",
    "per_sample_jacobian",
    "per_sample_laplacian",
]


# --------------------------------------------------------------------------------------
# the flow of a module-level call
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What a module-level call will do, from `torchcurv.explain`.

    Attributes:
        function: The public function.
        engine: The engine's name (``"structured"``, ``"fwd-over-rev"``, ``"rev"``...).
        why_engine: Why that engine.
        batch_chunk: Samples per vectorised call (None: all at once).
        basis_chunks: Basis vectors per call on each of the engine's axes.
        basis_sizes: The sizes of those axes.
        predicted_peak: Bytes the planner predicts the call adds to the memory in use:
            its measured live peak plus, on the CPU, its working set again for the C
            heap's fragmentation (None when the chunk sizes were given explicitly and
            nothing was measured).
        budget: The memory budget in bytes (None when chunk sizes were given).
        why_plan: Why those chunk sizes.
        looped: True when vmap cannot batch an operator of the module, so the samples
            run one at a time (a `TorchcurvFallbackWarning` says which operator).
    """

    function: str
    engine: str
    why_engine: str
    batch_chunk: int | None
    basis_chunks: tuple[int | None, ...]
    basis_sizes: tuple[int, ...]
    predicted_peak: int | None
    budget: int | None
    why_plan: str
    looped: bool = False

    def __str__(self) -> str:
        from ._memory import format_bytes

        peak = "not measured" if self.predicted_peak is None else format_bytes(self.predicted_peak)
        budget = "none" if self.budget is None else format_bytes(self.budget)
        return (
            f"{self.function}: engine {self.engine!r} ({self.why_engine}); batch chunk "
            f"{self.batch_chunk}, basis chunks {self.basis_chunks} of {self.basis_sizes}; "
            f"predicted peak {peak} of a {budget} budget ({self.why_plan})"
            + ("; samples looped (vmap cannot batch an operator)" if self.looped else "")
        )


@dataclass(frozen=True)
class _Call:
    request: Request
    engine: Engine
    decision: Decision
    size: int
    template: _Template | None = None
    #: For a call that reused a template: the call prepared anew (see `_run`).
    again: Callable[[], _Call] | None = None


class _Template:
    """What a module-level call prepared that its repeats can reuse: the checked
    objective (stripped of its inputs, so it holds no batch alive), the request, the
    engine and its works, valid while the module's state (`module_state`) is unchanged.

    The objective reads the parameters and buffers through aliases, so a training step
    that updates them in place is seen; a replaced parameter, a ``.data`` swap, a
    hook, ``train()``/``eval()`` change the state and the call is prepared anew.
    """

    def __init__(self, state: tuple[Any, ...], request: Request, engine: Engine, why: str,
                 axes: tuple[int, ...], first: FirstForward,
                 chunks: tuple[Any, tuple[Any, ...]]) -> None:  # fmt: skip
        obj = copy.copy(request.objective)
        obj.xs = tuple(x.new_empty((0, *x.shape[1:])) for x in obj.xs)
        if obj.targets is not None:
            obj.targets = obj.targets.new_empty((0, *obj.targets.shape[1:]))
        if obj.vectors is not None:
            obj.vectors = tree_map(lambda v: v.new_empty((0, *v.shape[1:])), obj.vectors)
        self.state, self.engine, self.why, self.axes, self.first = state, engine, why, axes, first
        self.chunks = chunks
        self.request = dataclasses.replace(request, objective=obj)
        self._works: dict[tuple[int | None, ...], Work] = {}
        #: The decision of given chunk sizes (the same for every call), once made.
        self.given: Decision | None = None

    def request_for(self, inputs: Any, targets: torch.Tensor | None, vectors: Any) -> Request:
        """The request for a new batch of the same signature (already checked)."""
        model = self.request.objective
        obj = Objective.__new__(Objective)  # a copy (copy.copy takes 3x as long)
        obj.__dict__.update(model.__dict__)
        if isinstance(inputs, torch.Tensor):
            obj.xs = (usable(inputs, False),)
        else:
            obj.xs = tuple(usable(x, False) for x in as_tuple(inputs))
        if vectors is not None:  # structure and shapes as the first call's (the key)
            obj.vectors = tree_map(lambda v: usable(v, False), vectors)
        if targets is not None:
            obj.targets = usable(targets, False)
            _check_class_targets(obj, self.first.classes)
        r = self.request
        return Request(r.function, obj, r.order, r.randomness, r.out_shape, r.in_numel,
                       r.quantity, r.coordinates, r.weights, r.method, r.num_samples,
                       r.k, r.model_numel, r.sigma, r.per_sample, r.rank)  # fmt: skip

    def work(self, chunks: tuple[int | None, ...]) -> Work:
        work = self._works.get(chunks)
        if work is None:
            work = self._works[chunks] = self.engine.work(self.request, chunks)
        return work


# Templates per module and call key (weakly keyed by the module; a few per module).
_TEMPLATES: weakref.WeakKeyDictionary[nn.Module, dict[Any, _Template]] = (
    weakref.WeakKeyDictionary()
)
_TEMPLATES_PER_MODULE = 8


def _tensor_key(x: Any) -> tuple[Any, ...]:
    return (type(x), x.shape, x.dtype, x.device, x.layout, x.requires_grad, x.is_inference())


_NO_VECTORS = tree_flatten(None)


def _template_key(inputs: Any, settings: tuple[Any, ...], what: dict[str, Any]) -> Any:
    """The key of a call's template: everything its preparation checked or derived
    from (the options, the shapes, dtypes and devices of the inputs and targets), or
    None for calls that are prepared anew each time (kwargs, parameter values or tensor
    indices given, ``create_graph=True``, arguments that are not as expected)."""
    xs = as_tuple(inputs)
    targets, output, params = what.get("targets"), what.get("output"), what.get("params")
    vectors, spec = _NO_VECTORS if what.get("vectors") is None else tree_flatten(what["vectors"])
    if (
        what.get("kwargs")
        or not isinstance(xs, tuple)
        or not all(isinstance(x, torch.Tensor) for x in xs)
        or not (targets is None or isinstance(targets, torch.Tensor))
        or not (params is None or isinstance(params, str) or (
            isinstance(params, (list, tuple)) and all(isinstance(p, str) for p in params)))
        or not (output is None or callable(output) or _plain_index(output))
        or not all(v is None or isinstance(v, torch.Tensor) for v in vectors)
    ):  # fmt: skip
        return None
    key = (
        settings,
        what.get("wrt"),
        params if params is None or isinstance(params, str) else ("names", *params),
        output if callable(output) else repr(output),
        what.get("loss"),
        what.get("argnums"),
        tuple(_tensor_key(x) for x in xs),
        None if targets is None else _tensor_key(targets),
        spec,
        tuple(None if v is None else _tensor_key(v) for v in vectors),
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _plain_index(output: Any) -> bool:
    """An index whose repr is the whole index: ints, slices, Ellipsis and tuples of them."""
    if isinstance(output, tuple):
        return all(_plain_index(o) for o in output)
    return (isinstance(output, int) or output is Ellipsis or isinstance(output, slice)) and (
        not isinstance(output, slice)
        or all(v is None or isinstance(v, int) for v in (output.start, output.stop, output.step))
    )


def as_tuple(inputs: Any) -> Any:
    return (inputs,) if isinstance(inputs, torch.Tensor) else inputs


def _grad_mode(function: str, create_graph: bool) -> Any:
    """Grad on, inference mode off, for the derivative; refuse create_graph without grad."""
    check_flag(function, "create_graph", create_graph)
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
    if create_graph and (inference or not grad):
        context = "inference_mode" if inference else "no_grad"
        raise TorchcurvError(
            f"{function}: create_graph=True needs grad mode, got a call under "
            f"torch.{context}(). Call it outside that context, or pass "
            "create_graph=False (the derivatives are still computed, detached)."
        )
    if grad and not inference:
        return nullcontext()  # already so (the usual case): no context to enter
    return _grad_on()


@contextmanager
def _grad_on() -> Iterator[None]:
    with torch.inference_mode(False), torch.enable_grad():
        yield


# First forwards per module and call signature (weakly keyed by the module).
_FIRST: weakref.WeakKeyDictionary[nn.Module, dict[Any, FirstForward]] = weakref.WeakKeyDictionary()


def _first_forward(obj: Objective) -> FirstForward:
    """One sample's forward, RNG-neutral and without grad, cached per module state and
    call signature (`Objective.signature`): the output's shape, the routed ops it calls
    and the buffers it writes. The objective adopts them; class targets are checked."""
    cache = _FIRST.setdefault(obj.module, {})
    first = cache.get(obj.signature())
    if first is None:
        first = cache[obj.signature()] = _observe(obj)
    obj.adopt(first)
    _check_class_targets(obj, first.classes)
    return first


def _observe(obj: Objective) -> FirstForward:
    try:
        with torch.random.fork_rng(devices=cuda_devices(list(obj.xs))), torch.no_grad():
            return obj.first_forward()
    except Exception as error:
        _refuse_batched_kwargs(obj, error)
        if isinstance(error, TorchcurvError):
            raise
        shapes = ", ".join(describe(x) for x in obj.xs)
        given = "" if obj.targets is None else f" and targets {describe(obj.targets)}"
        dtypes = {p.dtype for p in obj.module.parameters()}
        if "dtype" in str(error) and len(dtypes) == 1 and obj.xs[0].dtype not in dtypes:
            (dtype,) = dtypes
            raise TorchcurvError(
                f"{obj.function}: inputs have dtype {obj.xs[0].dtype} but the module's "
                f"parameters are {dtype} ({type(error).__name__}: {error}). Convert one: "
                f"inputs.to({dtype}) or model.to({obj.xs[0].dtype})."
            ) from error
        raise TorchcurvError(
            f"{obj.function}: the forward of one sample failed: {type(obj.module).__name__} "
            f"on inputs {shapes}{given} (each sample is fed as a batch of one) raised "
            f"{type(error).__name__}: {error}. Check that the inputs (and targets) have the "
            "shapes and dtypes the module (and loss) expect, with the batch dim first."
            + (
                " The inputs are 1-D, so each sample is a scalar; for one vector per sample "
                "pass shape (B, n), e.g. X[None] for a single sample."
                if any(x.dim() == 1 for x in obj.xs)
                else ""
            )
        ) from error


def _class_count_loss(loss: Any) -> int | None:
    """The ignore_index of a class-index loss (cross-entropy, NLL), None for others."""
    if loss in (F.cross_entropy, F.nll_loss):
        return -100
    if isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return int(loss.ignore_index)
    return None


def _check_class_targets(obj: Objective, classes: int | None) -> None:
    """Class indices of a cross-entropy or NLL loss within the module's `classes`,
    checked up front (torch reports a bad one deep inside the derivative, without the
    sample)."""
    ignore = _class_count_loss(obj.loss)
    targets = obj.targets
    if ignore is None or targets is None or targets.is_floating_point() or not targets.numel():
        return
    if classes is None:
        return  # the loss itself will say what is wrong
    bad = ((targets < 0) | (targets >= classes)) & (targets != ignore)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise TorchcurvError(
            f"{obj.function}: targets{list(index)} is {int(targets[index])}, outside the "
            f"module's {classes} classes (0 to {classes - 1}) for "
            f"{getattr(obj.loss, '__name__', type(obj.loss).__name__)}. Pass class indices "
            f"in range (ignore_index={ignore} marks a sample to skip)."
        )


def _refuse_batched_kwargs(obj: Objective, error: Exception) -> None:
    """After a failed forward: a kwargs tensor with the batch's leading size is the
    likely cause (kwargs reach every sample unchanged); say so and point to argnums."""
    size = obj.xs[0].shape[0] if obj.xs and obj.xs[0].dim() else 0
    for key, value in obj.kwargs.items():
        leaves = [v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]
        if size > 1 and any(v.dim() and v.shape[0] == size for v in leaves):
            raise TorchcurvError(
                f"{obj.function}: kwargs[{key!r}] looks per-sample ({describe(leaves[0])}, "
                f"leading dim {size} = the batch size), and the forward of one sample "
                f"failed with it ({type(error).__name__}: {str(error).splitlines()[0]}). "
                "kwargs reach every sample unchanged. Pass per-sample tensors "
                "positionally, inputs=(x, mask), with argnums=(0,) to leave the others "
                "undifferentiated."
            ) from error


def _prepare(
    function: str,
    module: nn.Module,
    inputs: Any,
    *,
    order: int,
    mode: str,
    chunk_size: Any,
    memory_budget: Any,
    randomness: str,
    create_graph: bool,
    quantity: str = "hessian",
    coordinates: Any = None,
    weights: Any = None,
    sigma: Any = None,
    method: str = "exact",
    num_samples: Any = None,
    generator: Any = None,
    k: Any = None,
    **what: Any,
) -> _Call:
    """Check, build the objective, choose the engine and plan: everything but the run.

    A repeated call (same options, shapes and module state) reuses what its first call
    prepared (`_Template`): only the plan of an ``"auto"`` chunk size is looked up again
    (the default budget follows the memory available).
    """
    _check_method(function, quantity, method, num_samples, generator)
    per_sample = _per_sample_coefficient(inputs, what.get("argnums"), coordinates, weights, sigma)
    given = {"weights": weights, "sigma": sigma}.get(per_sample or "")
    settings = (function, order, mode, chunk_size, memory_budget, randomness, quantity,
                _selection_key(coordinates, weights, sigma, per_sample), method, num_samples,
                k)  # fmt: skip
    key = None if create_graph else _template_key(inputs, settings, what)
    templates = None if key is None else _TEMPLATES.get(module)
    template = None if templates is None else templates.get(key)
    if template is not None and template.state == module_state(module):
        batch_chunk, axis_chunks = template.chunks
        request = template.request_for(inputs, what["targets"], what.get("vectors"))
        # new probes for every call, and this batch's coefficients
        request.objective.vectors = _carried(request, generator, given, request.objective.vectors)
        options = dict(order=order, mode=mode, chunk_size=chunk_size,
                       memory_budget=memory_budget, randomness=randomness,
                       create_graph=create_graph, quantity=quantity, coordinates=coordinates,
                       weights=weights, sigma=sigma, method=method, num_samples=num_samples,
                       generator=generator, k=k, **what)  # fmt: skip
        again = functools.partial(_prepare_anew, function, module, inputs, options)
        return _decide(request, template, batch_chunk, axis_chunks, memory_budget, None, again)
    check_mode(
        function,
        mode,
        JACOBIAN_MODES if order == 1
        else (*HESSIAN_MODES, "structured", "taylor") if quantity in ("trace", "diagonal")
        else (*HESSIAN_MODES, "structured"),
    )  # fmt: skip
    # an HVP has no basis to chunk; a Gauss-Newton matrix one: the module output's
    n_axes = 0 if quantity == "hvp" else 1 if quantity in GGN_QUANTITIES else order
    batch_chunk, axis_chunks = check_module_chunk(function, chunk_size, memory_budget, n_axes)
    randomness = check_randomness(function, randomness, BATCH_RANDOMNESS)
    planning_budget = None
    if memory_budget is not None:  # before the first forward and the probes
        planning_budget = budget_after_setup(function, memory_budget, inputs)
    obj, _ = per_sample_objective(
        function, module, inputs, randomness, create_graph=create_graph, **what
    )
    first = _first_forward(obj)
    in_numel = numel(obj.probe_sample()[0])
    selection = _selection(function, obj, in_numel, coordinates, weights, sigma, per_sample)
    request = Request(function, obj, order, randomness, first.out_shape, in_numel, quantity,
                      selection.coordinates, selection.weights, method, num_samples,
                      sigma=selection.sigma, per_sample=per_sample,
                      rank=selection.rank)  # fmt: skip
    # the probes' seeds, one per sample, and per-sample coefficients, passed in batched
    obj.vectors = _carried(request, generator, given, obj.vectors)
    if quantity == "eigvalsh":
        request = _eigen_request(request, k, num_samples)
    if quantity in GGN_QUANTITIES:
        request = dataclasses.replace(request, model_numel=_ggn_split(function, obj, first))
        if method == "mc":
            mc_sampling(function, obj.loss)  # a loss it cannot sample: refused now
    if method == "hutch++" and request.out_numel != 1:
        argument_error(
            function,
            "method",
            "'hutch++' needs an objective with one entry per sample; the selected output "
            f"has shape {request.out_shape}",
            method,
            "Select one output (output=0), or use method='hutchinson' or 'exact'.",
        )
    given_with = {"coordinates": coordinates, "weights": weights, "sigma": sigma}
    conflict = next((k for k, v in given_with.items() if v is not None), None)
    if method == "hutch++" and conflict is not None:
        argument_error(
            function,
            conflict,
            "cannot be used with method='hutch++' (its sketch takes the trace over all "
            "entries: no coordinates, weights or sigma)",
            given_with[conflict],
            f"Use method='hutchinson' (or 'exact') with {conflict}=, or drop {conflict}.",
        )
    if quantity == "hvp" and request.out_numel != 1:
        _refuse_non_scalar(request)
    engine, why_engine = choose(request, mode)
    axes = engine.axes(request)
    template = _Template(
        obj.signature()[0], request, engine, why_engine, axes, first, (batch_chunk, axis_chunks)
    )
    if key is not None and not has_backward_hooks(module):
        # (a module with backward hooks runs as a shallow copy made with the objective,
        # which would not see later changes of the module's attributes: never reused)
        templates = _TEMPLATES.setdefault(module, {})
        if len(templates) >= _TEMPLATES_PER_MODULE:
            del templates[next(iter(templates))]  # the oldest
        templates[key] = template
    return _decide(request, template, batch_chunk, axis_chunks, memory_budget, planning_budget)


def _prepare_anew(function: str, module: nn.Module, inputs: Any, options: dict[str, Any]) -> _Call:
    """A repeated call prepared anew, its module's caches dropped (see `_run`)."""
    _TEMPLATES.pop(module, None)
    _FIRST.pop(module, None)
    return _prepare(function, module, inputs, **options)


_METHODS = {
    "diagonal": ("exact", "hutchinson"),
    "ggn": ("exact", "mc"),
    "ggn_diagonal": ("exact", "mc"),
    "trace": ("exact", "hutchinson", "hutch++"),
    "eigvalsh": ("lanczos",),
}


def _check_method(
    function: str, quantity: str, method: Any, num_samples: Any, generator: Any
) -> None:
    """The estimator options of a diagonal, a trace or eigenvalues."""
    check_estimator(function, method, _METHODS.get(quantity, ("exact",)), num_samples, generator)


def _selection_key(coordinates: Any, weights: Any, sigma: Any, per_sample: str | None) -> Any:
    """The template key of a trace's coordinates and coefficients: values, as given;
    the shape and dtype of a per-sample coefficient (it travels with the batch)."""
    if coordinates is None and weights is None and sigma is None:
        return None
    key = []
    for name, value in (("coordinates", coordinates), ("weights", weights), ("sigma", sigma)):
        if name == per_sample:
            value = (per_sample, *_tensor_key(torch.as_tensor(value)))
        elif isinstance(value, torch.Tensor):
            value = (
                value.dtype,
                value.device,
                tuple(value.shape),
                tuple(value.flatten().tolist()),
            )
        elif isinstance(value, (list, tuple)):
            value = tuple(value)
        key.append(value)
    return tuple(key)


def _per_sample_coefficient(
    inputs: Any, argnums: Any, coordinates: Any, weights: Any, sigma: Any
) -> str | None:
    """``"weights"`` or ``"sigma"`` where that coefficient has a row per sample
    (``[B, D]``, ``[B, *x.shape[1:]]``, ``[B, D, K]``), else None (`_selection` checks
    the rest). Weights are per sample when they hold ``B`` times one sample's count."""
    if sigma is None and weights is None:
        return None
    try:
        w = torch.as_tensor(weights if sigma is None else sigma)
    except (TypeError, ValueError, RuntimeError, NotImplementedError):
        return None  # `_selection` says what is wrong
    if sigma is not None:
        return "sigma" if w.dim() == 3 else None
    xs = as_tuple(inputs)
    if w.dim() < 2 or not isinstance(xs, tuple) or not xs:
        return None
    first = xs[0]
    if not isinstance(first, torch.Tensor) or not first.dim() or w.shape[0] != len(first):
        return None
    try:
        if coordinates is not None:
            mask = isinstance(coordinates, torch.Tensor) and coordinates.dtype == torch.bool
            count = int(coordinates.sum()) if mask else len(coordinates)
        else:
            picked = argnums if isinstance(argnums, tuple) else (argnums or 0,)
            count = sum(xs[i][0].numel() for i in picked)
    except (IndexError, TypeError, AttributeError):
        return None  # `_selection` says what is wrong
    return "weights" if w.numel() == len(first) * count else None


@dataclass
class _Selection:
    """A trace's checked coordinates (flat indices into one sample's differentiated
    entries) and its shared coefficients (see `Request`)."""

    coordinates: tuple[int, ...] | None
    weights: torch.Tensor | None
    sigma: torch.Tensor | None
    rank: int


def _carried(request: Request, generator: Any, given: Any, vectors: Any) -> Any:
    """The objective's per-sample vectors of a trace or a diagonal: the probes' seeds of
    an estimate and a per-sample coefficient (``(seeds, it)`` with both); other
    quantities' `vectors` as they are."""
    obj = request.objective
    if request.quantity not in ("trace", "diagonal", "eigvalsh", *GGN_QUANTITIES):
        return vectors
    seeds = None if request.method == "exact" else sample_seeds(obj.batch_size(), generator)
    if request.per_sample is None:
        return seeds
    x = obj.xs[obj.argnums[0]] if obj.argnums else obj.xs[0]
    coefficient = torch.as_tensor(given, dtype=x.dtype, device=x.device)
    if not obj.create_graph:  # detached results, as the derivative's
        coefficient = coefficient.detach()
    if request.per_sample == "weights":
        coefficient = coefficient.reshape(len(coefficient), -1)
    return coefficient if seeds is None else (seeds, coefficient)


def _selection(
    function: str,
    obj: Objective,
    n: int,
    coordinates: Any,
    weights: Any,
    sigma: Any,
    per_sample: str | None,
) -> _Selection:
    """Checked coordinates and coefficients of a trace (`_Selection`)."""
    x = obj.xs[obj.argnums[0]] if obj.argnums else obj.xs[0]
    shape = tuple(x.shape[1:])
    indices = None
    if coordinates is not None:
        given = coordinates
        if isinstance(given, torch.Tensor) and given.dtype == torch.bool:
            if not obj.single:
                argument_error(
                    function,
                    "coordinates",
                    "as a boolean mask needs one differentiated input (tuple argnums "
                    "differentiate several)",
                    given,
                    "Pass flat indices into the entries of all differentiated inputs, in "
                    "order (the first input's entries first).",
                )
            if tuple(given.shape) != shape:
                argument_error(
                    function,
                    "coordinates",
                    f"as a boolean mask must have one sample's input shape {shape}",
                    given,
                    "Pass a mask shaped like one sample (x.shape[1:]), or flat indices.",
                )
            given = given.flatten().nonzero().flatten()
        if isinstance(given, torch.Tensor):
            given = given.tolist() if given.dim() == 1 and not given.is_floating_point() else given
        if (
            not isinstance(given, (list, tuple))
            or not given
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in given)
        ):
            argument_error(
                function,
                "coordinates",
                "must be a non-empty sequence of ints (flat indices into one sample's "
                "differentiated entries) or a boolean mask of one sample's shape",
                coordinates,
                "Pass e.g. coordinates=[1, 2] for the spatial entries of (t, x, y).",
            )
        bad = [i for i in given if not 0 <= i < n]
        if bad or len(set(given)) != len(given):
            problem = (
                f"must index the {n} differentiated entries of a sample (0 to {n - 1})"
                if bad
                else "must not repeat an index"
            )
            argument_error(
                function,
                "coordinates",
                problem,
                coordinates,
                "Pass distinct flat indices in range (use weights= to weigh entries).",
            )
        indices = tuple(given)
    count = n if indices is None else len(indices)
    if sigma is not None:
        return _checked_sigma(function, obj, indices, count, weights, sigma, per_sample)
    if weights is None:
        return _Selection(indices, None, None, 0)
    _check_real(function, "weights", weights)
    try:
        w = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    except (TypeError, ValueError, RuntimeError, NotImplementedError):
        w = None
    if per_sample is None and (w is None or w.numel() != count or w.dim() > max(1, len(shape))):
        size = obj.batch_size()
        argument_error(
            function,
            "weights",
            f"must hold one number per {'coordinate' if indices else 'entry of a sample'} "
            f"({count}), or a row of them per sample ({size} x {count})",
            weights,
            "Pass a 1-D tensor of that length (or one sample's shape without coordinates), "
            f"or [{size}, {count}] for weights that differ per sample.",
        )
    if per_sample is not None:  # in the objective's vectors, not the request
        return _Selection(indices, None, None, 0)
    assert w is not None
    return _Selection(indices, (w if obj.create_graph else w.detach()).reshape(-1), None, 0)


def _check_real(function: str, name: str, value: Any) -> None:
    """Refuse a complex coefficient (casting it would drop its imaginary part) and a
    boolean one (a mask passed to the wrong argument)."""
    if (isinstance(value, torch.Tensor) and value.is_complex()) or isinstance(value, complex):
        argument_error(function, name, "must be real", value, f"Pass a real {name}.")
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        argument_error(function, name, "must hold numbers, not booleans", value,
                       "Pass a float tensor (a mask of entries is coordinates=).")  # fmt: skip


def _checked_sigma(
    function: str,
    obj: Objective,
    indices: tuple[int, ...] | None,
    count: int,
    weights: Any,
    sigma: Any,
    per_sample: str | None,
) -> _Selection:
    """Checked sigma of ``tr(sigma sigma^T H)``: ``[D, K]`` or ``[B, D, K]``."""
    if weights is not None:
        argument_error(
            function,
            "sigma",
            "cannot be combined with weights (sigma sigma^T already weighs the entries)",
            "sigma and weights",
            "Pass one of them: weights w >= 0 are sigma = diag(sqrt(w)).",
        )
    x = obj.xs[obj.argnums[0]] if obj.argnums else obj.xs[0]
    size = obj.batch_size()
    _check_real(function, "sigma", sigma)
    try:
        given = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    except (TypeError, ValueError, RuntimeError, NotImplementedError):
        given = None
    what = "coordinate" if indices else "entry of a sample"
    expected = (count,) if per_sample is None else (size, count)
    if given is None or given.dim() != len(expected) + 1 or tuple(given.shape[:-1]) != expected:
        argument_error(
            function,
            "sigma",
            f"must be a real matrix [D, K] with one row per {what} (D = {count}), the same "
            f"for every sample, or [B, D, K] with one per sample (B = {size})",
            sigma,
            f"Pass sigma of shape [{count}, K] or [{size}, {count}, K]: "
            "tr(sigma sigma^T H) sums d_k^T H d_k over its columns d_k.",
        )
    assert given is not None
    rank = given.shape[-1]
    if rank == 0:
        argument_error(function, "sigma", "must have at least one column", sigma,
                       "Pass sigma of shape [D, K] with K >= 1.")  # fmt: skip
    if per_sample is not None:  # in the objective's vectors, not the request
        return _Selection(indices, None, None, rank)
    return _Selection(indices, None, given if obj.create_graph else given.detach(), rank)


def _eigen_request(request: Request, k: Any, iterations: Any) -> Request:
    """The request of `per_sample_hessian_eigvalsh`: `k` checked against the dimension,
    the Lanczos iterations defaulted (``max(2 k, k + 20)``) and capped at it."""
    if request.out_numel != 1:
        _refuse_non_scalar(request)
    n = request.in_numel
    _check_k(request.function, k, n)
    steps = min(n, max(2 * k, k + 20) if iterations is None else iterations)
    return dataclasses.replace(request, num_samples=steps, k=k)


def _ggn_split(function: str, obj: Objective, first: FirstForward) -> int:
    """The entries of one sample's module output, where a Gauss-Newton matrix splits the
    objective (module | loss); the splits it cannot make are refused with the fix."""
    if obj.loss is None:
        argument_error(
            function,
            "loss",
            "is required: the Gauss-Newton matrix J^T H J splits the objective into the "
            "module's output (J) and a loss of it (H)",
            None,
            "Pass loss= (e.g. torch.nn.functional.cross_entropy) and targets=.",
        )
    if obj.output is not None:
        argument_error(
            function,
            "output",
            "must be None: the loss takes the module's whole output",
            obj.output,
            "Leave output unset (select inside the loss if needed).",
        )
    if obj.loss is F.nll_loss or isinstance(obj.loss, nn.NLLLoss):
        argument_error(
            function,
            "loss",
            "is linear in the module's output (NLL of log-probabilities), so the "
            "Gauss-Newton matrix of that split is zero",
            obj.loss,
            "Move the final log_softmax into the loss: return logits and pass "
            "loss=torch.nn.functional.cross_entropy (the same objective, a PSD curvature).",
        )
    if not first.model_numel:
        argument_error(
            function,
            "module",
            "must return one tensor with the batch dim first (the loss's input)",
            obj.module,
            "Wrap the module so that its forward returns the tensor the loss takes.",
        )
    return first.model_numel


def _check_k(function: str, k: Any, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        argument_error(
            function,
            "k",
            f"must be an int from 1 to the {n} differentiated entries of a sample",
            k,
            f"Pass k between 1 and {n}.",
        )


def _refuse_non_scalar(request: Request) -> None:
    argument_error(
        request.function,
        "output",
        f"must select an objective with one entry per sample for a Hessian-vector "
        f"product; the selected output has shape {request.out_shape}",
        request.objective.output,
        "Select one entry (output=0 for a (B, 1) or (B, C) output), or pass a scalar "
        "loss= with targets=.",
    )


def _decide(
    request: Request,
    template: _Template,
    batch_chunk: Any,
    axis_chunks: tuple[Any, ...],
    memory_budget: Any,
    planning_budget: int | None,
    again: Callable[[], _Call] | None = None,
) -> _Call:
    """The chunk sizes of a prepared call: given, or planned within the budget."""
    function, obj, engine = request.function, request.objective, template.engine
    axes = template.axes
    why_engine, size = template.why, obj.xs[0].shape[0]
    if batch_chunk != "auto":
        decision = template.given
        if decision is None:
            decision = template.given = Decision(
                function,
                engine.name,
                why_engine,
                batch_chunk,
                axis_chunks[: len(axes)],
                axes,
                None,
                None,
                "chunk sizes given",
            )
        return _Call(request, engine, decision, size, template, again)
    axis_chunks = axis_chunks[: len(axes)]
    budget = parse_budget(function, memory_budget, obj.xs[0].device)
    if planning_budget is None:
        planning_budget = budget
    looped = False
    try:
        chosen = _plan(request, engine, axes, size, planning_budget)
    except MemoryBudgetError as error:
        if planning_budget == budget:
            raise
        # Say which budget the user gave, and what torch's set-up left of it.
        given = f"memory_budget of {format_bytes(budget)}"
        left = f"{given} ({format_bytes(planning_budget)} of it left after torch's one-time "
        raise MemoryBudgetError(
            str(error).replace(
                f"memory_budget of {format_bytes(planning_budget)}",
                left + "set-up, which this call paid; see torchcurv.initialize)",
                1,
            )
        ) from None
    except Exception as error:
        if "called a random operation" in str(error) and request.randomness == "error":
            raise TorchcurvError(random_error(label(function, obj.module))) from None
        reason = unbatchable(error)
        if reason is None:
            raise
        warnings.warn(
            f"{label(function, obj.module)}: vmap cannot batch an operator ({reason}); "
            "falling back to a loop over samples.",
            TorchcurvFallbackWarning,
            stacklevel=4,
        )
        looped = True
        chosen = _plan(request, engine, axes, size, planning_budget, looped=True)
    decision = Decision(
        function,
        engine.name,
        why_engine,
        chosen.batch,
        chosen.axes,
        axes,
        chosen.predicted_peak,
        budget,
        chosen.reason,
        looped,
    )
    logger.debug("%s", decision)
    return _Call(request, engine, decision, size, template, again)


# What a repeated call's failure says when its forward now writes what its first forward
# did not (a Python flag flipped since): the call is prepared anew and run again.
_STALE = ("writes in place", "leaf variable that requires grad is being used in an in-place")


def _run(call: _Call) -> Any:
    if call.again is None:
        return _run_prepared(call)
    try:
        return _run_prepared(call)
    except (TorchcurvError, RuntimeError) as error:
        if not any(s in str(error).lower() for s in _STALE):
            raise
    return _run_prepared(call.again())


def _run_prepared(call: _Call) -> Any:
    request, decision = call.request, call.decision
    obj = request.objective
    if call.template is not None:
        work = call.template.work(decision.basis_chunks)
    else:
        work = call.engine.work(request, decision.basis_chunks)
    args = obj.args()
    if (
        call.size
        and (decision.batch_chunk is None or decision.batch_chunk >= call.size)
        and not decision.looped
        and request.randomness == "error"
        and not obj.inputs_written  # the inputs are copies: compact, as the runner makes them
    ):
        # The whole batch at once, without the runner's slicing; a failure (out of
        # memory, an operator vmap cannot batch, an error to report) goes to the runner,
        # which handles it.
        try:
            with DERIVATIVE_LOCK:
                return work.batched(*args)
        except Exception:
            pass
    return run_batches(
        label(request.function, obj.module),
        work,
        args,
        in_dims=obj.in_dims(),
        out_dims=0,
        randomness=request.randomness,
        chunk=decision.batch_chunk,
        looped=decision.looped,
    )


# --------------------------------------------------------------------------------------
# planning from measurements
# --------------------------------------------------------------------------------------

# Fitted memory models per module and request signature (weakly keyed by the module).
_MODELS: weakref.WeakKeyDictionary[nn.Module, dict[Any, Any]] = weakref.WeakKeyDictionary()


def _less(request: Request) -> str:
    """What of the function's own options asks for a smaller result, as advice."""
    less = []
    if request.objective.wrt != "inputs":
        less.append("a few parameters with params=")
    if request.quantity not in GGN_QUANTITIES and request.out_numel > 1:
        less.append("one output with output=")
    diagonal = {"hessian": "per_sample_hessian_diag", "ggn": "per_sample_ggn_diag"}
    if request.quantity in diagonal:
        less.append(f"the diagonal: torchcurv.{diagonal[request.quantity]}")
    return f", or ask for less ({', '.join(less)})" if less else ""


def _plan(
    request: Request,
    engine: Engine,
    axes: tuple[int, ...],
    size: int,
    budget: int,
    *,
    looped: bool = False,
) -> Plan:
    """Chunk sizes within `budget`, from measurements of the engine's real derivative.

    First a quick check that costs three small measurements: if one sample with
    chunks of one, scaled by the basis sizes and the batch (an upper bound), fits the
    budget, the unchunked call on one and on two samples is measured; when the whole
    batch is predicted to fit the budget and the working-set cap, it runs unchunked.
    Otherwise `torchcurv._memory.fit` measures its ladder and `plan` chooses.
    ``looped=True`` plans the loop over samples (one sample at a time, measured as such)
    for modules that vmap cannot batch.
    """
    obj = request.objective
    result_bytes = _result_bytes(request)
    if size * result_bytes > budget:  # refused before anything is measured
        raise MemoryBudgetError(
            f"{request.function}: memory_budget of {format_bytes(budget)} cannot be met: "
            f"the result of all {size} samples alone takes {format_bytes(size * result_bytes)}"
            f" ({format_bytes(result_bytes)} per sample). Pass memory_budget of at least "
            f"{format_bytes(size * result_bytes)} plus room for the computation, fewer "
            f"samples per call{_less(request)}."
        )
    # Measurements depend on the structure, shapes and options, not on the budget: the
    # default budget (a fraction of the memory available now) changes from call to call.
    key = (
        engine.name,
        request.order,
        request.quantity,
        request.randomness,
        axes,
        obj.signature(),
        looped,
    )
    cache = _MODELS.setdefault(obj.module, {})
    # The last plan, for repeated calls: the default budget follows the memory
    # available, so it moves a little from call to call; a plan the budget did not
    # limit holds for every budget that covers its peak.
    last = cache.get((key, "plan"))
    if last is not None and last[0] == size:
        previous: Plan = last[2]
        if last[1] == budget or (not previous.budget_bound and previous.predicted_peak <= budget):
            return dataclasses.replace(previous, budget=budget)
    one_at_a_time = request.randomness == "different" or looped
    batches: list[Batch] = []

    def measure(length: int, chunks: tuple[int, ...]) -> int:
        if not batches:
            batches.append(Batch(request.function, obj.args(), obj.in_dims()))
        work = engine.work(request, chunks)
        return measure_work(work, batches[0], length, chunks, single=looped)[0]

    slack = heap_slack(obj.xs[0].device)
    whole_key = (key, "whole", size)
    if whole_key not in cache and not one_at_a_time:
        cache[whole_key] = _whole(measure, axes, size, result_bytes, budget, slack)
    whole = cache.get(whole_key)
    if whole is not None and whole.predicted_peak <= budget:
        chosen: Plan = dataclasses.replace(whole, budget=budget)
    else:
        if key not in cache or not cache[key].covers(budget):
            cache[key] = fit(
                measure,
                axes,
                max_batch=1 if one_at_a_time else 2,
                result_bytes=result_bytes,
                limit=budget,
            )
        chosen = plan(
            request.function,
            batch=size,
            axes=axes,
            model=cache[key],
            result_bytes=result_bytes,
            budget=budget,
            batch_limit=1 if one_at_a_time else None,
            slack=slack,
        )
    cache[(key, "plan")] = (size, budget, chosen)
    return chosen


def _whole(
    measure: Callable[[int, tuple[int, ...]], int],
    axes: tuple[int, ...],
    size: int,
    result_bytes: int,
    budget: int,
    slack: float,
) -> Plan | None:
    """The unchunked plan when it is measured to fit (see `_plan`), else None."""
    ones = tuple(1 for _ in axes)
    bound = measure(1, ones) * math.prod(axes) * max(size, 1)
    if bound > budget:
        return None  # measuring the unchunked call could itself break the budget
    one = measure(1, axes)
    per_sample = max(measure(2, axes) - one, 0) if size > 1 else one
    live = int((one + (size - 1) * per_sample) * (1 + SAFETY_MARGIN))
    working_set = live - 2 * size * result_bytes
    predicted = live + heap_reserve(max(working_set, 0), budget, slack)
    if predicted > budget or working_set > DEFAULT_WORKING_SET:
        return None
    return Plan(size, axes, predicted, budget, "fits whole", max(working_set, 0), 1)


def _result_bytes(request: Request) -> int:
    """Bytes of one sample's result: ``out x in^order`` entries (``out x in`` for a
    diagonal, ``out`` for a trace)."""
    item = itemsize(request.objective.probe_sample()[0])
    if request.quantity == "eigvalsh":
        return int((request.k or 1) * item)
    power = {"hessian": request.order, "diagonal": 1, "trace": 0, "hvp": 1, "ggn": 2,
             "ggn_diagonal": 1}[request.quantity]  # fmt: skip
    return int(request.out_numel * request.in_numel**power * item)


# --------------------------------------------------------------------------------------
# public module-level transforms
# --------------------------------------------------------------------------------------


def per_sample_hessian(
    module: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    wrt: Wrt = "inputs",
    output: OutputSelection = None,
    targets: torch.Tensor | None = None,
    loss: LossFunction | None = None,
    params: ParamSelection = None,
    kwargs: Mapping[str, Any] | None = None,
    argnums: int | tuple[int, ...] | None = None,
    mode: str = "auto",
    chunk_size: ModuleChunk = "auto",
    memory_budget: int | float | str | None = None,
    randomness: Literal["error", "different", "same"] = "error",
    create_graph: bool = False,
) -> Any:
    """The Hessian of a module's output (or loss) for every sample of a batch.

    Each sample is fed to the module alone, as a batch of one, so samples never mix.
    For a single-sample input ``x`` (``inputs`` is ``[B, *x.shape]``) and a scalar
    objective the result is ``[B, *x.shape, *x.shape]`` with ``wrt="inputs"``; a
    non-scalar selected output ``y`` gives ``[B, *y.shape, *x.shape, *x.shape]``. With
    ``wrt="params"`` the result is a dict of dicts of blocks
    ``H[name_i][name_j]: [B, *p_i.shape, *p_j.shape]`` (names in the order of
    ``named_parameters()``); with ``wrt="both"`` the differentiated pytree is
    ``{"inputs": x, "params": {name: p}}`` and the blocks nest as torch.func nests them,
    row tree outside, column tree inside: ``H["inputs"]["inputs"]``,
    ``H["inputs"]["params"][name]``, ``H["params"][name]["inputs"]`` and
    ``H["params"][name_i]["params"][name_j]``, symmetric as a whole.
    `torchcurv.to_matrix` (``batch_dims=1``) turns any of them into ``[B, N, N]``.

    Args:
        module: The model; never modified (parameters, buffers, training flag).
        inputs: The batch, ``[B, ...]``, or a tuple of such tensors for a forward with
            several positional inputs.
        wrt: ``"inputs"``, ``"params"`` or ``"both"``.
        output: Which output to differentiate, applied to one sample's output with the
            batch dim removed: a class index (``output=2``: the logit of class 2), an
            index tuple, a slice, or a callable ``out -> tensor``. None: all of it.
        targets: One target per sample, with `loss`.
        loss: ``loss(out, target) -> scalar`` (e.g. ``F.cross_entropy``), called on the
            sample's output and target as a batch of one.
        params: Which parameters (``wrt="params"``/``"both"``): names, glob patterns,
            a predicate or a dict; see `torchcurv.functional`.
        kwargs: Keyword arguments for the forward, the same for every sample (not
            batched); per-sample tensors go in `inputs`.
        argnums: Which positional inputs to differentiate (torch.func's name), with
            ``wrt="inputs"``/``"both"``: None (all), an int (one; results are not
            nested) or a tuple. The others (a class index, a per-sample padding mask)
            are passed along per sample, batch dim first, undifferentiated.
        mode: The engine: a `torchcurv.hessian` mode, ``"structured"`` or ``"auto"``
            (default). ``"structured"`` computes input Hessians of ``nn.Sequential``
            stacks of ``Linear`` layers and elementwise activations exactly by Hessian
            backpropagation (``H = sum_l J_l^T diag(sigma_l'' g_l) J_l``, plus the loss
            curvature for ``F.cross_entropy`` / ``F.mse_loss``), without ``n``
            Hessian-vector products; it raises for anything else. ``"auto"``: the
            fastest engine that can compute it, i.e. the structured engine when it
            applies and its cost model predicts it faster, otherwise forward-over-reverse
            with the inner stage chosen by size (reverse unless the output has more
            entries than the input). `torchcurv.explain` shows the choice.
        chunk_size: ``"auto"`` (plan from `memory_budget`: measured on the real
            derivative, preferring fast plans), None (no chunking), an int (samples per
            chunk) or ``(batch, inner, outer)``.
        memory_budget: Bytes or a size such as ``"2GiB"``; the default is a fraction of
            the available memory (see `torchcurv.explain`). The measured peak stays
            within it, or the call raises `MemoryBudgetError` before allocating.
        randomness: ``"error"`` (default), ``"different"`` (each sample its own dropout
            mask, the same for every row of its Hessian and for every chunking under one
            seed) or ``"same"`` (one draw for the whole call).
        create_graph: False (default): detached results, nothing recorded. True: the
            results are differentiable with respect to the module's parameters and to
            inputs that require grad, on every engine (e.g. a loss on a Laplacian).
            Not allowed under `torch.no_grad` / `torch.inference_mode`.

    Returns:
        The per-sample Hessians, batch dim first.

    Raises:
        UnsupportedModuleError: For BatchNorm in training mode or without running
            statistics, dropout in training mode with ``randomness="error"``, or a
            ``mode`` whose engine cannot compute the request.
        MemoryBudgetError: If the budget cannot be met even with chunks of one.
        TorchcurvError: For other bad arguments.

    Example:
        >>> import torch, torchcurv
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> X = torch.randn(5, 3, dtype=torch.float64)
        >>> H = torchcurv.per_sample_hessian(model, X, output=1)
        >>> H.shape
        torch.Size([5, 3, 3])
        >>> W1, b1, w2 = model[0].weight, model[0].bias, model[2].weight[1]
        >>> z = X[0] @ W1.T + b1  # tanh'' = -2 tanh (1 - tanh^2)
        >>> d2 = -2 * torch.tanh(z) * (1 - torch.tanh(z) ** 2)
        >>> torch.allclose(H[0], W1.T @ torch.diag(w2 * d2) @ W1)
        True
    """

    name = "per_sample_hessian"
    with _grad_mode(name, create_graph):
        call = _prepare(
            name,
            module,
            inputs,
            order=2,
            mode=mode,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            randomness=randomness,
            create_graph=create_graph,
            wrt=wrt,
            params=params,
            output=output,
            loss=loss,
            targets=targets,
            kwargs=kwargs,
            argnums=argnums,
        )
        return _run(call)


def per_sample_jacobian(
    module: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    wrt: Wrt = "inputs",
    output: OutputSelection = None,
    targets: torch.Tensor | None = None,
    loss: LossFunction | None = None,
    params: ParamSelection = None,
    kwargs: Mapping[str, Any] | None = None,
    argnums: int | tuple[int, ...] | None = None,
    mode: str = "auto",
    chunk_size: int | Literal["auto"] | tuple[int | None, int | None] | None = "auto",
    memory_budget: int | float | str | None = None,
    randomness: Literal["error", "different", "same"] = "error",
    create_graph: bool = False,
) -> Any:
    """The Jacobian of a module's output (or the gradient of its loss) per sample.

    Same conventions as `per_sample_hessian`: the result for a selected output ``y``
    and ``wrt="inputs"`` is ``[B, *y.shape, *x.shape]``; with ``wrt="params"`` a dict
    ``J[name]: [B, *y.shape, *p.shape]`` (per-sample gradients for a scalar loss).

    Args:
        module: The model; never modified.
        inputs: The batch, ``[B, ...]``, or a tuple of such tensors.
        wrt: ``"inputs"``, ``"params"`` or ``"both"``.
        output: Which output to differentiate (see `per_sample_hessian`).
        targets: One target per sample, with `loss`.
        loss: ``loss(out, target) -> scalar``.
        params: Which parameters, see `torchcurv.functional`.
        kwargs: Keyword arguments for the forward, the same for every sample.
        argnums: Which positional inputs to differentiate (see `per_sample_hessian`).
        mode: ``"rev"``, ``"fwd"`` or ``"auto"``: reverse mode unless the output has
            more entries than the input.
        chunk_size: ``"auto"``, None, an int (samples per chunk) or ``(batch, basis)``.
        memory_budget: Bytes or a size such as ``"2GiB"``.
        randomness: ``"error"``, ``"different"`` or ``"same"``.
        create_graph: As in `per_sample_hessian`: True keeps the results differentiable.

    Returns:
        The per-sample Jacobians, batch dim first.

    Raises:
        UnsupportedModuleError: For BatchNorm in training mode, or dropout in training
            mode with ``randomness="error"``.
        TorchcurvError: For bad arguments.

    Example:
        >>> import torch, torchcurv
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X = torch.randn(4, 3, dtype=torch.float64)
        >>> J = torchcurv.per_sample_jacobian(model, X)
        >>> J.shape
        torch.Size([4, 2, 3])
        >>> torch.equal(J[2], model.weight.detach())
        True
    """

    name = "per_sample_jacobian"
    with _grad_mode(name, create_graph):
        call = _prepare(
            name,
            module,
            inputs,
            order=1,
            mode=mode,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            randomness=randomness,
            create_graph=create_graph,
            wrt=wrt,
            params=params,
            output=output,
            loss=loss,
            targets=targets,
            kwargs=kwargs,
            argnums=argnums,
        )
        return _run(call)


def per_sample_hessian_diag(
    module: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    wrt: Wrt = "inputs",
    output: OutputSelection = None,
    targets: torch.Tensor | None = None,
    loss: LossFunction | None = None,
    params: ParamSelection = None,
    kwargs: Mapping[str, Any] | None = None,
    argnums: int | tuple[int, ...] | None = None,
    method: Literal["exact", "hutchinson"] = "exact",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    mode: str = "auto",
    chunk_size: ModuleChunk = "auto",
    memory_budget: int | float | str | None = None,
    randomness: Literal["error", "different", "same"] = "error",
    create_graph: bool = False,
) -> Any:
    """The diagonal of each sample's Hessian, without forming the Hessian.

    The nesting of `per_sample_hessian` with diagonal leaves: ``[B, *y.shape, *x.shape]``
    with ``wrt="inputs"`` (``*y.shape`` empty for a scalar objective);
    ``{name: [B, *y.shape, *p.shape]}`` with ``wrt="params"``; ``{"inputs": ...,
    "params": {...}}`` with ``wrt="both"``; a tuple for tuple `argnums`. Exact: the
    generic engines push chunks of basis vectors ``e_i`` through the outer stage and keep
    ``e_i^T H e_i`` of each chunk at once, so a call holds ``O(n x chunk)`` numbers per
    sample, never ``n x n``; ``"auto"`` takes the structured engine's full Hessian and
    its diagonal where that applies and is predicted faster. The trace of a parameter
    Hessian is the sum of this diagonal (for input Hessians: `per_sample_laplacian`).

    ``method="hutchinson"`` estimates it instead from `num_samples` Hessian-vector
    products per sample with Rademacher probes ``v`` (the mean of ``v * (H v)``,
    unbiased); sample ``i``'s probes come from a seed keyed by ``(seed, i)``, the seed
    drawn from `generator` (the global generator when None), so they depend on neither
    the chunking nor the batch size, and a seeded generator reproduces them.

    Args:
        module: The model; never modified.
        inputs: The batch, ``[B, ...]``, or a tuple of such tensors.
        wrt: ``"inputs"``, ``"params"`` or ``"both"``.
        output: Which output (see `per_sample_hessian`).
        targets: One target per sample, with `loss`.
        loss: ``loss(out, target) -> scalar``.
        params: Which parameters, see `torchcurv.functional`.
        kwargs: Keyword arguments for the forward, the same for every sample.
        argnums: Which positional inputs to differentiate (see `per_sample_hessian`).
        method: ``"exact"`` or ``"hutchinson"`` (an unbiased estimate).
        num_samples: Probes (Hessian-vector products) per sample, for the estimate.
        generator: A CPU `torch.Generator` the estimate's seed is drawn from.
        mode: A `torchcurv.hessian` mode, ``"structured"``, ``"taylor"`` (input
            diagonals: one forward of jets, see `per_sample_laplacian`) or ``"auto"``
            (as in `per_sample_hessian`).
        chunk_size: ``"auto"``, None, an int (samples per chunk) or ``(batch, inner,
            outer)``; the outer axis runs over the input's ``n`` basis vectors.
        memory_budget: Bytes or a size such as ``"2GiB"``.
        randomness: ``"error"``, ``"different"`` or ``"same"``.
        create_graph: As in `per_sample_hessian`: True keeps the results differentiable.

    Returns:
        The per-sample Hessian diagonals, batch dim first.

    Raises:
        UnsupportedModuleError: As `per_sample_hessian`.
        MemoryBudgetError: If the budget cannot be met even with chunks of one.
        TorchcurvError: For bad arguments.

    Example:
        Output ``i`` of ``x * x * [0, 1, 2, 3]`` has the Hessian ``2 i e_i e_i^T``:

        >>> import torch, torchcurv
        >>> class Quadratic(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * x * torch.arange(4, dtype=x.dtype)
        >>> X = torch.randn(2, 4, dtype=torch.float64)
        >>> d = torchcurv.per_sample_hessian_diag(Quadratic(), X)
        >>> d.shape
        torch.Size([2, 4, 4])
        >>> torch.equal(d[0], torch.diag(2.0 * torch.arange(4, dtype=torch.float64)))
        True
    """
    name = "per_sample_hessian_diag"
    with _grad_mode(name, create_graph):
        call = _prepare(
            name,
            module,
            inputs,
            order=2,
            mode=mode,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            randomness=randomness,
            create_graph=create_graph,
            quantity="diagonal",
            method=method,
            num_samples=num_samples,
            generator=generator,
            wrt=wrt,
            params=params,
            output=output,
            loss=loss,
            targets=targets,
            kwargs=kwargs,
            argnums=argnums,
        )
        return _run(call)


def per_sample_ggn(
    module: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    loss: LossFunction,
    targets: torch.Tensor,
    wrt: Wrt = "params",
    params: ParamSelection = None,
    kwargs: Mapping[str, Any] | None = None,
    argnums: int | tuple[int, ...] | None = None,
    mode: str = "auto",
    chunk_size: ModuleChunk = "auto",
    memory_budget: int | float | str | None = None,
    randomness: Literal["error", "different", "same"] = "error",
    create_graph: bool = False,
    method: Literal["exact", "mc"] = "exact",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Any:
    """The generalized Gauss-Newton matrix of each sample's loss.

    ``G = J^T H J``, with ``J`` the Jacobian of the module's output ``z`` for the sample
    (with respect to what `wrt` selects) and ``H`` the Hessian of ``loss(z, target)``
    with respect to ``z``: the Hessian of the loss without the terms of the module's
    own second derivatives. Positive semi-definite for convex losses (cross-entropy:
    ``H = diag(p) - p p^T``; MSE: a multiple of the identity); for a user's loss ``H``
    is its exact Hessian (by autograd, in `mode`), indefinite where the loss is not
    convex. Computed from one forward per sample and ``C`` vector-Jacobian products
    (``C`` = the entries of the module output), never ``P`` Hessian-vector products:
    it holds ``J`` (``C x P`` numbers per sample) and the result.

    The nesting of `per_sample_hessian`: ``{name_i: {name_j: [B, *p_i, *p_j]}}`` with
    ``wrt="params"`` (the default), ``[B, *x, *x]`` with ``wrt="inputs"``, and the nested
    blocks of ``wrt="both"``. The loss is of one sample, as a batch of one
    (``reduction="mean"`` divides by one).

    Args:
        module: The model; never modified. Its forward returns the loss's input (logits
            for cross-entropy: an NLL loss after a final ``log_softmax`` is linear in the
            module's output, so its Gauss-Newton matrix is zero; ``F.nll_loss`` and
            ``nn.NLLLoss`` are refused, a function wrapping them is not recognised).
        inputs: The batch, ``[B, ...]``, or a tuple of such tensors.
        loss: ``loss(out, target) -> scalar`` (e.g. ``F.cross_entropy``, ``F.mse_loss``).
        targets: One target per sample.
        wrt: ``"params"`` (default), ``"inputs"`` or ``"both"``.
        params: Which parameters, see `torchcurv.functional`.
        kwargs: Keyword arguments for the forward, the same for every sample.
        argnums: Which positional inputs to differentiate (see `per_sample_hessian`).
        mode: ``"auto"``, ``"structured"`` (diagonals of parameters, by backpropagation
            over the traced graph) or a `torchcurv.hessian` mode: the generic engine
            (per-sample vector-Jacobian products, ``[C, P]``), the loss Hessian taken in
            that mode.
        chunk_size: ``"auto"``, None, an int (samples per chunk) or ``(batch, outputs)``:
            the second axis runs over the module output's ``C`` entries (the
            vector-Jacobian products).
        memory_budget: Bytes or a size such as ``"2GiB"``.
        randomness: ``"error"``, ``"different"`` or ``"same"``.
        create_graph: True keeps the results differentiable.
        method: ``"exact"``, or ``"mc"``: the Monte-Carlo estimate
            ``(1 / S) sum_s (J^T g_s)(J^T g_s)^T`` from `num_samples` rows ``g_s`` of the
            model's predictive distribution (cross-entropy: ``p - e_y`` with a label
            ``y ~ softmax(z)`` per position; MSE: Gaussian ``g`` scaled to the loss
            Hessian), unbiased, positive semi-definite, of rank at most ``S``, and
            ``S`` vector-Jacobian products instead of ``C``; ``F.cross_entropy``,
            ``nn.CrossEntropyLoss`` (without class weights), ``F.mse_loss`` and
            ``nn.MSELoss`` only.
        num_samples: The sampled rows per sample, with ``method="mc"``.
        generator: A CPU `torch.Generator` for the samples (None: the global one);
            each sample's draws come from its own seed, whatever the chunking.

    Returns:
        The per-sample Gauss-Newton matrices, batch dim first.

    Raises:
        MemoryBudgetError: If the budget cannot be met even with chunks of one.
        TorchcurvError: For bad arguments (no loss, an NLL loss, an output selection).

    Example:
        For a linear model and the mean squared error over ``C`` outputs the loss
        Hessian is ``(2 / C) I``, so the input Gauss-Newton matrix is ``(2 / C) W^T W``:

        >>> import torch, torchcurv
        >>> import torch.nn.functional as F
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, Y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
        >>> G = torchcurv.per_sample_ggn(model, X, loss=F.mse_loss, targets=Y, wrt="inputs")
        >>> G.shape
        torch.Size([4, 3, 3])
        >>> W = model.weight.detach()
        >>> torch.allclose(G[0], W.T @ W)  # 2 / C = 1
        True
    """
    return _ggn(
        "per_sample_ggn", "ggn", module, inputs, loss=loss, targets=targets, wrt=wrt,
        params=params, kwargs=kwargs, argnums=argnums, mode=mode, chunk_size=chunk_size,
        memory_budget=memory_budget, randomness=randomness, create_graph=create_graph,
        method=method, num_samples=num_samples, generator=generator,
    )  # fmt: skip


def per_sample_ggn_diag(
    module: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    loss: LossFunction,
    targets: torch.Tensor,
    wrt: Wrt = "params",
    params: ParamSelection = None,
    kwargs: Mapping[str, Any] | None = None,
    argnums: int | tuple[int, ...] | None = None,
    mode: str = "auto",
    chunk_size: ModuleChunk = "auto",
    memory_budget: int | float | str | None = None,
    randomness: Literal["error", "different", "same"] = "error",
    create_graph: bool = False,
    method: Literal["exact", "mc"] = "exact",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Any:
    """The diagonal of each sample's generalized Gauss-Newton matrix, without forming it.

    The diagonal of `per_sample_ggn`'s ``G = J^T H J``: ``sum_c J_c * (H J)_c`` from one
    forward and ``C`` vector-Jacobian products per sample, ``O(C x P)`` numbers, never
    ``P x P`` (the curvature of pruning scores and diagonal Laplace approximations). The
    nesting of `per_sample_hessian_diag`: ``{name: [B, *p.shape]}`` with
    ``wrt="params"`` (the default), ``[B, *x.shape]`` with ``wrt="inputs"``. Its sum
    over the entries is the trace of the Gauss-Newton matrix.

    Args:
        module: The model; never modified (its forward returns the loss's input).
        inputs: The batch, ``[B, ...]``, or a tuple of such tensors.
        loss: ``loss(out, target) -> scalar`` (e.g. ``F.cross_entropy``, ``F.mse_loss``).
        targets: One target per sample.
        wrt: ``"params"`` (default), ``"inputs"`` or ``"both"``.
        params: Which parameters, see `torchcurv.functional`.
        kwargs: Keyword arguments for the forward, the same for every sample.
        argnums: Which positional inputs to differentiate (see `per_sample_hessian`).
        mode: ``"auto"``, ``"structured"`` (diagonals of parameters, by backpropagation
            over the traced graph) or a `torchcurv.hessian` mode: the generic engine
            (per-sample vector-Jacobian products, ``[C, P]``), the loss Hessian taken in
            that mode.
        chunk_size: ``"auto"``, None, an int (samples per chunk) or ``(batch, outputs)``.
        memory_budget: Bytes or a size such as ``"2GiB"``.
        randomness: ``"error"``, ``"different"`` or ``"same"``.
        create_graph: True keeps the results differentiable.
        method: ``"exact"``, or ``"mc"``: the diagonal of `per_sample_ggn`'s
            Monte-Carlo estimate (the same losses), from `num_samples` sampled rows.
        num_samples: The sampled rows per sample, with ``method="mc"``.
        generator: A CPU `torch.Generator` for the samples (None: the global one).

    Returns:
        The per-sample Gauss-Newton diagonals, batch dim first.

    Raises:
        MemoryBudgetError: If the budget cannot be met even with chunks of one.
        TorchcurvError: For bad arguments, as `per_sample_ggn`.

    Example:
        A linear model under the mean squared error over ``C`` outputs: the weight
        ``W[i, j]`` moves output ``i`` by ``x_j``, so its diagonal entry is
        ``(2 / C) x_j^2``, the bias's ``2 / C``:

        >>> import torch, torchcurv
        >>> import torch.nn.functional as F
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, Y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
        >>> d = torchcurv.per_sample_ggn_diag(model, X, loss=F.mse_loss, targets=Y)
        >>> d["weight"].shape
        torch.Size([4, 2, 3])
        >>> torch.allclose(d["weight"], (X**2)[:, None, :].expand(4, 2, 3))  # 2 / C = 1
        True
        >>> torch.allclose(d["bias"], torch.ones(4, 2, dtype=torch.float64))
        True
    """
    return _ggn(
        "per_sample_ggn_diag", "ggn_diagonal", module, inputs, loss=loss, targets=targets,
        wrt=wrt, params=params, kwargs=kwargs, argnums=argnums, mode=mode,
        chunk_size=chunk_size, memory_budget=memory_budget, randomness=randomness,
        create_graph=create_graph, method=method, num_samples=num_samples, generator=generator,
    )  # fmt: skip


def _ggn(
    name: str,
    quantity: str,
    module: nn.Module,
    inputs: Any,
    *,
    mode: str,
    chunk_size: Any,
    memory_budget: Any,
    randomness: Any,
    create_graph: bool,
    **what: Any,
) -> Any:
    with _grad_mode(name, create_graph):
        call = _prepare(
            name,
            module,
            inputs,
            order=2,
            mode=mode,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            randomness=randomness,
            create_graph=create_graph,
            quantity=quantity,
            output=None,
            **what,
        )
        return _run(call)


HVP_MODES = ("auto", "fwd-over-rev", "rev-over-rev", "rev-over-fwd")


def per_sample_hvp(
    module: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    vectors: Any,
    *,
    wrt: Wrt = "inputs",
    output: OutputSelection = None,
    targets: torch.Tensor | None = None,
    loss: LossFunction | None = None,
    params: ParamSelection = None,
    kwargs: Mapping[str, Any] | None = None,
    argnums: int | tuple[int, ...] | None = None,
    mode: str = "auto",
    chunk_size: int | Literal["auto"] | tuple[int | None] | None = "auto",
    memory_budget: int | float | str | None = None,
    randomness: Literal["error", "different", "same"] = "error",
    create_graph: bool = False,
) -> Any:
    """Each sample's Hessian times its own vector, without forming the Hessian.

    For an objective with one entry per sample (``output=`` selecting one entry, or a
    scalar ``loss=``), sample ``i`` gets ``H_i v_i``: one Hessian-vector product, at the
    cost of a few gradients, whatever the number of parameters. `vectors` has the
    structure of what is differentiated, batch dim first: ``[B, *x.shape]`` with
    ``wrt="inputs"``, ``{name: [B, *p.shape]}`` with ``wrt="params"``,
    ``{"inputs": ..., "params": {...}}`` with ``wrt="both"``, a tuple for tuple
    `argnums`; the result has the same structure and shapes.

    Args:
        module: The model; never modified.
        inputs: The batch, ``[B, ...]``, or a tuple of such tensors.
        vectors: One vector per sample, shaped as described above (dtype and device of
            what it multiplies).
        wrt: ``"inputs"``, ``"params"`` or ``"both"``.
        output: Which output (see `per_sample_hessian`); it must select one entry.
        targets: One target per sample, with `loss`.
        loss: ``loss(out, target) -> scalar``.
        params: Which parameters, see `torchcurv.functional`.
        kwargs: Keyword arguments for the forward, the same for every sample.
        argnums: Which positional inputs to differentiate (see `per_sample_hessian`).
        mode: ``"fwd-over-rev"`` (the JVP of the gradient), ``"rev-over-rev"`` (the VJP
            of the gradient, for modules without forward-mode rules), ``"rev-over-fwd"``
            (the gradient of the directional derivative) or ``"auto"`` (forward over
            reverse when the module has the rules, else reverse over reverse).
        chunk_size: ``"auto"``, None, an int or ``(batch,)``: samples per vectorised
            call (a product has no basis to chunk).
        memory_budget: Bytes or a size such as ``"2GiB"``.
        randomness: ``"error"``, ``"different"`` or ``"same"``.
        create_graph: As in `per_sample_hessian`: True keeps the results differentiable
            (with respect to the parameters, inputs and vectors that require grad).

    Returns:
        The per-sample products, shaped like `vectors`.

    Raises:
        UnsupportedModuleError: As `per_sample_hessian`.
        MemoryBudgetError: If the budget cannot be met even with one sample at a time.
        TorchcurvError: For bad arguments: an objective with more than one entry,
            vectors of the wrong structure, shape, batch size, dtype or device.

    Example:
        ``f(x) = sum(a * x**3) / 6`` has the Hessian ``diag(a * x)``:

        >>> import torch, torchcurv
        >>> class Cubic(torch.nn.Module):
        ...     def forward(self, x):
        ...         return (torch.arange(1.0, 4.0, dtype=x.dtype) * x**3).sum(-1) / 6
        >>> X = torch.randn(5, 3, dtype=torch.float64)
        >>> V = torch.randn(5, 3, dtype=torch.float64)
        >>> HV = torchcurv.per_sample_hvp(Cubic(), X, V)
        >>> torch.allclose(HV, torch.arange(1.0, 4.0, dtype=torch.float64) * X * V)
        True
    """
    name = "per_sample_hvp"
    check_mode(name, mode, HVP_MODES)
    if vectors is None:
        argument_error(
            name,
            "vectors",
            "is required",
            vectors,
            "Pass one vector per sample, shaped like what is differentiated, batch first.",
        )
    with _grad_mode(name, create_graph):
        call = _prepare(
            name,
            module,
            inputs,
            order=2,
            mode=mode,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            randomness=randomness,
            create_graph=create_graph,
            quantity="hvp",
            wrt=wrt,
            params=params,
            output=output,
            loss=loss,
            targets=targets,
            kwargs=kwargs,
            argnums=argnums,
            vectors=vectors,
        )
        return _run(call)


def per_sample_laplacian(
    module: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    output: OutputSelection = None,
    targets: torch.Tensor | None = None,
    loss: LossFunction | None = None,
    kwargs: Mapping[str, Any] | None = None,
    argnums: int | tuple[int, ...] | None = None,
    coordinates: Sequence[int] | torch.Tensor | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    sigma: torch.Tensor | None = None,
    method: Literal["exact", "hutchinson", "hutch++"] = "exact",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    mode: str = "auto",
    chunk_size: ModuleChunk = "auto",
    memory_budget: int | float | str | None = None,
    randomness: Literal["error", "different", "same"] = "error",
    create_graph: bool = False,
) -> Any:
    """The Laplacian of each sample's output: the trace of its input Hessian.

    ``[B]`` for a scalar objective, ``[B, *y.shape]`` otherwise (a ``Linear(., 1)``
    head without ``output=0`` gives ``[B, 1]``, as `per_sample_hessian` gives
    ``[B, 1, n, n]`` there). With several differentiated inputs (tuple `argnums`) the
    trace runs over all of their entries. Exact, computed as
    `per_sample_hessian_diag` is (each chunk of basis vectors reduced at once), summed.
    `coordinates` restricts the sum to some entries (the spatial ones of a PINN's
    ``(t, x, y)``, not time), and only their basis vectors are computed; `weights` gives
    the weighted sum ``sum_i w_i d^2 y / d x_i^2`` (an anisotropic diffusion), the same
    for every sample or a row per sample. `sigma` (``[D, K]``, or ``[B, D, K]`` per
    sample) gives ``tr(sigma sigma^T H) = sum_k d_k^T H d_k`` over its columns ``d_k``
    instead: the second-order term of a Fokker-Planck or Kolmogorov operator with
    diffusion ``sigma sigma^T``; ``K`` directions are pushed through, not ``D``.

    ``method="hutchinson"`` estimates it from `num_samples` Hessian-vector products per
    sample with Rademacher probes ``v`` (the mean of ``(w * v) . (H v)``, unbiased; with
    `coordinates` the probes are zero elsewhere; with `sigma`, ``v = sigma z`` for
    Rademacher ``z`` of ``K`` entries); ``method="hutch++"`` (one-entry
    objectives) spends a third of them sketching the Hessian's range, whose trace it
    takes exactly, a third on that, and a third on Hutchinson for the rest: a lower
    variance when the spectrum decays. Probes are seeded per sample as in
    `per_sample_hessian_diag`. Without `weights` (with or without `sigma`), Taylor mode
    (``mode="taylor"``, or ``"auto"`` where it is predicted faster) takes the Hutchinson
    estimate as ``v^T H v`` per probe from one forward of jets, the same probes from the
    same seeds: the same estimate to rounding.

    Args:
        module: The model; never modified.
        inputs: The batch, ``[B, ...]``, or a tuple of such tensors.
        output: Which output (see `per_sample_hessian`).
        targets: One target per sample, with `loss`.
        loss: ``loss(out, target) -> scalar``.
        kwargs: Keyword arguments for the forward, the same for every sample.
        argnums: Which positional inputs to differentiate (see `per_sample_hessian`).
        coordinates: The entries the sum runs over: flat indices into one sample's
            differentiated entries (in order, over all of them with tuple `argnums`), or
            a boolean mask of one sample's shape. None: all.
        weights: One weight per coordinate, ``[D]``, the same for every sample, or a
            row of them per sample, ``[B, D]``; without coordinates ``D`` is every
            entry of a sample, flat or in the sample's shape (``[B, *x.shape[1:]]``
            per sample). Converted to the input's dtype and device; not broadcast
            (``[1, D]`` with ``B > 1`` is refused).
        sigma: The coefficient matrix of ``tr(sigma sigma^T H)``, one row per
            coordinate (per entry of a sample, flat, without coordinates): ``[D, K]``,
            the same for every sample, or ``[B, D, K]``. Converted like `weights`; not
            with them.
        method: ``"exact"``, ``"hutchinson"`` or ``"hutch++"``.
        num_samples: Hessian-vector products per sample, for the estimates (Hutch++
            uses ``num_samples // 3`` for each of its three parts).
        generator: A CPU `torch.Generator` the estimate's seed is drawn from.
        mode: A `torchcurv.hessian` mode, ``"structured"`` (``nn.Sequential`` MLPs:
            the input Hessian by backpropagation, then its trace), ``"taylor"`` (one
            forward of jets: the value, its derivatives along the coordinates and their
            collapsed second-order term, for models whose ops it has rules for) or
            ``"auto"``.
        chunk_size: ``"auto"``, None, an int (samples per chunk) or ``(batch, inner,
            outer)``.
        memory_budget: Bytes or a size such as ``"2GiB"``.
        randomness: ``"error"``, ``"different"`` or ``"same"``.
        create_graph: True keeps the results differentiable (a PINN loss on the
            Laplacian trains the module's parameters). The gradient of an estimate is
            that of the estimate itself for Hutchinson (probes fixed), and for Hutch++
            the derivative with the sketched basis held fixed: an unbiased estimate of
            the Laplacian's gradient as well.

    Returns:
        The per-sample Laplacians, batch dim first.

    Raises:
        UnsupportedModuleError: As `per_sample_hessian`.
        MemoryBudgetError: If the budget cannot be met even with chunks of one.
        TorchcurvError: For bad arguments.

    Example:
        Output ``i`` of ``x * x * [0, 1, 2, 3]`` has the Laplacian ``2 i``:

        >>> import torch, torchcurv
        >>> class Quadratic(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * x * torch.arange(4, dtype=x.dtype)
        >>> X = torch.randn(3, 4, dtype=torch.float64)
        >>> torchcurv.per_sample_laplacian(Quadratic(), X)[0]
        tensor([0., 2., 4., 6.], dtype=torch.float64)
        >>> torchcurv.per_sample_laplacian(Quadratic(), X, coordinates=[1, 3],
        ...                                weights=[10.0, 1.0])[0]  # 10 * 2 e_1 + 6 e_3
        tensor([ 0., 20.,  0.,  6.], dtype=torch.float64)
    """
    name = "per_sample_laplacian"
    with _grad_mode(name, create_graph):
        call = _prepare(
            name,
            module,
            inputs,
            order=2,
            mode=mode,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            randomness=randomness,
            create_graph=create_graph,
            quantity="trace",
            coordinates=coordinates,
            weights=weights,
            sigma=sigma,
            method=method,
            num_samples=num_samples,
            generator=generator,
            wrt="inputs",
            params=None,
            output=output,
            loss=loss,
            targets=targets,
            kwargs=kwargs,
            argnums=argnums,
        )
        return _run(call)


def per_sample_hessian_eigvalsh(
    module: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    k: int,
    wrt: Wrt = "inputs",
    output: OutputSelection = None,
    targets: torch.Tensor | None = None,
    loss: LossFunction | None = None,
    params: ParamSelection = None,
    kwargs: Mapping[str, Any] | None = None,
    argnums: int | tuple[int, ...] | None = None,
    method: Literal["lanczos", "dense"] = "lanczos",
    num_iterations: int | None = None,
    generator: torch.Generator | None = None,
    mode: str = "auto",
    chunk_size: Any = "auto",
    memory_budget: int | float | str | None = None,
    randomness: Literal["error", "different", "same"] = "error",
    create_graph: bool = False,
) -> torch.Tensor:
    """The `k` algebraically largest eigenvalues of each sample's Hessian, ``[B, k]``.

    For an objective with one entry per sample (``output=`` selecting one entry, or a
    scalar ``loss=``), ascending as `torch.linalg.eigvalsh` returns them, over all the
    differentiated entries (``wrt="params"``: the whole parameter Hessian, its blocks
    joined as `torchcurv.to_matrix` joins them).

    ``method="lanczos"`` (default) never forms the Hessian: `num_iterations` steps of
    Lanczos with full reorthogonalization per sample (default ``max(2 k, k + 20)``,
    capped at the dimension ``n``, where the values are exact up to rounding), one
    Hessian-vector product each, from a Gaussian start vector seeded per sample as the
    estimators' probes are (`generator`; a breakdown, when the Krylov space is
    exhausted, restarts from the next seeded vector). The values returned are the
    Rayleigh quotients of the Ritz vectors. Fewer iterations than ``n`` give the largest
    eigenvalues approximately (they converge first, fastest when well separated).
    ``method="dense"`` forms each sample's Hessian (`per_sample_hessian`, planned and
    chunked as usual, memory ``O(n^2)`` per sample) and calls `torch.linalg.eigvalsh`.

    With ``create_graph=True`` the gradient of an eigenvalue is ``v^T (dH) v`` with its
    eigenvector ``v`` held fixed (the Ritz vector for Lanczos); it is undefined where
    eigenvalues repeat.

    Args:
        module: The model; never modified.
        inputs: The batch, ``[B, ...]``, or a tuple of such tensors.
        k: How many eigenvalues, from 1 to ``n``.
        wrt: ``"inputs"``, ``"params"`` or ``"both"``.
        output: Which output (see `per_sample_hessian`); it must select one entry.
        targets: One target per sample, with `loss`.
        loss: ``loss(out, target) -> scalar``.
        params: Which parameters, see `torchcurv.functional`.
        kwargs: Keyword arguments for the forward, the same for every sample.
        argnums: Which positional inputs to differentiate (see `per_sample_hessian`).
        method: ``"lanczos"`` or ``"dense"``.
        num_iterations: Lanczos steps per sample (products with the Hessian).
        generator: A CPU `torch.Generator` the start vectors' seed is drawn from.
        mode: For Lanczos, a `per_sample_hvp` mode; for dense, a `per_sample_hessian`
            mode.
        chunk_size: ``"auto"``, None or an int (samples per chunk); dense also takes
            `per_sample_hessian`'s tuples.
        memory_budget: Bytes or a size such as ``"2GiB"``.
        randomness: ``"error"``, ``"different"`` or ``"same"``.
        create_graph: True keeps the eigenvalues differentiable.

    Returns:
        ``[B, k]``: each sample's `k` largest eigenvalues, ascending.

    Raises:
        UnsupportedModuleError: As `per_sample_hessian`.
        MemoryBudgetError: If the budget cannot be met.
        TorchcurvError: For bad arguments: an objective with more than one entry, `k`
            out of range, `num_iterations` with the dense method.

    Example:
        ``sum(a * x**3) / 6`` has the Hessian ``diag(a * x)``:

        >>> import torch, torchcurv
        >>> class Cubic(torch.nn.Module):
        ...     def forward(self, x):
        ...         return (torch.arange(1.0, 5.0, dtype=x.dtype) * x**3).sum(-1) / 6
        >>> X = torch.randn(3, 4, dtype=torch.float64)
        >>> top = torchcurv.per_sample_hessian_eigvalsh(Cubic(), X, k=2)
        >>> exact = (torch.arange(1.0, 5.0, dtype=torch.float64) * X).sort(-1).values[:, -2:]
        >>> torch.allclose(top, exact)
        True
    """
    name = "per_sample_hessian_eigvalsh"
    what: dict[str, Any] = {"wrt": wrt, "output": output, "targets": targets, "loss": loss,
                            "params": params, "kwargs": kwargs, "argnums": argnums}  # fmt: skip
    if method == "dense":
        if num_iterations is not None or generator is not None:
            argument_error(
                name,
                "num_iterations" if num_iterations is not None else "generator",
                "applies to method='lanczos' only",
                num_iterations if num_iterations is not None else generator,
                "Drop it, or pass method='lanczos'.",
            )
        H = per_sample_hessian(
            module, inputs, mode=mode, chunk_size=chunk_size, memory_budget=memory_budget,
            randomness=randomness, create_graph=create_graph, **what,
        )  # fmt: skip
        matrix = to_matrix(H, batch_dims=1)
        entries = sum(t.numel() for t in tree_flatten(H)[0])
        if matrix.shape[-1] != matrix.shape[-2] or entries != matrix.numel():
            argument_error(
                name,
                "output",
                "must select an objective with one entry per sample for eigenvalues",
                output,
                "Select one entry (output=0), or pass a scalar loss= with targets=.",
            )
        _check_k(name, k, matrix.shape[-1])
        symmetric = (matrix + matrix.transpose(-2, -1)) / 2
        values: torch.Tensor = torch.linalg.eigvalsh(symmetric)[..., -k:]
        return values
    if method != "lanczos":
        argument_error(
            name, "method", "must be 'lanczos' or 'dense'", method,
            "Pass method='lanczos' (no Hessian formed) or 'dense'.",
        )  # fmt: skip
    check_mode(name, mode, HVP_MODES)
    if num_iterations is not None and (
        isinstance(num_iterations, bool)
        or not isinstance(num_iterations, int)
        or num_iterations < (k if isinstance(k, int) and not isinstance(k, bool) else 1)
    ):
        argument_error(
            name,
            "num_iterations",
            "must be an int of at least k (each Lanczos step adds one Ritz value)",
            num_iterations,
            "Pass num_iterations >= k, or leave it None (max(2 k, k + 20), capped at n).",
        )
    with _grad_mode(name, create_graph):
        call = _prepare(
            name,
            module,
            inputs,
            order=2,
            mode=mode,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            randomness=randomness,
            create_graph=create_graph,
            quantity="eigvalsh",
            method="lanczos",
            num_samples=num_iterations,
            generator=generator,
            k=k,
            **what,
        )
        result: torch.Tensor = _run(call)
        return result


_EXPLAINABLE: dict[Callable[..., Any], tuple[str, int, str]] = {
    per_sample_hessian: ("per_sample_hessian", 2, "hessian"),
    per_sample_jacobian: ("per_sample_jacobian", 1, "hessian"),
    per_sample_hessian_diag: ("per_sample_hessian_diag", 2, "diagonal"),
    per_sample_laplacian: ("per_sample_laplacian", 2, "trace"),
    per_sample_hvp: ("per_sample_hvp", 2, "hvp"),
    per_sample_hessian_eigvalsh: ("per_sample_hessian_eigvalsh", 2, "eigvalsh"),
    per_sample_ggn: ("per_sample_ggn", 2, "ggn"),
    per_sample_ggn_diag: ("per_sample_ggn_diag", 2, "ggn_diagonal"),
}


def explain(
    function: Callable[..., Any], module: nn.Module, inputs: Any, **options: Any
) -> Decision:
    """What a module-level call would do, without computing its result.

    Builds the objective, chooses the engine and plans the chunk sizes exactly as
    `function` would (the planner runs the real derivative on a sample or two at small
    chunk sizes to measure its memory), and returns the decision.

    Args:
        function: A module-level function: `torchcurv.per_sample_hessian`,
            `torchcurv.per_sample_jacobian`, `torchcurv.per_sample_hessian_diag`,
            `torchcurv.per_sample_laplacian`, `torchcurv.per_sample_hvp`,
            `torchcurv.per_sample_hessian_eigvalsh` (Lanczos), `torchcurv.per_sample_ggn`
            or `torchcurv.per_sample_ggn_diag`.
        module: The model, as for `function`.
        inputs: The batch, as for `function`.
        **options: The keyword arguments of `function`.

    Returns:
        A `Decision`: engine, why, chunk sizes, predicted peak, budget, why those chunks.

    Raises:
        TorchcurvError: If `function` is not a module-level function, or for the errors
            `function` itself would raise before computing.

    Example:
        >>> import torch, torchcurv
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
        ...                             torch.nn.Linear(8, 1))
        >>> d = torchcurv.explain(torchcurv.per_sample_hessian, model, torch.randn(16, 4))
        >>> d.engine, d.batch_chunk
        ('structured', 16)
        >>> d = torchcurv.explain(torchcurv.per_sample_hessian, model, torch.randn(16, 4),
        ...                       wrt="params", chunk_size=(4, None, 8))
        >>> d.engine, d.batch_chunk, d.basis_chunks, d.basis_sizes
        ('fwd-over-rev', 4, (None, 8), (1, 49))
    """
    if function not in _EXPLAINABLE:
        argument_error(
            "explain",
            "function",
            "must be a module-level torchcurv function",
            function,
            "Pass torchcurv.per_sample_hessian, per_sample_jacobian, "
            "per_sample_hessian_diag, per_sample_laplacian, per_sample_hvp, "
            "per_sample_hessian_eigvalsh, per_sample_ggn or per_sample_ggn_diag.",
        )
    name, order, quantity = _EXPLAINABLE[function]
    create_graph = options.pop("create_graph", False)
    defaults: dict[str, Any] = {
        "mode": "auto",
        "chunk_size": "auto",
        "memory_budget": None,
        "randomness": "error",
    }
    plan_options = {k: options.pop(k, v) for k, v in defaults.items()}
    inputs_only = quantity == "trace"  # per_sample_laplacian takes no wrt, no params
    what = {
        k: options.pop(k, None)
        for k in (
            "output",
            "loss",
            "targets",
            "kwargs",
            "argnums",
            *(() if inputs_only else ("params",)),
            *(("vectors",) if quantity == "hvp" else ()),
        )
    }
    if inputs_only:
        plan_options["coordinates"] = options.pop("coordinates", None)
        plan_options["weights"] = options.pop("weights", None)
        plan_options["sigma"] = options.pop("sigma", None)
    if quantity == "eigvalsh":
        if options.pop("method", "lanczos") != "lanczos":
            argument_error(
                "explain", "options", "explains method='lanczos' only", "method",
                "Explain the dense method's Hessian: explain(per_sample_hessian, ...).",
            )  # fmt: skip
        plan_options["method"] = "lanczos"
        plan_options["num_samples"] = options.pop("num_iterations", None)
        plan_options["generator"] = options.pop("generator", None)
        plan_options["k"] = options.pop("k", None)
    elif quantity in _METHODS:
        plan_options["method"] = options.pop("method", "exact")
        plan_options["num_samples"] = options.pop("num_samples", None)
        plan_options["generator"] = options.pop("generator", None)
    # the function's own default (the Gauss-Newton functions differentiate the parameters)
    default_wrt = "params" if quantity in GGN_QUANTITIES else "inputs"
    what["wrt"] = "inputs" if inputs_only else options.pop("wrt", default_wrt)
    what.setdefault("params", None)
    if options:
        argument_error(
            "explain",
            "options",
            f"has keywords that {name} does not take",
            sorted(options),
            f"Pass the keyword arguments of {name} only.",
        )
    with _grad_mode(name, create_graph):
        return _prepare(
            name,
            module,
            inputs,
            order=order,
            create_graph=create_graph,
            quantity=quantity,
            **plan_options,
            **what,
        ).decision


def batch_hessian(
    module: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    targets: torch.Tensor,
    *,
    loss: LossFunction,
    wrt: Wrt = "params",
    params: ParamSelection = None,
    kwargs: Mapping[str, Any] | None = None,
    argnums: int | tuple[int, ...] | None = None,
    mode: str = "fwd-over-rev",
    chunk_size: int | tuple[int | None, int | None] | None = None,
    randomness: Literal["error", "same"] = "error",
    create_graph: bool = False,
) -> Any:
    """The Hessian of a loss over the whole batch, ``loss(module(inputs), targets)``.

    With the default ``reduction="mean"`` of torch's losses this is the Hessian of the
    mean loss: the mean of the per-sample loss Hessians. BatchNorm in training mode
    normalises by the batch's statistics, as the model does (the samples are coupled
    there, and that coupling is the model's); its running statistics are not updated.
    With ``wrt="params"`` the result is a dict of dicts
    ``H[name_i][name_j]: [*p_i.shape, *p_j.shape]``; ``torchcurv.to_matrix(H)`` gives
    the ``P x P`` matrix.

    Args:
        module: The model; never modified.
        inputs: The batch (or a tuple of batched inputs).
        targets: The targets of the batch.
        loss: ``loss(out, targets) -> scalar``.
        wrt: ``"params"`` (default), ``"inputs"`` (the whole batch as one input) or
            ``"both"``.
        params: Which parameters, see `torchcurv.functional`.
        kwargs: Keyword arguments for the forward.
        argnums: Which positional inputs to differentiate with ``wrt="inputs"`` /
            ``"both"`` (see `per_sample_hessian`).
        mode: A `torchcurv.hessian` mode.
        chunk_size: Chunk size(s) of the two Hessian stages, see `torchcurv.hessian`.
        randomness: ``"error"`` or ``"same"`` (one dropout mask for the whole Hessian).
        create_graph: As in `per_sample_hessian`: True keeps the result differentiable.

    Returns:
        The Hessian blocks.

    Raises:
        UnsupportedModuleError: For dropout in training mode with ``randomness="error"``.
        TorchcurvError: For bad arguments.

    Example:
        >>> import torch, torchcurv
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> X = torch.randn(8, 3, dtype=torch.float64)
        >>> y = torch.randn(8, 1, dtype=torch.float64)
        >>> H = torchcurv.batch_hessian(model, X, y, loss=torch.nn.functional.mse_loss)
        >>> M = torchcurv.to_matrix(H)  # mean squared error: 2 X^T X / B
        >>> torch.allclose(M, 2 * X.T @ X / 8)
        True
    """

    name = "batch_hessian"
    check_mode(name, mode, HESSIAN_MODES)
    randomness = check_randomness(name, randomness)  # type: ignore[assignment]
    if loss is None:
        argument_error(
            name,
            "loss",
            "is required",
            loss,
            "Pass loss=torch.nn.functional.cross_entropy or another (out, y) -> scalar.",
        )
    with _grad_mode(name, create_graph):
        obj = Objective(
            name,
            module,
            inputs,
            wrt=wrt,
            params=params,
            output=None,
            loss=loss,
            targets=targets,
            kwargs=kwargs,
            create_graph=create_graph,
            argnums=argnums,
        )
        check_layers(name, module, randomness, per_sample=False)
        obj.batch_size()
        transform = hessian(
            obj.whole_batch,
            mode=mode,  # type: ignore[arg-type]
            chunk_size=chunk_size,
            randomness=randomness,
        )
        return transform(obj.diff(obj.xs), obj.passed(obj.xs), obj.targets)

"""`check_model`: per-sample Hessians of a user's model against the loop oracle."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map

import torchcurv

from .. import TorchcurvError, functional, reference
from ._assertions import assert_trees_close, tolerances

__all__ = ["ModelCheckReport", "check_model"]

_WRT = ("inputs", "params", "both")


@dataclass(frozen=True)
class ModelCheckReport:
    """What `check_model` compared, and how closely the results agreed.

    Attributes:
        samples: How many samples were checked (the first ones of the batch).
        wrt: ``"inputs"``, ``"params"`` or ``"both"``.
        mode: The `torchcurv.per_sample_hessian` mode that was checked.
        blocks: The names of the compared blocks, e.g. ``"H['0.weight']['0.bias']"``.
        max_abs_diff: The largest ``|per_sample_hessian - oracle|`` over all entries.
        max_abs_expected: The largest entry of the oracle's Hessians, for scale.
        worst_block: The block where ``max_abs_diff`` occurred.
        worst_sample: The sample where ``max_abs_diff`` occurred.
    """

    samples: int
    wrt: str
    mode: str
    blocks: tuple[str, ...]
    max_abs_diff: float
    max_abs_expected: float
    worst_block: str
    worst_sample: int


def _fail(argument: str, problem: str, value: Any, fix: str) -> TorchcurvError:
    shown = type(value).__name__ if isinstance(value, (nn.Module, torch.Tensor)) else repr(value)
    return TorchcurvError(f"check_model: {argument} {problem}, got {shown}. {fix}")


def _leaves(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` pairs, the path written as indexing: ``['0.weight'][1]``."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _leaves(value, f"{path}[{key!r}]")
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _leaves(value, f"{path}[{index}]")
    else:
        yield path, tree


def _to_float64(value: Any) -> Any:
    def convert(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf.detach().to(torch.float64)
        return leaf

    return tree_map(convert, value)


def _select_output(out: Any, output: Any) -> torch.Tensor:
    """One sample's output (batch dim removed), selected as `per_sample_hessian` says."""
    if output is None:
        selected = out
    elif callable(output):
        selected = output(out)
    else:
        selected = out[output]
    if not isinstance(selected, torch.Tensor):
        raise _fail("output", "must select a tensor of the output", selected, "See output=.")
    return selected


def _objective(
    model: nn.Module,
    wrt: str,
    single: bool,
    differentiated: tuple[int, ...],
    xs: tuple[torch.Tensor, ...],
    names: list[str],
    forward_kwargs: Mapping[str, Any],
    output: Any,
    loss: Callable[..., Any] | None,
    target: torch.Tensor | None,
) -> Callable[[Any], torch.Tensor]:
    """The differentiated quantity of one sample, a plain function of `diff`."""
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state = {n: t.detach() for n, t in state.items()}

    def objective(diff: Any) -> torch.Tensor:
        inputs = list(xs)
        values: Mapping[str, torch.Tensor] = {}
        if wrt == "params":
            values = diff
        else:
            given = diff if wrt == "inputs" else diff["inputs"]
            for index, x in zip(differentiated, (given,) if single else given, strict=True):
                inputs[index] = x
            if wrt == "both":
                values = diff["params"]
        batch_of_one = tuple(x.unsqueeze(0) for x in inputs)
        if names:
            out = torch.func.functional_call(
                model, {**state, **values}, batch_of_one, dict(forward_kwargs), strict=False
            )
        else:
            out = model(*batch_of_one, **forward_kwargs)
        if loss is not None:
            assert target is not None
            return torch.as_tensor(loss(out, target.unsqueeze(0))).reshape(())
        return _select_output(tree_map(lambda t: t[0], out), output)

    return objective


def check_model(
    model: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    samples: int = 3,
    **per_sample_hessian_kwargs: Any,
) -> ModelCheckReport:
    """Check `torchcurv.per_sample_hessian` on your model against the loop oracle.

    Runs ``torchcurv.per_sample_hessian(model, inputs[:samples], **kwargs)`` and, for
    each of those samples, builds the same Hessian independently: a plain function of
    the differentiated quantity (the sample's inputs fed as a batch of one, or the
    parameters through `torch.func.functional_call`) differentiated by
    `torchcurv.reference.hessian`, one autograd double backward per row, without vmap
    or forward mode (attention on its math kernel: ``sdpa_kernel`` is selected while
    the oracle runs, a process-wide setting restored afterwards). Both run in float64
    on a deep copy of the model (float parameters, buffers, inputs, targets and forward
    keyword arguments converted); the model passed in is never modified. Blocks are
    compared with the tolerance policy of `assert_trees_close`. For a single sample
    ``x`` and a scalar objective the compared Hessians are ``[*x.shape, *x.shape]`` per
    sample, ``[samples, *x.shape, *x.shape]`` as `per_sample_hessian` returns them.

    Args:
        model: The model; a float64 deep copy is checked.
        inputs: The batch ``[B, ...]`` (or a tuple of such tensors); the first
            `samples` samples are checked.
        samples: How many samples to check (all of them if the batch is smaller).
        **per_sample_hessian_kwargs: Passed to `torchcurv.per_sample_hessian`: ``wrt``
            (``"inputs"``, ``"params"``, ``"both"``), ``output``, ``loss`` with
            ``targets`` (cut to the checked samples), ``params``, ``kwargs``,
            ``argnums`` (the other inputs, a class index or a padding mask, are passed
            along per sample), ``mode``, ``chunk_size``, ``memory_budget``,
            ``create_graph``.

    Returns:
        A `ModelCheckReport`: what was compared and the largest difference.

    Raises:
        AssertionError: If a block of a sample disagrees with the oracle; the message
            names the block (e.g. ``H['0.weight']['1.bias']``), the sample, the worst
            entries and the tolerances.
        TorchcurvError: For bad arguments (and whatever `per_sample_hessian` raises).

    Example:
        A linear model's input Hessian is zero, and a tanh network agrees with the
        oracle:

        >>> import torch, torchcurv
        >>> from torchcurv.testing import check_model
        >>> X = torch.randn(5, 3)
        >>> check_model(torch.nn.Linear(3, 2), X, output=1).max_abs_expected
        0.0
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2))
        >>> report = check_model(model, X, wrt="params", loss=torch.nn.functional.cross_entropy,
        ...                      targets=torch.tensor([0, 1, 1, 0, 1]))
        >>> report.samples, report.blocks[1], report.max_abs_diff < 1e-10
        (3, "H['0.weight']['0.bias']", True)
        >>> model[0].weight.dtype  # the model passed in is left as it was
        torch.float32
    """
    kwargs = dict(per_sample_hessian_kwargs)
    if not isinstance(model, nn.Module):
        raise _fail("model", "must be a torch.nn.Module", model, "Pass the model itself.")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise _fail("samples", "must be a positive int", samples, "Pass e.g. samples=3.")
    single = isinstance(inputs, torch.Tensor)
    xs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    if not isinstance(xs, tuple) or not xs or not all(isinstance(x, torch.Tensor) for x in xs):
        raise _fail(
            "inputs",
            "must be a tensor or a non-empty tuple of tensors",
            inputs,
            "Pass inputs=X, or inputs=(x1, x2) for a forward with several inputs.",
        )
    if any(x.dim() == 0 for x in xs):
        raise _fail("inputs", "must have a leading batch dim", inputs, "Pass X of shape (B, ...).")
    if kwargs.get("randomness", "error") != "error":
        raise _fail(
            "randomness",
            "cannot be checked: the oracle cannot reproduce the dropout masks",
            kwargs["randomness"],
            "Switch random layers off with model.eval() and leave randomness at 'error'.",
        )
    wrt = kwargs.get("wrt", "inputs")
    if wrt not in _WRT:
        raise _fail("wrt", "must be 'inputs', 'params' or 'both'", wrt, "Pass wrt='params'.")
    count = min(samples, min(x.shape[0] for x in xs))
    if count == 0:
        raise _fail(
            "inputs",
            "must hold at least one sample to check",
            next(x for x in xs if x.shape[0] == 0),
            "Pass a batch with samples; an empty batch would pass without checking anything.",
        )

    model64 = copy.deepcopy(model).to(torch.float64)
    xs64 = tuple(_to_float64(x[:count]) for x in xs)
    targets = kwargs.get("targets")
    if isinstance(targets, torch.Tensor) and targets.dim() > 0:
        targets = _to_float64(targets[:count])
        kwargs["targets"] = targets
    forward_kwargs = _to_float64(dict(kwargs.get("kwargs") or {}))
    if kwargs.get("kwargs") is not None:
        kwargs["kwargs"] = forward_kwargs
    params = kwargs.get("params")
    if isinstance(params, Mapping):
        params = kwargs["params"] = _to_float64(dict(params))

    argnums = kwargs.get("argnums")
    differentiated = tuple(range(len(xs)))
    if isinstance(argnums, int):
        differentiated = (argnums % len(xs),)
    elif isinstance(argnums, tuple):
        differentiated = tuple(int(a) % len(xs) for a in argnums)
    single_diff = isinstance(argnums, int) or (argnums is None and single)

    # Looked up at call time, so that a test can replace it.
    actual = torchcurv.per_sample_hessian(model64, xs64[0] if single else xs64, **kwargs)

    names: list[str] = []
    values: dict[str, torch.Tensor] = {}
    if wrt != "inputs":
        _, values = functional(model64, params)  # the given values, or the model's own
        names = list(values)

    mode = str(kwargs.get("mode", "auto"))
    blocks: list[str] = []
    worst: tuple[float, str, int] = (-1.0, "", 0)
    largest = 0.0
    for i in range(count):
        sample_xs = tuple(x[i] for x in xs64)
        x_diff: Any = (
            sample_xs[differentiated[0]]
            if single_diff
            else tuple(sample_xs[j] for j in differentiated)
        )
        diff: Any = {"inputs": x_diff, "params": values} if wrt == "both" else x_diff
        if wrt == "params":
            diff = values
        objective = _objective(
            model64,
            wrt,
            single_diff,
            differentiated,
            sample_xs,
            names,
            forward_kwargs,
            kwargs.get("output"),
            kwargs.get("loss"),
            None if targets is None else targets[i],
        )
        # Autograd has no double backward for the fused CPU attention kernels; the math
        # kernel is the same function, written in differentiable ops.
        with sdpa_kernel(SDPBackend.MATH):
            expected = reference.hessian(objective)(diff)
        found = tree_map(lambda t, i=i: t[i].detach(), actual)  # create_graph: no graph
        _check_structure(found, expected, i)
        blocks = []
        for (path, a), (_, e) in zip(_leaves(found), _leaves(expected), strict=True):
            name = f"H{path}"
            blocks.append(name)
            _compare_block(a, e, name, i, wrt, mode)
            diff_max = float((a - e).abs().max()) if e.numel() else 0.0
            largest = max(largest, float(e.abs().max()) if e.numel() else 0.0)
            if diff_max > worst[0]:
                worst = (diff_max, name, i)
    return ModelCheckReport(
        samples=count,
        wrt=str(wrt),
        mode=mode,
        blocks=tuple(blocks),
        max_abs_diff=max(worst[0], 0.0),
        max_abs_expected=largest,
        worst_block=worst[1],
        worst_sample=worst[2],
    )


def _check_structure(found: Any, expected: Any, sample: int) -> None:
    if tree_flatten(found)[1] != tree_flatten(expected)[1]:
        shape = tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else t, found)
        want = tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else t, expected)
        raise AssertionError(
            f"check_model: sample {sample}: per_sample_hessian returned blocks laid out as "
            f"{shape}, the oracle as {want}."
        )


def _compare_block(
    actual: torch.Tensor, expected: torch.Tensor, name: str, sample: int, wrt: str, mode: str
) -> None:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    rtol, atol = tolerances(expected.dtype, scale)
    try:
        assert_trees_close(actual, expected, rtol=rtol, atol=atol, what=name)
    except AssertionError as error:
        raise AssertionError(
            f"check_model: per_sample_hessian (wrt={wrt!r}, mode={mode!r}) disagrees with "
            f"the loop oracle in block {name} of sample {sample} "
            f"(rtol={rtol:.3g}, atol={atol:.3g}):\n{error}"
        ) from None

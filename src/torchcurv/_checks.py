"""Argument validation for every public function, run before any work.

Every message names the function, the argument, what came in and the fix (see
`torchcurv._errors.argument_error`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._compat import BatchNormBase, DropoutBase
from ._errors import UnsupportedModuleError, argument_error
from ._memory import parse_budget
from ._types import RANDOMNESS, BatchChunk

__all__ = [
    "as_inputs",
    "check_argnums",
    "check_batch_chunk_size",
    "check_callable",
    "check_chunk_size",
    "check_differentiable",
    "check_flag",
    "check_hessian_chunk_size",
    "check_layers",
    "check_mode",
    "check_module",
    "check_module_chunk",
    "check_objective",
    "check_randomness",
    "resolve_argnums",
]


def check_argnums(function: str, argnums: Any) -> int | tuple[int, ...]:
    """Validate `argnums` (an int or a non-empty tuple of distinct ints)."""
    if isinstance(argnums, int) and not isinstance(argnums, bool):
        return argnums
    if (
        isinstance(argnums, tuple)
        and argnums
        and all(isinstance(a, int) and not isinstance(a, bool) for a in argnums)
    ):
        if len(set(argnums)) != len(argnums):
            argument_error(
                function,
                "argnums",
                "must not repeat an index",
                argnums,
                "Name each argument once, e.g. argnums=(0, 1).",
            )
        return tuple(argnums)
    argument_error(
        function,
        "argnums",
        "must be an int or a non-empty tuple of ints",
        argnums,
        "Pass argnums=0 for the first argument or argnums=(0, 1) for several.",
    )


def check_chunk_size(function: str, chunk_size: Any, argument: str = "chunk_size") -> int | None:
    """Validate a single chunk size: None or a positive int."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0:
        return chunk_size
    argument_error(
        function,
        argument,
        "must be None or a positive int",
        chunk_size,
        f"Pass {argument}=None to disable chunking or a positive int such as 16.",
    )


def check_hessian_chunk_size(function: str, chunk_size: Any) -> tuple[int | None, int | None]:
    """Validate a Hessian chunk size and return it as ``(inner, outer)``."""
    if isinstance(chunk_size, tuple):
        if len(chunk_size) != 2:
            argument_error(
                function,
                "chunk_size",
                "must be a pair (inner, outer) when a tuple",
                chunk_size,
                "Pass chunk_size=(inner, outer), e.g. (4, 16).",
            )
        inner = check_chunk_size(function, chunk_size[0], "chunk_size[0] (inner)")
        outer = check_chunk_size(function, chunk_size[1], "chunk_size[1] (outer)")
        return inner, outer
    if chunk_size is None or (isinstance(chunk_size, int) and not isinstance(chunk_size, bool)):
        if chunk_size is not None and chunk_size <= 0:
            argument_error(
                function,
                "chunk_size",
                "must be positive",
                chunk_size,
                "Pass chunk_size=None to disable chunking or a positive int such as 16.",
            )
        return chunk_size, chunk_size
    argument_error(
        function,
        "chunk_size",
        "must be None, a positive int or a pair of them",
        chunk_size,
        "Pass chunk_size=16 or chunk_size=(inner, outer).",
    )


def check_randomness(function: str, randomness: Any, allowed: Sequence[str] = RANDOMNESS) -> str:
    """Validate a randomness choice."""
    if randomness not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        argument_error(
            function,
            "randomness",
            f"must be one of {choices}",
            randomness,
            "Use 'error' to refuse random operations (dropout in training mode) "
            "or 'same' to share one random draw across all rows of the result.",
        )
    return str(randomness)


def check_mode(function: str, mode: Any, allowed: Sequence[str]) -> str:
    if mode not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        argument_error(
            function,
            "mode",
            f"must be one of {choices}",
            mode,
            f"Pass one of {choices}; 'auto' chooses from the input and output sizes.",
        )
    return str(mode)


def check_callable(function: str, func: Any) -> None:
    if not callable(func):
        argument_error(
            function,
            "func",
            "must be callable",
            func,
            "Pass a function of tensors, e.g. lambda x: (x ** 2).sum().",
        )


def check_flag(function: str, argument: str, value: Any) -> None:
    if not isinstance(value, bool):
        argument_error(
            function,
            argument,
            "must be a bool",
            value,
            f"Pass {argument}=True or {argument}=False.",
        )


def resolve_argnums(function: str, argnums: int | tuple[int, ...], nargs: int) -> tuple[int, ...]:
    indices = (argnums,) if isinstance(argnums, int) else argnums
    resolved = []
    for index in indices:
        if not -nargs <= index < nargs:
            argument_error(
                function,
                "argnums",
                f"is out of range for a call with {nargs} positional argument(s)",
                argnums,
                f"Use indices between {-nargs} and {nargs - 1}."
                if nargs
                else "Call the transformed function with the tensors to differentiate.",
            )
        resolved.append(index % nargs)
    if len(set(resolved)) != len(resolved):
        argument_error(
            function,
            "argnums",
            "names the same argument twice",
            argnums,
            "Name each argument once.",
        )
    return tuple(resolved)


def check_differentiable(function: str, leaves: Sequence[Any], argnums: tuple[int, ...]) -> None:
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            argument_error(
                function,
                f"the argument(s) at argnums={_fmt(argnums)}",
                "must be tensors or pytrees of tensors",
                leaf,
                "Pass floating-point tensors, e.g. torch.tensor([1.0, 2.0]).",
            )
        if leaf.is_complex():
            argument_error(
                function,
                f"the argument(s) at argnums={_fmt(argnums)}",
                "must be real: complex tensors are not differentiated (as in torch.func)",
                leaf,
                "Differentiate the real and imaginary parts as real tensors: pass "
                "torch.view_as_real(z) and rebuild z = torch.view_as_complex(x) inside.",
            )
        if not leaf.is_floating_point():
            argument_error(
                function,
                f"the argument(s) at argnums={_fmt(argnums)}",
                "must be floating-point to be differentiated",
                leaf,
                "Convert it with x.to(torch.float64) (or .float()), or leave it out of argnums.",
            )


def _fmt(argnums: tuple[int, ...]) -> str:
    return str(argnums[0]) if len(argnums) == 1 else str(argnums)


def check_batch_chunk_size(function: str, chunk_size: Any, memory_budget: Any) -> BatchChunk:
    """Validate a batch chunk size (None, a positive int or "auto") against a budget."""
    if chunk_size == "auto" or chunk_size is None:
        if memory_budget is not None:
            parse_budget(function, memory_budget, torch.device("cpu"))
            return "auto"
        return chunk_size  # type: ignore[no-any-return]
    if isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0:
        if memory_budget is not None:
            argument_error(
                function,
                "chunk_size",
                "must be 'auto' or None when memory_budget is given",
                chunk_size,
                "Pass either chunk_size=<int> or memory_budget=..., not both.",
            )
        return chunk_size
    argument_error(
        function,
        "chunk_size",
        "must be None, a positive int or 'auto'",
        chunk_size,
        "Pass chunk_size='auto' to plan from the memory budget, or an int such as 32.",
    )


def check_module(function: str, module: Any) -> None:
    if not isinstance(module, nn.Module):
        argument_error(
            function,
            "module",
            "must be a torch.nn.Module",
            module,
            "Pass the model itself, e.g. torchcurv.functional(model).",
        )


def as_inputs(
    function: str, inputs: Any, wrt: str, argnums: Any = None
) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...], bool]:
    """The input tensors, the indices of those differentiated, and whether the
    differentiated inputs are one tensor (not a tuple) in results.

    `argnums` (torch.func's name) picks the differentiated positional inputs: None (all
    of them, as given), an int (one, results not nested) or a tuple of ints.
    """
    given_single = isinstance(inputs, torch.Tensor)
    xs = (inputs,) if given_single else inputs
    if not isinstance(xs, tuple) or not xs or not all(isinstance(x, torch.Tensor) for x in xs):
        argument_error(
            function,
            "inputs",
            "must be a tensor or a non-empty tuple of tensors (the module's positional arguments)",
            inputs,
            "Pass inputs=X, or inputs=(x1, x2) for a forward with several inputs.",
        )
    for x in xs:
        if x.dim() == 0:
            argument_error(
                function,
                "inputs",
                "must have a leading batch dim",
                x,
                "Pass a batch, e.g. X of shape (B, ...); use x.unsqueeze(0) for one sample.",
            )
    if wrt == "params":
        if argnums is not None:
            argument_error(
                function,
                "argnums",
                "selects differentiated inputs, so it needs wrt='inputs' or wrt='both'",
                argnums,
                "Drop argnums=, or pass wrt='inputs'.",
            )
        return xs, (), given_single
    if argnums is None:
        indices, single = tuple(range(len(xs))), given_single
    else:
        checked = check_argnums(function, argnums)
        indices = resolve_argnums(function, checked, len(xs))
        single = isinstance(checked, int)
    for index in indices:
        x = xs[index]
        if not x.is_floating_point():
            where = "inputs" if given_single else f"inputs[{index}]"
            argument_error(
                function,
                where,
                "must be floating-point to be differentiated",
                x,
                "Convert it with .double() or .float(); to pass it along undifferentiated "
                "(a class index, a padding mask), leave it out of argnums, e.g. "
                "inputs=(X, index), argnums=0; or use wrt='params'.",
            )
    return xs, indices, single


def check_objective(function: str, output: Any, loss: Any, targets: Any) -> None:
    if loss is not None and not callable(loss):
        argument_error(
            function,
            "loss",
            "must be callable (out, target) -> scalar",
            loss,
            "Pass e.g. loss=torch.nn.functional.cross_entropy.",
        )
    if loss is not None and targets is None:
        argument_error(
            function,
            "targets",
            "must be given with loss=",
            targets,
            "Pass targets=Y with one target per sample.",
        )
    if loss is None and targets is not None:
        argument_error(
            function,
            "loss",
            "must be given with targets=",
            loss,
            "Pass loss=torch.nn.functional.cross_entropy (or any (out, y) -> scalar).",
        )
    if loss is not None and output is not None:
        argument_error(
            function,
            "output",
            "cannot be combined with loss=",
            output,
            "Pass output= to differentiate a model output, or loss= and targets= "
            "to differentiate a loss.",
        )
    if targets is not None and not isinstance(targets, torch.Tensor):
        argument_error(
            function,
            "targets",
            "must be a tensor",
            targets,
            "Pass targets as a tensor with one entry per sample.",
        )
    if output is not None and not (callable(output) or isinstance(output, (int, slice, tuple))):
        argument_error(
            function,
            "output",
            "must be an int, a slice, an index tuple or a callable out -> tensor",
            output,
            "Pass output=2 for class 2's logit.",
        )


def check_layers(
    function: str, module: nn.Module, randomness: str, *, per_sample: bool = True
) -> None:
    """Refuse layers a call cannot take: batch statistics per sample (they couple the
    samples; a batch Hessian, ``per_sample=False``, takes them as the model's), and
    dropout in training mode under ``randomness="error"``."""
    for path, layer in module.named_modules():
        where = f"{type(layer).__name__} at {path!r}" if path else type(layer).__name__
        coupling = per_sample and isinstance(layer, BatchNormBase)
        if coupling and layer.training:
            raise UnsupportedModuleError(
                f"{function}: {where} is in training mode: its batch statistics couple the "
                "samples and its running statistics would be updated. Call model.eval() "
                "first (and model.train() afterwards if you are training)."
            )
        if coupling and layer.running_mean is None:
            raise UnsupportedModuleError(
                f"{function}: {where} has no running statistics (track_running_stats=False), "
                "so even in eval mode it normalises with the statistics of the batch, which "
                "couples the samples. Build it with track_running_stats=True and train it, or "
                "use a per-sample normalisation (LayerNorm, GroupNorm)."
            )
        if randomness == "error" and layer.training and _drops_out(layer):
            raise UnsupportedModuleError(
                f"{function}: {where} is in training mode and randomness='error'. Call "
                "model.eval() to switch dropout off, or pass randomness='different' (each "
                "sample its own mask, shared by all rows of its derivative) or 'same'."
            )


def _drops_out(layer: nn.Module) -> bool:
    """Whether `layer` (in training mode) draws a dropout mask of its own in forward."""
    if isinstance(layer, DropoutBase):
        return bool(layer.p > 0)
    if isinstance(layer, nn.RNNBase):  # dropout between stacked layers
        return bool(layer.dropout > 0 and layer.num_layers > 1)
    if isinstance(layer, nn.MultiheadAttention):  # dropout on the attention weights
        return bool(layer.dropout > 0)
    return False


def check_module_chunk(
    function: str, chunk_size: Any, memory_budget: Any, n_axes: int
) -> tuple[Any, tuple[int | None, ...]]:
    """``(batch_chunk, basis_chunks)`` from a module-level chunk_size."""
    parts = {0: "(batch,)", 1: "(batch, basis)", 2: "(batch, inner, outer)"}[n_axes]
    if isinstance(chunk_size, list):
        argument_error(
            function,
            "chunk_size",
            f"must be None, a positive int, 'auto' or a tuple {parts}",
            chunk_size,
            f"Pass a tuple, e.g. chunk_size={tuple(chunk_size)}.",
        )
    if isinstance(chunk_size, tuple):
        if len(chunk_size) != 1 + n_axes:
            argument_error(
                function,
                "chunk_size",
                f"must be a tuple {parts} when a tuple",
                chunk_size,
                f"Pass chunk_size={parts}, 'auto', None or an int.",
            )
        if memory_budget is not None:
            argument_error(
                function,
                "chunk_size",
                "must be 'auto' when memory_budget is given",
                chunk_size,
                "Pass either explicit chunk sizes or memory_budget=.",
            )
        batch = check_chunk_size(function, chunk_size[0], "chunk_size[0] (batch)")
        axes = tuple(
            check_chunk_size(function, c, f"chunk_size[{i + 1}]")
            for i, c in enumerate(chunk_size[1:])
        )
        return batch, axes
    return check_batch_chunk_size(function, chunk_size, memory_budget), (None,) * n_axes


def check_estimator(
    function: str, method: Any, methods: Sequence[str], num_samples: Any, generator: Any
) -> None:
    """`method` among `methods`; `num_samples` and `generator` for the estimators only
    (``"lanczos"``: `num_samples` its iterations, None for the default)."""
    if method not in methods:
        argument_error(
            function,
            "method",
            f"must be one of {', '.join(repr(m) for m in methods)}",
            method,
            f"Pass method={methods[-1]!r} for an estimate, or 'exact'.",
        )
    if method == "exact":
        for argument, value in (("num_samples", num_samples), ("generator", generator)):
            if value is not None:
                argument_error(
                    function,
                    argument,
                    "applies to the estimators only",
                    value,
                    f"Drop {argument}=, or pass method="
                    f"{next(m for m in methods if m != 'exact')!r}.",
                )
        return
    least = 3 if method == "hutch++" else 1
    if method == "lanczos" and num_samples is None:
        pass  # the iterations default to a number of the dimension
    elif isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < least:
        argument_error(
            function,
            "num_samples",
            f"must be an int >= {least} ("
            + ("sampled loss rows" if method == "mc" else "Hessian-vector products")
            + f" per sample) with method={method!r}",
            num_samples,
            "Pass e.g. num_samples=30 (the error falls as 1/sqrt(num_samples)"
            + (", faster with hutch++)." if method == "hutchinson" else ")."),
        )
    if generator is not None and (
        not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
    ):
        argument_error(
            function,
            "generator",
            "must be a CPU torch.Generator (or None for the global one)",
            generator,
            "Pass torch.Generator().manual_seed(0) for reproducible draws.",
        )

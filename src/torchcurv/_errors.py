"""Error types and the one helper that writes their messages.

Every message names the function, the argument, what came in and how to fix it::

    hessian: chunk_size must be a positive int or a pair of them, got 0. Pass
    chunk_size=None to disable chunking or a positive int such as 16.
"""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = [
    "MemoryBudgetError",
    "TorchcurvError",
    "TorchcurvFallbackWarning",
    "UnsupportedModuleError",
    "argument_error",
    "describe",
]


class TorchcurvError(ValueError, TypeError):
    """Bad input to a torchcurv function.

    It subclasses both `ValueError` and `TypeError`, so code that already catches
    either of torch's usual argument errors keeps working.
    """


class UnsupportedModuleError(TorchcurvError):
    """A module whose samples are coupled or whose layer the chosen path cannot handle."""


class MemoryBudgetError(TorchcurvError, MemoryError):
    """The memory budget cannot be met, raised before the large allocations happen."""


class TorchcurvFallbackWarning(UserWarning):
    """A vectorised path failed and a slower but equivalent one was taken."""


def describe(value: Any) -> str:
    """A short description of `value` for error messages (type, shape, dtype)."""
    import torch

    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, (list, tuple)) and not any(isinstance(v, torch.Tensor) for v in value):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"{type(value).__name__} of {len(value)} items"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(describe(v) for v in value)
        return f"{type(value).__name__}[{inner}]" if value else f"empty {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def argument_error(
    function: str,
    argument: str,
    problem: str,
    got: Any,
    fix: str,
    *,
    error: type[TorchcurvError] = TorchcurvError,
) -> NoReturn:
    """Raise `error` with the house message: function, argument, what came in, the fix."""
    raise error(f"{function}: {argument} {problem}, got {describe(got)}. {fix}")

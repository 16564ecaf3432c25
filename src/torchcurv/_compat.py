"""Private torch APIs and version gates, in one place.

torchcurv supports the torch releases it tests (see ``pyproject.toml``). Everything it
needs from torch that is private (underscored modules, internal classes) or changed
between releases is imported here, so that a torch upgrade has one file to read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from typing import Any

import torch
from torch import nn
from torch._functorch.eager_transforms import _jvp_with_argnums, _vjp_with_argnums
from torch.utils._pytree import (
    TreeSpec,
    _broadcast_to_and_flatten,
    tree_flatten,
    tree_map,
    tree_unflatten,
)

__all__ = [
    "DERIVATIVE_LOCK",
    "BatchNormBase",
    "DropoutBase",
    "OutOfMemoryError",
    "TreeSpec",
    "broadcast_to_and_flatten",
    "global_module_hooks",
    "is_functorch_wrapped",
    "jvp_with_argnums",
    "release_free_memory",
    "tree_flatten",
    "tree_map",
    "tree_unflatten",
    "vjp_with_argnums",
]

#: torch.func keeps its transform levels (forward-AD dual levels, vmap levels) in
#: process-wide state: two threads that run transforms at once corrupt each other's
#: levels ("Trying to create a dual Tensor for forward AD but no level exists"). Every
#: torchcurv derivative runs under this re-entrant lock, so concurrent calls from
#: several threads are serialised and correct.
DERIVATIVE_LOCK = threading.RLock()

OutOfMemoryError: type[BaseException] = torch.OutOfMemoryError
BatchNormBase = nn.modules.batchnorm._BatchNorm
DropoutBase = nn.modules.dropout._DropoutNd
broadcast_to_and_flatten = _broadcast_to_and_flatten

#: torch.func's `vjp` / `jvp` that wrap *every* positional argument at the transform's
#: level and differentiate those at `argnums` only (what `jacrev` / `jacfwd` use), so
#: a function may write in place into an argument it is not differentiated by.
vjp_with_argnums = _vjp_with_argnums
jvp_with_argnums = _jvp_with_argnums


def is_functorch_wrapped(tensor: Any) -> bool:
    """True for a tensor wrapped by an enclosing torch.func transform."""
    return isinstance(tensor, torch.Tensor) and bool(
        torch._C._functorch.is_functorch_wrapped_tensor(tensor)
    )


def global_module_hooks() -> list[str]:
    """Names of the kinds of global module hooks that are registered (empty if none)."""
    module = nn.modules.module
    kinds = {
        "forward": "_global_forward_hooks",
        "forward pre": "_global_forward_pre_hooks",
        "backward": "_global_backward_hooks",
        "backward pre": "_global_backward_pre_hooks",
    }
    return [kind for kind, attribute in kinds.items() if getattr(module, attribute, None)]


def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim(0)``).

    glibc keeps freed blocks below its (dynamic) mmap threshold resident for reuse, so
    the chunks of a planned call, each freeing its working set, would leave the
    process's resident memory above its live bytes. The batch runner calls this
    between chunks; elsewhere (macOS, musl, Windows) it does nothing.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)

"""A property-test harness for curvature code: strategies, assertions, `check_model`.

Shipped the way ``hypothesis.extra.numpy`` is: the strategies live in
`torchcurv.testing.strategies`; the assertions, `check_model` and the settings
profiles are here. torchcurv's own suite is built on it.

Only the strategies and the settings profiles need hypothesis; they load on first
use, so ``import torchcurv.testing`` (the assertions, `check_model`) works without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._assertions import assert_chunk_invariant as assert_chunk_invariant
from ._assertions import assert_matches_finite_differences as assert_matches_finite_differences
from ._assertions import assert_matches_reference as assert_matches_reference
from ._assertions import assert_per_sample_matches_loop as assert_per_sample_matches_loop
from ._assertions import assert_symmetric as assert_symmetric
from ._assertions import assert_trees_close as assert_trees_close
from ._assertions import tolerances as tolerances
from ._check_model import ModelCheckReport as ModelCheckReport
from ._check_model import check_model as check_model
from ._quantities import assert_quantities_match_hessian as assert_quantities_match_hessian

if TYPE_CHECKING:
    from . import strategies as strategies
    from ._profiles import load_profile as load_profile
    from ._profiles import register_profiles as register_profiles

__all__ = [
    # checking a model
    "ModelCheckReport",
    # assertions
    "assert_chunk_invariant",
    "assert_matches_finite_differences",
    "assert_matches_reference",
    "assert_per_sample_matches_loop",
    "assert_quantities_match_hessian",
    "assert_symmetric",
    "assert_trees_close",
    "check_model",
    # hypothesis profiles
    "load_profile",
    "register_profiles",
    # strategies
    "strategies",
    # the tolerance policy
    "tolerances",
]

# Names that need hypothesis: (module, attribute or None for the module itself).
_LAZY: dict[str, tuple[str, str | None]] = {
    "strategies": (".strategies", None),
    "load_profile": ("._profiles", "load_profile"),
    "register_profiles": ("._profiles", "register_profiles"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    try:
        module = importlib.import_module(module_name, __name__)
    except ImportError as error:
        if "hypothesis" not in str(error):
            raise
        raise ImportError(
            f"torchcurv.testing.{name} needs hypothesis, which is not installed "
            f"({error}). Install it with `pip install hypothesis` "
            "(or `pip install torchcurv[test]`)."
        ) from error
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""A property-test harness for curvature code: strategies and assertions.

Shipped the way ``hypothesis.extra.numpy`` is: the strategies live in
`torchcurv.testing.strategies`; the assertions and the settings profiles are here.
torchcurv's own suite is built on it.
"""

from . import strategies as strategies
from ._assertions import assert_chunk_invariant as assert_chunk_invariant
from ._assertions import assert_matches_finite_differences as assert_matches_finite_differences
from ._assertions import assert_matches_reference as assert_matches_reference
from ._assertions import assert_per_sample_matches_loop as assert_per_sample_matches_loop
from ._assertions import assert_symmetric as assert_symmetric
from ._assertions import assert_trees_close as assert_trees_close
from ._assertions import tolerances as tolerances
from ._profiles import load_profile as load_profile
from ._profiles import register_profiles as register_profiles

__all__ = [
    # assertions
    "assert_chunk_invariant",
    "assert_matches_finite_differences",
    "assert_matches_reference",
    "assert_per_sample_matches_loop",
    "assert_symmetric",
    "assert_trees_close",
    # hypothesis profiles
    "load_profile",
    "register_profiles",
    # strategies
    "strategies",
    # the tolerance policy
    "tolerances",
]

"""Hypothesis settings profiles for torch code."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["load_profile", "register_profiles"]

#: Examples per property test in each profile. The ``ci`` profile is sized so that a
#: suite of a few dozen property tests runs well over 10,000 examples in minutes.
PROFILE_EXAMPLES = {"dev": 25, "ci": 400}


def register_profiles() -> None:
    """Register the ``dev`` and ``ci`` hypothesis profiles for torch code.

    Both use ``deadline=None`` (torch's first calls are slow: lazy initialisation,
    kernel selection) and suppress the ``too_slow`` health check; ``dev`` runs few
    examples for quick iteration, ``ci`` many, with ``print_blob=True`` so a failure
    in CI can be reproduced locally.

    Example:
        >>> from hypothesis import settings
        >>> from torchcurv.testing import register_profiles
        >>> register_profiles()
        >>> settings.get_profile("ci").max_examples
        400
    """
    checks = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile(
        "dev", max_examples=PROFILE_EXAMPLES["dev"], deadline=None, suppress_health_check=checks
    )
    settings.register_profile(
        "ci",
        max_examples=PROFILE_EXAMPLES["ci"],
        deadline=None,
        suppress_health_check=checks,
        print_blob=True,
    )


def load_profile(name: str | None = None) -> str:
    """Register the profiles and load one: `name`, else ``$HYPOTHESIS_PROFILE``, else dev.

    Returns:
        The name of the loaded profile.

    Example:
        >>> from torchcurv.testing import load_profile
        >>> load_profile("dev")
        'dev'
    """
    register_profiles()
    chosen = name or os.environ.get("HYPOTHESIS_PROFILE") or "dev"
    settings.load_profile(chosen)
    return chosen

"""Hypothesis settings profiles: ``ci`` and ``long``."""
from __future__ import annotations

import os
from typing import Optional

from hypothesis import HealthCheck, settings

# =============================================================================================
# settings profiles


def register_profiles() -> None:
    """Register the hypothesis settings profiles ``"ci"`` and ``"long"``.

    ``"ci"``
        ``derandomize=True`` (a fixed seed: every run draws the same examples), no example
        database, 40 examples per property, no deadline, ``too_slow`` health check suppressed.
    ``"long"``
        500 examples per property, random seeds, no deadline; select it with
        ``HYPOTHESIS_PROFILE=long``.

    Idempotent; :func:`profile` calls it.
    """
    common = dict(deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])
    settings.register_profile("ci", derandomize=True, database=None, max_examples=40, **common)
    settings.register_profile("long", max_examples=500, database=None, **common)


def profile(name: Optional[str] = None) -> settings:
    """The settings of profile ``name`` (default: env ``HYPOTHESIS_PROFILE``, else ``"ci"``).

    Use it as a decorator above ``@given`` to apply the profile to one test only, without
    changing hypothesis's global settings::

        @testing.profile()
        @given(arch=testing.architectures())
        def test_something(arch): ...

    Parameters
    ----------
    name:
        a registered profile name.

    Returns
    -------
    hypothesis.settings
    """
    register_profiles()
    return settings.get_profile(name or os.environ.get("HYPOTHESIS_PROFILE", "ci"))


"""Test-wide settings: silent rank promotion is an error, and hypothesis is fast and stable."""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")

# Each drawn configuration compiles its own XLA program, so examples are few and slow.
settings.register_profile("dev", max_examples=8, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True,
                          print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def x64():
    """Runs a test with float64 enabled (and restores the default afterwards)."""
    with jax.enable_x64(True):
        yield

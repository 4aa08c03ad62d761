"""Fixtures of the launch tests: one real Slurm for the session, one teacher cache for all jobs."""

from __future__ import annotations

import pytest

from tests.launch.slurm_cluster import running_cluster


@pytest.fixture(scope="session")
def slurm():
    """A running one-node Slurm cluster; everything it started is stopped by PID afterwards,
    also when a test fails. If Slurm cannot be installed or started, the tests FAIL with the
    reason: CI must run them."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def trainer_cache(tmp_path_factory):
    """Tokenizer and teacher caches shared by every real-trainer job of the session: the first
    job prepares the teacher, the others load it."""
    return tmp_path_factory.mktemp("eaopd-cache")

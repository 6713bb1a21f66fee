"""Fixtures shared by every test module."""

import pytest
from support import ensure_base_image, require_docker
from systemd_container import ensure_systemd_image


@pytest.fixture(scope="session")
def docker():
    """The docker client, once an engine answers (fails on CI if not)."""
    return require_docker()


@pytest.fixture(scope="session")
def python_base_image(docker):
    """The Dockerfile's base image, built locally when it cannot be pulled."""
    return ensure_base_image("python:3.13-slim")


@pytest.fixture(scope="session")
def systemd_image(docker):
    """The one image every systemd-in-Docker test boots (built if absent)."""
    return ensure_systemd_image()

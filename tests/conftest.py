"""Shared pytest fixtures: the real SmolLM2-135M-Instruct checkpoint and the shared data folder."""

from __future__ import annotations

import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Deviceless TPU compilation never touches a TPU: let several test processes load libtpu at once
# instead of failing on its single-process lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """Path of the real SmolLM2-135M-Instruct GGUF (fetched once into the user cache)."""
    from hyjax import pretrained

    return pretrained.smollm2_135m_instruct()


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The shared data folder (SST-2, GSM8K); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA

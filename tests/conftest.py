"""Shared fixtures: a tiny random SELFIE model and processor."""

import pytest

from modeling_selfie.presets import tiny_model_and_processor

from .helpers import WORDS, random_image


@pytest.fixture(scope="session")
def tiny():
    """(model, processor): `selfie-tiny` with random weights (seed 0), eval mode, fp32, sdpa attention."""
    return tiny_model_and_processor(WORDS, seed=0)


@pytest.fixture
def image():
    return random_image(80, 64)

"""Shared fixtures: a tiny random SELFIE model and processor; one torch thread for the files that train it."""

import pytest
import torch

from modeling_selfie.presets import tiny_model_and_processor

from .helpers import WORDS, random_image


@pytest.fixture(scope="session")
def tiny():
    """(model, processor): `selfie-tiny` with random weights (seed 0), eval mode, fp32, sdpa attention."""
    return tiny_model_and_processor(WORDS, seed=0)


@pytest.fixture
def image():
    return random_image(80, 64)


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's ops are too small for intra-op threads: one thread is as fast and immune to busy cores (a file
    asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

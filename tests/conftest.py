"""Shared test helpers: paths to the real DeepDeform samples and comparison utilities."""
import os

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
SAMPLES = os.path.join(SHARED, "deepdeform_samples")
SEQ258 = os.path.join(SAMPLES, "train", "seq258")
SEQ017 = os.path.join(SAMPLES, "test", "seq017")
FIXTURES = os.path.join(SHARED, "fixtures")


def require(path: str) -> str:
    """Skips the test (with the reason) when a file of ../shared is not present."""
    if not os.path.exists(path):
        pytest.skip(f"needs {path} (the ../shared folder beside the repository)")
    return path


def assert_close(actual, expected, atol=1e-6, rtol=1e-6, what="tensor"):
    """Like torch.testing.assert_close, but reports the largest difference and where it is."""
    actual = torch.as_tensor(np.asarray(actual) if not torch.is_tensor(actual) else actual)
    expected = torch.as_tensor(np.asarray(expected) if not torch.is_tensor(expected) else expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    bad = diff > bound
    if bad.any():
        index = np.unravel_index(int(torch.argmax(diff - bound)), tuple(diff.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {diff.numel()} elements differ; largest |diff| "
            f"{float(diff.max()):.3e} at {index}: {float(actual[index]):.6e} vs "
            f"{float(expected[index]):.6e} (atol {atol}, rtol {rtol})")


def small_synthetic_split(tmp_path_factory, name: str, pairs: int, seed: int) -> str:
    """A quick 320x240 synthetic split "test" of `pairs` pairs under a fresh temporary root."""
    from dataset.synthetic import generate
    from options import SyntheticOptions

    root = str(tmp_path_factory.mktemp(name))
    generate(root, "test", pairs, seed, SyntheticOptions(width=320, height=240), progress=False)
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)

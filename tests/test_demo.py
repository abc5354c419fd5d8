"""The two-frame demo, headless: six real pictures, alignment visible, keys, clear errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, SEQ258, require

VIEWS = ("source", "target", "both", "correspondences", "weighted_correspondences", "aligned")


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    return subprocess.run([sys.executable, os.path.join(REPO, "example_viz.py"), *args],
                          capture_output=True, text=True, cwd=REPO, env=env)


def _image(path):
    import cv2

    image = cv2.imread(str(path))
    assert image is not None, path
    return image.astype(np.float32)


def _is_picture(image):
    """Not blank: many distinct colours and a large share of non-background pixels."""
    background = (image > 245).all(axis=2)
    colours = len(np.unique(image.reshape(-1, 3), axis=0))
    return colours > 500 and background.mean() < 0.9 and image.std() > 20


def test_headless_demo_renders_six_pictures(tmp_path):
    result = _run("--out", str(tmp_path), "--flow", "dis")
    assert result.returncode == 0, result.stderr
    assert "EPE 3D" in result.stdout and str(tmp_path) in result.stdout
    images = {view: _image(tmp_path / f"{view}.png") for view in VIEWS}
    for view, image in images.items():
        assert _is_picture(image), view
    # alignment moves the source object: the aligned view is not the unaligned one
    assert np.abs(images["aligned"] - images["both"]).mean() > 2.0
    # and the correspondence views differ only by line colours
    assert np.abs(images["weighted_correspondences"] - images["correspondences"]).mean() > 0.5


def test_keys_switch_views():
    from utils.demo import DemoData, DemoViewer

    rng = np.random.default_rng(0)
    points = np.concatenate((rng.uniform(-0.3, 0.3, (2000, 2)), np.full((2000, 1), 1.2)), axis=1)
    data = DemoData(source_points=points, source_colors=rng.random((2000, 3)),
                    object_mask=np.arange(2000) < 1000, target_points=points + [0.05, 0, 0],
                    target_colors=rng.random((2000, 3)), warped_object=points[:1000] + [0.05, 0, 0],
                    match_source=points[:50], match_target=points[:50] + [0.05, 0, 0],
                    match_weights=rng.random(50))
    viewer = DemoViewer(data, 320, 240, visible=False)
    try:
        for key, view in (("T", "target"), ("B", "both"), ("A", "aligned"), ("C", "correspondences"),
                          ("C", "both"), ("W", "weighted_correspondences"), ("Z", "source")):
            viewer.press(key)
            assert viewer.view == view, key
        viewer.press("T")
        viewer.press("A")                  # A only aligns after B
        assert viewer.view == "target"
        viewer.press("O")
        assert not viewer.show_whole_source
        viewer.press(",")                  # rotation runs without a window
    finally:
        viewer.close()


def test_demo_on_a_real_pair_given_on_the_command_line(tmp_path):
    S = require(SEQ258)
    result = _run("--source-color", os.path.join(S, "color", "000000.jpg"),
                  "--source-depth", os.path.join(S, "depth", "000000.png"),
                  "--target-color", os.path.join(S, "color", "000110.jpg"),
                  "--target-depth", os.path.join(S, "depth", "000110.png"),
                  "--intrinsics", os.path.join(S, "intrinsics.txt"),
                  "--mask", os.path.join(S, "mask", "000000_shirt.png"),
                  "--flow", "dis", "--headless", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "graph built on the fly" in result.stdout
    assert all((tmp_path / f"{view}.png").is_file() for view in VIEWS)


@pytest.mark.parametrize("args,text", [
    (("--source-color", "/nonexistent.jpg", "--source-depth", "x", "--target-color", "y",
      "--target-depth", "z", "--intrinsics", "i"), "not found"),
    (("--source-color", "only-one.jpg"), "needs --source-color"),
    (("--dataset-dir", "/nonexistent"), "not found"),
    (("--index", "5",), "has 1 pair"),
])
def test_bad_input_is_a_clear_error(tmp_path, args, text):
    result = _run(*args, "--flow", "dis", "--out", str(tmp_path))
    assert result.returncode == 1 and text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_demo_tracks_with_the_shipped_network(tmp_path):
    """The checkpoint we ship (the hybrid front-end, trained by us on synthetic data) is the
    demo's default and tracks the example pair: 2.2 mm EPE 3D when it was shipped (DIS:
    2.5 mm; the PWC-Net checkpoint alone 6.3 mm; an untrained network 383 mm)."""
    import torch

    from utils.checkpoints import default_checkpoint

    path = default_checkpoint()
    assert path is not None and os.path.getsize(path) <= 50 * 2 ** 20
    release = torch.load(path, weights_only=True)
    assert not {"optimizer", "scheduler", "rng"} & set(release)
    assert release["tracker_options"]["cost_volume"] == "normalized"
    assert release["tracker_options"]["network_flow"] == "hybrid"
    assert any(key.startswith("hybrid_head.") for key in release["model"])
    assert [h["train_options"]["stage"] for h in release["history"]][-1] == "4_hybrid"
    result = _run("--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "the network of " + path in result.stdout
    epe = float(next(line for line in result.stdout.splitlines() if line.startswith("EPE 3D")).split()[2])
    assert epe < 3.0, result.stdout


def test_weight_colours_spread_the_predicted_weights():
    """A head whose weights all sit in [0.95, 0.96] (what a trained head gives on a real pair)
    still shows red and green lines: the scale follows the weights, and the legend names it."""
    from utils.demo import WEIGHT_RAMP, draw_weight_legend, weight_colors, weight_scale

    weights = np.linspace(0.95, 0.96, 101)
    low, high = weight_scale(weights)
    assert 0.95 <= low < 0.951 and 0.959 < high <= 0.96
    colours = weight_colors(weights, low, high)
    np.testing.assert_allclose(colours[0], WEIGHT_RAMP[0])
    np.testing.assert_allclose(colours[-1], WEIGHT_RAMP[-1])
    np.testing.assert_allclose(colours[50], WEIGHT_RAMP[1], atol=0.05)
    # all equal weights: no division by zero, one colour
    low, high = weight_scale(np.full(10, 0.3))
    assert low < 0.3 < high
    assert np.ptp(weight_colors(np.full(10, 0.3), low, high), axis=0).max() == 0
    image = np.full((240, 320, 3), 255, np.uint8)
    drawn = draw_weight_legend(image.copy(), 0.95, 0.96)
    assert (drawn != image).any(axis=2).sum() > 500      # the bar and its labels are there

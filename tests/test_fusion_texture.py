"""The rendered model's colour from keyframes (fusion/texture.py, --texture-keyframes): each point
takes the colour of the earliest keyframe that saw it, at the pixel it projects to under that
keyframe's node motions; points no keyframe saw keep the fallback; the fusion loop's flow source
is the first frame's image where the model was seen there, and its keyframes survive a resume."""
import numpy as np
import torch

from fusion.texture import keyframe_colors
from options import TrackerOptions

H, W = 60, 80
INTRINSICS = {"fx": 70.0, "fy": 70.0, "cx": 39.5, "cy": 29.5}
DEPTH = 0.7


def plane_points():
    """(H, W, 3) points of the plane z = DEPTH seen at each pixel centre."""
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    return np.stack(((xs - INTRINSICS["cx"]) / INTRINSICS["fx"] * DEPTH,
                     (ys - INTRINSICS["cy"]) / INTRINSICS["fy"] * DEPTH, np.full_like(xs, DEPTH)), axis=-1)


def ramp_image(offset):
    """(H, W, 3) uint8 whose red channel is linear in x (so bilinear sampling is exact)."""
    ys, xs = np.mgrid[0:H, 0:W]
    return np.stack((2 * xs + offset, ys + offset, np.full_like(xs, offset)), axis=-1).astype(np.uint8)


def test_earliest_keyframe_that_saw_the_point_colours_it():
    canonical = plane_points()
    nodes = torch.tensor([[-0.1, -0.1, DEPTH], [0.1, -0.1, DEPTH], [-0.1, 0.1, DEPTH], [0.1, 0.1, DEPTH]])
    anchors = np.tile(np.arange(4, dtype=np.int32), (H, W, 1))
    weights = np.full((H, W, 4), 0.25, np.float32)
    pixels = np.ones((H, W), bool)
    pixels[:, :4] = False                                   # not asked: keep the fallback
    fallback = np.full((H, W, 3), 0.5, np.float32)
    identity = (torch.eye(3).repeat(4, 1, 1), torch.zeros(4, 3))
    # Keyframe 0 (identity motion) saw the left half only; keyframe 1 saw everything shifted by
    # `shift` metres in x (the surface moved right), keyframe 2 everything but comes last.
    depth0 = np.zeros((H, W), np.float32)
    depth0[:, :40] = DEPTH
    shift = 0.02
    moved = (torch.eye(3).repeat(4, 1, 1), torch.tensor([[shift, 0.0, 0.0]]).repeat(4, 1))
    depth1 = np.full((H, W), DEPTH, np.float32)
    depth1[:10] = DEPTH + 0.05                               # rows 0-9: another surface there
    keys = [(ramp_image(0), depth0, *identity), (ramp_image(40), depth1, *moved),
            (ramp_image(90), np.full((H, W), DEPTH, np.float32), *identity)]
    colour, source = keyframe_colors(canonical, anchors, weights, pixels, fallback, keys, nodes, INTRINSICS, 0.01)
    ys, xs = np.mgrid[0:H, 0:W]
    left = pixels & (xs < 40)
    assert (source[left] == 0).all()
    np.testing.assert_allclose(colour[left], ramp_image(0)[left] / 255, atol=1e-6)
    right = pixels & (xs >= 40)
    # Keyframe 1: the point projects shift * fx / depth = 2 px further right.
    from_1 = right & (ys >= 10) & (xs <= W - 3)
    assert (source[from_1] == 1).all()
    expected = (2 * (xs[from_1] + 2) + 40) / 255
    np.testing.assert_allclose(colour[from_1][:, 0], expected, atol=1e-5)
    # Rows 0-9 of the right half: keyframe 1's depth disagrees, keyframe 2 saw them.
    from_2 = right & (ys < 10)
    assert (source[from_2] == 2).all()
    np.testing.assert_allclose(colour[from_2], ramp_image(90)[from_2] / 255, atol=1e-6)
    # Not asked: the fallback; the last columns project outside keyframe 1 and fall to keyframe 2.
    assert (source[~pixels] == -1).all() and (colour[~pixels] == 0.5).all()
    assert (source[right & (ys >= 10) & (xs > W - 3)] == 2).all()


def test_many_points_are_sampled_like_few():
    """Over 32767 points (OpenCV's remap limit on a map's side): each gets its own pixel's colour."""
    rng = np.random.default_rng(1)
    size = 200
    fx = 150.0
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    intrinsics = {"fx": fx, "fy": fx, "cx": 99.5, "cy": 99.5}
    canonical = np.stack(((xs - 99.5) / fx * DEPTH, (ys - 99.5) / fx * DEPTH, np.full_like(xs, DEPTH)), axis=-1)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    keys = [(image, np.full((size, size), DEPTH, np.float32), torch.eye(3).repeat(4, 1, 1), torch.zeros(4, 3))]
    colour, source = keyframe_colors(canonical, np.tile(np.arange(4, dtype=np.int32), (size, size, 1)),
                                     np.full((size, size, 4), 0.25, np.float32), np.ones((size, size), bool),
                                     np.zeros((size, size, 3), np.float32), keys, torch.zeros(4, 3), intrinsics, 0.01)
    # (The outermost pixels may project a float error outside the image.)
    assert (source[1:-1, 1:-1] == 0).all()
    np.testing.assert_allclose(colour[1:-1, 1:-1], image[1:-1, 1:-1] / 255, atol=1e-4)


def test_nobody_saw_it_keeps_the_fallback():
    canonical = plane_points()
    nodes = torch.zeros(4, 3)
    anchors = np.tile(np.arange(4, dtype=np.int32), (H, W, 1))
    anchors[:5] = -1                                         # no anchors: not coloured
    weights = np.full((H, W, 4), 0.25, np.float32)
    fallback = np.random.default_rng(0).random((H, W, 3)).astype(np.float32)
    far = np.full((H, W), DEPTH + 0.2, np.float32)
    keys = [(ramp_image(0), far, torch.eye(3).repeat(4, 1, 1), torch.zeros(4, 3))]
    colour, source = keyframe_colors(canonical, anchors, weights, np.ones((H, W), bool), fallback, keys, nodes,
                                     INTRINSICS, 0.01)
    assert (source == -1).all() and np.array_equal(colour, fallback)


def test_fusion_loop_tracks_from_the_first_frames_image(tmp_path):
    """With --texture-keyframes the flow's source at frame 1 shows frame 0's own pixels where the
    model is rendered (the canonical space is frame 0's camera), not the model's voxel colours;
    keyframes are kept every K frames and restored by load_state_dict."""
    from fusion.loop import Fusion
    from fusion.sequence import Sequence
    from model.tracker import Tracker
    from tests.test_fusion_loop import fusion_options, make_sequence, solver_options

    root = str(tmp_path / "seq")
    make_sequence(root, frames=4)
    sequence = Sequence(root, None)
    sources = []

    class Probe(Tracker):
        def __call__(self, batch, run_solver=False):
            sources.append(batch["source_color"][0].permute(1, 2, 0).numpy().copy())
            return super().__call__(batch, run_solver=run_solver)

    frame0 = sequence.read(0)
    results = {}
    for keyframes in (0, 2):
        sources.clear()
        options = fusion_options(root, str(tmp_path / f"out{keyframes}"), texture_keyframes=keyframes)
        fusion = Fusion(sequence, options, solver_options(), Probe(TrackerOptions(flow="dis"), solver_options()))
        fusion.first_frame(frame0, sequence.first_mask(None, None)[0])
        rendering = fusion.render(fusion.rotations, fusion.translations)
        for index in (1, 2, 3):
            entry = fusion.step(sequence.read(index))
            assert entry.status != "failed", entry.message
        inner = rendering.mask & (np.abs(rendering.depth - frame0.depth) < 0.005)
        results[keyframes] = np.abs(sources[0][inner] - frame0.color[inner] / 255).max(axis=-1)
        if keyframes:
            assert [index for index, _ in fusion.keyframes] == [0, 2]
            state = fusion.state_dict()
            again = Fusion(sequence, options, solver_options(), Probe(TrackerOptions(flow="dis"), solver_options()))
            again.load_state_dict(state)
            assert [(i, key.frame_id) for i, key in again.keyframes] == [(i, key.frame_id) for i, key in fusion.keyframes]
    # Bilinear sampling at the pixel itself (up to the ray cast's float error): frame 0's colour.
    assert np.median(results[2]) < 1e-3 and np.mean(results[2] < 2 / 255) > 0.95
    # The model's own colours are a blurred copy.
    assert np.median(results[0]) > np.median(results[2]) + 2 / 255

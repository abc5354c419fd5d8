"""Masked Lucas-Kanade refinement of the flow near the rendered silhouette (fusion/refine.py): on
an object moving a sub-pixel step over a static background, DIS measures the motion near the
object's border short and the refinement recovers it; pixels not asked for keep their flow;
texture-less windows are marked, not guessed; the fusion loop runs with it."""
import cv2
import numpy as np

from fusion.refine import masked_lucas_kanade
from model.dis_flow import dis_flow
from options import TrackerOptions

H, W = 160, 200
SHIFT = np.array([0.6, -0.4], np.float32)        # the object's motion, pixels (x, y)


def smooth_noise(seed, sigma, contrast):
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.standard_normal((H, W)).astype(np.float32), (0, 0), sigma)
    return 128 + contrast * noise / noise.std()


def disc(center):
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    return (xs - center[0]) ** 2 + (ys - center[1]) ** 2 <= 45.0 ** 2


def object_pair(flat_object=False):
    """Source and target (H, W, 3) uint8: a weakly textured disc over a strongly textured static
    background, the disc moved by SHIFT in the target; and the source's disc mask."""
    background = smooth_noise(0, 1.5, 40)
    texture = np.full((H, W), 150, np.float32) if flat_object else smooth_noise(1, 3.0, 12)
    moved = cv2.warpAffine(texture, np.float32([[1, 0, SHIFT[0]], [0, 1, SHIFT[1]]]), (W, H),
                           flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    center = np.array([W / 2, H / 2], np.float32)
    # The target's disc edge is antialiased at its sub-pixel position (4x supersampled).
    ys, xs = np.mgrid[0:4 * H, 0:4 * W].astype(np.float32) / 4 - 0.375
    cover = ((xs - center[0] - SHIFT[0]) ** 2 + (ys - center[1] - SHIFT[1]) ** 2 <= 45.0 ** 2)
    cover = cover.reshape(H, 4, W, 4).mean(axis=(1, 3))
    mask = disc(center)
    source = np.where(mask, texture, background)
    target = cover * moved + (1 - cover) * background
    as_rgb = lambda grey: np.repeat(np.clip(grey + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)  # noqa: E731
    return as_rgb(source), as_rgb(target), mask


def along(flow, pixels):
    """Median error of the flow along the true motion at pixels (negative: short)."""
    direction = SHIFT / np.linalg.norm(SHIFT)
    return float(np.median((flow[:, pixels].T - SHIFT) @ direction))


def border_band(mask, width=6):
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    return mask & (distance <= width)


def test_refinement_recovers_the_motion_dis_measures_short_at_the_border():
    source, target, mask = object_pair()
    flow, _ = dis_flow(source, target, TrackerOptions(flow="dis"), mask)
    band = border_band(mask) & np.isfinite(flow).all(axis=0)
    short = along(flow, band)
    assert short < -0.25, short              # DIS: the static background holds the border back
    # On the sharp images the masked window converges to the true motion (measured: -0.01 px
    # along it against DIS's -0.36).
    refined, done = masked_lucas_kanade(source, target, mask, flow, band, sigma=0.0)
    assert done[band].mean() > 0.85          # measured 0.92: the rest did not settle, dropped
    assert abs(along(refined, band & done)) < 0.05, along(refined, band & done)
    # The loop's default blurs both images (a wider basin on the renderings' worse start); the
    # blur brings a little background into the border pixels, which leaves some of the bias
    # (measured: -0.21 px), still clearly less than DIS's.
    refined, done = masked_lucas_kanade(source, target, mask, flow, band)
    assert done[band].mean() > 0.95
    assert 0.7 * short < along(refined, band & done) < 0.05, (short, along(refined, band & done))
    error = np.linalg.norm(refined[:, band & done].T - SHIFT, axis=1)
    assert np.median(error) < np.median(np.linalg.norm(flow[:, band].T - SHIFT, axis=1))


def test_only_the_asked_pixels_change():
    source, target, mask = object_pair()
    flow = np.zeros((2, H, W), np.float32)
    flow[:, 5, 5] = np.nan
    band = border_band(mask)
    refined, done = masked_lucas_kanade(source, target, mask, flow, band)
    assert np.array_equal(refined[:, ~band], flow[:, ~band], equal_nan=True)
    assert not done[~band].any()


def test_texture_less_windows_are_marked_not_guessed():
    source, target, mask = object_pair(flat_object=True)
    inner = mask & (cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5) > 12)
    flow = np.zeros((2, H, W), np.float32)
    refined, done = masked_lucas_kanade(source, target, mask, flow, inner)
    assert not done[inner].any()
    assert np.isnan(refined[:, inner]).all()


def test_fusion_loop_tracks_with_the_refined_border(tmp_path):
    """The loop with --refine-border: the frame is tracked, and near the rendered silhouette only
    refined matches (every 2nd pixel) remain."""
    import torch

    from fusion.loop import Fusion
    from fusion.sequence import Sequence
    from model.tracker import Tracker
    from tests.test_fusion_loop import fusion_options, make_sequence, solver_options

    root = str(tmp_path / "seq")
    make_sequence(root, frames=3)
    sequence = Sequence(root, None)
    seen = {}

    class Probe(Fusion):
        def _refine_border(self, batch, out, rendered):
            matches = super()._refine_border(batch, out, rendered)
            seen["matches"], seen["rendered"] = matches, rendered
            return matches

    options = fusion_options(root, str(tmp_path / "out"), refine_border=4)
    fusion = Probe(sequence, options, solver_options(), Tracker(TrackerOptions(flow="dis"), solver_options()))
    fusion.first_frame(sequence.read(0), sequence.first_mask(None, None)[0])
    for index in (1, 2):
        entry = fusion.step(sequence.read(index))
        assert entry.status != "failed", entry.message
    rendered = seen["rendered"]
    band = rendered & (cv2.distanceTransform(rendered.astype(np.uint8), cv2.DIST_L2, 5) <= 4)
    pixel = seen["matches"].pixel.numpy()
    ys, xs = pixel // rendered.shape[1], pixel % rendered.shape[1]
    in_band = band[ys, xs]
    assert in_band.any() and (~in_band).any()
    assert ((ys[in_band] % 2 == 0) & (xs[in_band] % 2 == 0)).all()
    assert torch.isfinite(fusion.translations).all()

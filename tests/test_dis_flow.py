"""DIS front-end: the forward-backward check and when it is skipped (a failed backward flow)."""
import numpy as np

from model import dis_flow as dis_module
from options import TrackerOptions


class _FakeDIS:
    """Forward flow +3 px in x everywhere; the backward flow as given (0: DIS failed there)."""

    def __init__(self, backward_x: float):
        self.calls, self.backward_x = 0, backward_x

    def calc(self, first, second, flow):
        self.calls += 1
        out = np.zeros(first.shape + (2,), np.float32)
        out[..., 0] = 3.0 if self.calls == 1 else self.backward_x
        return out


def _run(monkeypatch, backward_x, object_mask, **options):
    fake = _FakeDIS(backward_x)
    monkeypatch.setattr(dis_module.cv2, "DISOpticalFlow_create", lambda preset: fake)
    image = np.zeros((20, 30, 3), np.uint8)
    flow, _ = dis_module.dis_flow(image, image, TrackerOptions(flow="dis", **options), object_mask)
    return np.isfinite(flow).all(axis=0)


def test_consistency_check_drops_inconsistent_matches(monkeypatch):
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:20] = True
    # A consistent backward flow: every in-bounds pixel is kept.
    kept = _run(monkeypatch, -3.0, mask)
    assert kept[:, :27].all() and not kept[:, 27:].any()
    # An inconsistent backward flow with the check kept (dis_min_consistent 0): all dropped.
    assert not _run(monkeypatch, 0.0, mask, dis_min_consistent=0.0).any()


def test_check_is_skipped_when_it_rejects_almost_the_whole_object(monkeypatch):
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:20] = True
    # The backward flow failed on the object only (where the matches land, 3 px to the right):
    # judged over the whole frame the check holds and drops the object; judged over the object
    # it is deemed to have failed there and the forward flow is kept.
    backward = np.full((20, 30), -3.0, np.float32)
    backward[5:15, 8:23] = 0.0
    kept = _run(monkeypatch, backward, None)
    assert not kept[mask].any() and kept[~mask][:10].all()
    kept = _run(monkeypatch, backward, mask)
    assert kept[:, :27].all() and not kept[:, 27:].any()


def test_fine_preset_recovers_a_shift_more_closely():
    """The fine preset (full resolution, denser patches) on a textured image moved by a known
    sub-pixel shift: both directions come back, and closer than with the medium preset."""
    import cv2

    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur((rng.uniform(0, 255, (120, 160, 3))).astype(np.float32), (0, 0), 1.5)
    shift = np.float32([[1, 0, 2.4], [0, 1, -1.3]])
    source = np.clip(texture, 0, 255).astype(np.uint8)
    target = cv2.warpAffine(source, shift, (160, 120), borderMode=cv2.BORDER_REFLECT)
    errors = {}
    for preset in ("medium", "fine"):
        forward, backward = dis_module.dis_forward_backward(source, target, preset)
        assert forward.shape == backward.shape == (2, 120, 160)
        inner = (slice(None), slice(20, -20), slice(20, -20))
        errors[preset] = float(np.abs(forward[inner] - np.float32([2.4, -1.3])[:, None, None]).mean())
        assert np.abs(backward[inner] + np.float32([2.4, -1.3])[:, None, None]).mean() < 0.5
    assert errors["fine"] < errors["medium"] and errors["fine"] < 0.2, errors


def _texture_under_light(texture_shift, light_x, amplitude=6.0):
    """(240, 320, 3) uint8: a fine grey texture moved by `texture_shift` (x, y) pixels, lit by a
    broad spot whose centre sits at x = 120 + light_x, dark (x 0.35) far from it: a weakly
    textured surface whose texture moves one way while its shading moves another."""
    import cv2

    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.normal(size=(280, 360)).astype(np.float32), (0, 0), 2.0)
    noise /= noise.std()
    ys, xs = np.mgrid[0:240, 0:320].astype(np.float32)
    texture = cv2.remap(noise, xs + 20 - texture_shift[0], ys + 20 - texture_shift[1], cv2.INTER_CUBIC)
    light = 0.35 + np.exp(-(((xs - 120 - light_x) / 50) ** 2 + ((ys - 100) / 45) ** 2))
    gray = np.clip((128 + amplitude * texture) * light, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def test_local_contrast_keeps_the_texture_and_drops_the_shading():
    from model.image_proc import local_contrast

    lit = _texture_under_light((0, 0), 0)[..., 0]
    relit = _texture_under_light((0, 0), -40)[..., 0]
    inner = (slice(20, -20), slice(20, -20))
    # The raw images differ by the light's move; normalised, the same texture is left.
    raw = np.corrcoef(lit[inner].ravel(), relit[inner].ravel())[0, 1]
    out = local_contrast(lit, 5)
    normalized = np.corrcoef(out[inner].ravel(), local_contrast(relit, 5)[inner].ravel())[0, 1]
    assert normalized > 0.9 and normalized > raw + 0.2, (raw, normalized)
    assert out.dtype == np.uint8 and out.shape == lit.shape
    # A uniform image stays flat at 128 (the floor: no noise blown up).
    assert (local_contrast(np.full((30, 40), 77, np.uint8), 5) == 128).all()


def test_normalized_flow_follows_the_texture_not_the_shading():
    """A weakly textured surface moved by (2.6, 1.7) px while its light moved 4 px the other
    way (a turning object under a fixed light): on plain grey the shading pulls DIS's flow;
    on contrast-normalised grey (--dis-normalize) the texture's motion comes back closer."""
    shift = np.float32([2.6, 1.7])
    source = _texture_under_light((0, 0), 0)
    target = _texture_under_light(tuple(shift), -4)
    errors = {}
    for sigma in (0.0, 5.0):
        flow, _ = dis_module.dis_flow(source, target, TrackerOptions(flow="dis", dis_normalize=sigma,
                                                                      dis_consistency=0))
        inner = flow[:, 20:-20, 20:-20]
        errors[sigma] = float(np.linalg.norm(inner - shift[:, None, None], axis=0).mean())
    assert errors[5.0] < 0.1 and errors[5.0] < 0.6 * errors[0.0], errors


def _object_over_background(shift):
    """(240, 320, 3) uint8 and its object mask: a weakly textured ellipse moved by `shift` (x, y)
    pixels over a static, strongly textured background (a tracked object in front of a wall)."""
    import cv2

    def texture(seed, sigma, amplitude):
        noise = cv2.GaussianBlur(np.random.default_rng(seed).normal(size=(300, 380)).astype(np.float32),
                                 (0, 0), sigma)
        return noise / noise.std() * amplitude

    ys, xs = np.mgrid[0:240, 0:320].astype(np.float32)
    inside = ((xs - 160 - shift[0]) / 70) ** 2 + ((ys - 120 - shift[1]) / 80) ** 2 <= 1
    moved = cv2.remap(texture(1, 2.5, 8), xs + 30 - shift[0], ys + 30 - shift[1], cv2.INTER_CUBIC) + 150
    gray = np.clip(np.where(inside, moved, texture(2, 3, 25)[30:270, 30:350] + 100), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2), inside


def test_a_second_pass_measures_the_motion_the_first_left_near_the_border():
    """Within 5-10 px of a moving object's border DIS's patches mix in the static background and
    the flow comes out short; a second pass (--dis-passes 2), against the target resampled by
    the first flow, measures most of what is left."""
    import cv2

    for shift in ((4.0, 2.5), (7.0, -3.0)):
        source, inside = _object_over_background((0, 0))
        source = cv2.GaussianBlur(source, (0, 0), 0.8)    # a rendered model is a little soft
        target, _ = _object_over_background(shift)
        border = cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 5)
        band = inside & (border >= 5) & (border < 10)
        direction = np.float32(shift) / np.linalg.norm(shift)
        short = {}
        for passes in (1, 2):
            flow, _ = dis_module.dis_flow(source, target, TrackerOptions(flow="dis", dis_passes=passes,
                                                                          dis_consistency=0))
            along = flow[0] * direction[0] + flow[1] * direction[1] - np.linalg.norm(shift)
            short[passes] = float(np.median(along[band]))
            assert np.isfinite(flow[:, inside]).all()
        assert short[1] < -0.1 and abs(short[2]) < 0.5 * abs(short[1]), (shift, short)


def test_photometric_weights_on_normalised_images_ignore_the_light():
    """With --dis-normalize the photometric weights compare the normalised grey DIS matched:
    where the light moved (80 px here) the raw colours of right matches differ and their weights
    fall; on the normalised images they stay high."""
    source = _texture_under_light((0, 0), 0, amplitude=12.0)
    target = _texture_under_light((2.6, 1.7), -80, amplitude=12.0)
    low = {}
    for sigma in (0.0, 5.0):
        _, weights = dis_module.dis_flow(source, target, TrackerOptions(flow="dis", dis_normalize=sigma,
                                                                         dis_consistency=0))
        assert weights.shape == (240, 320) and ((weights >= 0) & (weights <= 1)).all()
        low[sigma] = float(np.percentile(weights[20:-20, 20:-20], 5))
    assert low[5.0] > 0.8 and low[0.0] < low[5.0] - 0.15, low


def test_normalised_images_find_moderate_shifts_but_not_large_ones():
    """The documented limit of --dis-normalize: a 20 px rigid shift is found like on plain grey;
    at 60 px the normalised images have lost the coarse structure DIS's coarse levels need, while
    plain grey still finds it (why pairs far apart keep plain grey)."""
    import cv2

    noise = np.random.default_rng(3).normal(size=(240, 320)).astype(np.float32)
    fine, coarse = cv2.GaussianBlur(noise, (0, 0), 1.5), cv2.GaussianBlur(noise, (0, 0), 12)
    # Texture at two scales, as in a photograph: fine detail and coarse blobs.
    gray = 128 + 15 * fine / fine.std() + 40 * coarse / coarse.std()
    image = np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    errors = {}
    for shift in (20.0, 60.0):
        moved = cv2.warpAffine(image, np.float32([[1, 0, shift], [0, 1, 0]]), (320, 240),
                               borderMode=cv2.BORDER_REFLECT)
        for sigma in (0.0, 5.0):
            flow, _ = dis_module.dis_flow(image, moved, TrackerOptions(flow="dis", dis_normalize=sigma,
                                                                        dis_passes=2, dis_consistency=0))
            inner = flow[:, 40:-40, 70:-70] - np.float32([shift, 0])[:, None, None]
            errors[(shift, sigma)] = float(np.median(np.linalg.norm(inner, axis=0)))
    assert errors[(20.0, 0.0)] < 0.5 and errors[(20.0, 5.0)] < 0.5, errors
    assert errors[(60.0, 0.0)] < 0.5 and errors[(60.0, 5.0)] > 5.0, errors

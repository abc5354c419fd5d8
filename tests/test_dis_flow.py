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

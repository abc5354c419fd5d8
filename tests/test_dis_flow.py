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

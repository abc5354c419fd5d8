"""The motion of a sequence: a smooth, continuous function of the frame index.

The object's rest vertices X live in its own frame (centred at the origin, x across, y down, z
away from the camera). Frame t (a float: the motion is defined between frames too) places them

    camera point = R0 (turn(t) D(X, t) + drift(t)) + c0

where D is the non-rigid part, applied in this order: bulges and wrinkles (displacements
along the rest normals), twist, bend; turn is a rigid rotation about an axis near the object's
vertical; R0, c0 are the rest placement. Every term is 0 (or the identity) at t = 0, so frame 0
shows the rest mesh, and every term is bounded in time (sinusoids and raised cosines), so a
sequence of any length stays in view and its background can be made once. Rates are in cycles
per frame; the parameters are drawn from a generator and stored as plain JSON (gt/motion.json).
"""
from typing import Dict, List, Sequence

import numpy as np

from dataset.synthetic.geometry import dot, rotate, rotation

COMPONENTS = ("bend", "twist", "bulge", "turn", "drift")


def _in_plane(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle), 0.0])


def _raised_cosine(t: float, period: float) -> float:
    """0 at t = 0, 1 at t = period, back to 0 at 2 period: a smooth there-and-back."""
    return 0.5 * (1.0 - np.cos(np.pi * t / period))


def _ramp(t: float, frames: float) -> float:
    """0 at t = 0 rising smoothly (C1) to 1 at t = frames, then 1."""
    return _raised_cosine(min(t, frames), frames)


def draw_motion(rng: np.random.Generator, components: Sequence[str], shape: str, size: float,
                scale: float, speed: float, detail: bool, rest: np.ndarray) -> Dict:
    """The parameters of a sequence's motion, a JSON-able dict. `rest` (V, 3) are the rest
    vertices in the object frame (bulge centres are drawn among them)."""
    closed = shape == "blob"
    motion: Dict = {"components": list(components), "size_m": size}
    if "bend" in components:
        # A closed body bends less than a sheet: its thickness would fold into itself.
        angle = (0.5 if closed else 1.0) * scale * np.deg2rad(rng.uniform(50, 100))
        motion["bend"] = {"axis_angle": float(rng.uniform(0, 2 * np.pi)),
                          "fold_at_m": float(rng.uniform(-0.15, 0.15) * size),
                          "angle_rad": float(angle * rng.choice([-1.0, 1.0])),
                          "period_frames": float(rng.uniform(60, 120) / speed)}
    if "twist" in components:
        motion["twist"] = {"axis_angle": float(rng.uniform(0, 2 * np.pi)),
                           "angle_rad": float(scale * np.deg2rad(rng.uniform(30, 60)) * rng.choice([-1.0, 1.0])),
                           "period_frames": float(rng.uniform(70, 130) / speed)}
    if "bulge" in components:
        motion["bulge"] = [{"centre_m": rest[rng.integers(rest.shape[0])].tolist(),
                            "radius_m": float(rng.uniform(0.1, 0.2) * size),
                            "height_m": float(scale * rng.uniform(0.04, 0.08) * size * rng.choice([-1.0, 1.0])),
                            "period_frames": float(rng.uniform(30, 70) / speed),
                            "phase": float(rng.uniform(0, 2 * np.pi))}
                           for _ in range(int(rng.integers(2, 5)))]
    if "turn" in components:
        # Turning a sheet far past 60 degrees shows little more than its edge.
        low, high = (50, 80) if closed else (35, 55)
        tilt = np.deg2rad(rng.uniform(-15, 15))
        motion["turn"] = {"axis": [float(np.sin(tilt)), float(np.cos(tilt)), 0.0],
                          "angle_rad": float(scale * np.deg2rad(rng.uniform(low, high)) * rng.choice([-1.0, 1.0])),
                          "period_frames": float(rng.uniform(40, 60) / speed)}
    if "drift" in components:
        direction = np.array([*_in_plane(rng.uniform(0, 2 * np.pi))[:2], rng.uniform(-0.5, 0.5)])
        motion["drift"] = {"shift_m": (scale * rng.uniform(0.05, 0.12) * direction
                                       / np.linalg.norm(direction)).tolist(),
                           "period_frames": float(rng.uniform(60, 100) / speed)}
    if detail:
        # Wrinkles 2.5-5 cm long, a few mm high, travelling 0.3-0.8 cm per frame: finer than
        # what a graph with 5 cm node spacing can bend, so only a dense model can follow them.
        waves: List[Dict] = []
        for _ in range(4):
            direction = rng.standard_normal(3)
            if not closed:
                direction[2] = 0.0
            direction /= max(np.linalg.norm(direction), 1e-12)
            wavelength = rng.uniform(0.025, 0.05)
            waves.append({"direction": direction.tolist(), "wavelength_m": float(wavelength),
                          "amplitude_m": float(scale * rng.uniform(0.002, 0.004)),
                          "speed_m_per_frame": float(speed * rng.uniform(0.003, 0.008)),
                          "phase": float(rng.uniform(0, 2 * np.pi))})
        motion["wrinkles"] = {"waves": waves, "ramp_frames": 8.0}
    return motion


def deform(motion: Dict, rest: np.ndarray, normals: np.ndarray, t: float) -> np.ndarray:
    """(V, 3) rest vertices and unit rest normals in the object frame -> (V, 3) at frame t, still
    in the object frame (the rest placement comes after). deform(., ., ., 0) = rest exactly."""
    x = rest.copy()
    if t == 0:
        return x
    offset = np.zeros(x.shape[0])
    for bump in motion.get("bulge", ()):
        height = bump["height_m"] * (np.sin(2 * np.pi * t / bump["period_frames"] + bump["phase"])
                                     - np.sin(bump["phase"]))
        r = bump["radius_m"]
        offset += height * np.exp(-((rest - np.array(bump["centre_m"])) ** 2).sum(-1) / (2 * r * r))
    if "wrinkles" in motion:
        ramp = _ramp(t, motion["wrinkles"]["ramp_frames"])
        for wave in motion["wrinkles"]["waves"]:
            k = 2 * np.pi / wave["wavelength_m"]
            offset += ramp * wave["amplitude_m"] * np.sin(
                k * (dot(rest, np.array(wave["direction"])) - wave["speed_m_per_frame"] * t) + wave["phase"])
    x = x + offset[:, None] * normals

    if "twist" in motion:
        p = motion["twist"]
        e1 = _in_plane(p["axis_angle"])
        a = dot(rest, e1)
        span = max(float(np.ptp(a)), 1e-9)
        angle = p["angle_rad"] * np.sin(2 * np.pi * t / p["period_frames"]) * a / span
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        x = x * c + np.cross(e1, x) * s + np.outer(dot(x, e1), e1) * (1 - c)

    if "bend" in motion:
        # The coordinate `along` e1 (from the fold line on) is wrapped onto a circle of
        # curvature kappa about an axis along e2; written with theta = kappa * along so that
        # kappa -> 0 (the straight sheet) needs no division by it.
        p = motion["bend"]
        e1, e3 = _in_plane(p["axis_angle"]), np.array([0.0, 0.0, 1.0])
        a = dot(rest, e1)
        span = max(float(np.ptp(a)), 1e-9)
        kappa = p["angle_rad"] * np.sin(2 * np.pi * t / p["period_frames"]) / span
        along = dot(x, e1) - p["fold_at_m"]
        h = dot(x, e3)
        theta = kappa * along
        sinc = np.sinc(theta / np.pi)                   # sin(theta) / theta
        cosc = np.where(np.abs(theta) > 1e-6, (1 - np.cos(theta)) / np.where(theta == 0, 1, theta), theta / 2)
        new_along = along * sinc - h * np.sin(theta)
        new_h = along * cosc + h * np.cos(theta)
        x = x + (new_along - along)[:, None] * e1 + (new_h - h)[:, None] * e3

    if "turn" in motion:
        p = motion["turn"]
        x = rotate(x, rotation(p["axis"], p["angle_rad"] * _raised_cosine(t, p["period_frames"])))
    if "drift" in motion:
        p = motion["drift"]
        x = x + np.array(p["shift_m"]) * _raised_cosine(t, p["period_frames"])
    return x

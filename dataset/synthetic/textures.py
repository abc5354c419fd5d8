"""Procedural textures: printed-fabric-like albedo for objects and plainer walls."""
import cv2
import numpy as np

def procedural_texture(rng: np.random.Generator, height: int, width: int, scale: float = 1.0,
                       saturation: float = 1.0, density: float = 1.0) -> np.ndarray:
    """(height, width, 3) float32 RGB in [0, 255], like a printed fabric: a palette of 4 colours,
    multi-octave noise (mostly in brightness), patches of stripes, many ellipses of the palette
    and fine grain, so that optical flow is trackable everywhere. `scale` multiplies feature
    sizes (texels), `saturation` the colourfulness, `density` the number of ellipses."""
    grey = rng.uniform(60, 200)
    palette = grey + saturation * rng.uniform(-90, 90, (4, 3)) + rng.uniform(-60, 60, (4, 1))
    palette = np.clip(palette, 0, 255)
    image = np.broadcast_to(palette[0], (height, width, 3)).astype(np.float32).copy()
    for cells, amplitude in ((3, 40), (9, 28), (25, 18), (70, 10)):
        gh = max(2, int(round(cells * height / max(height, width) / scale)))
        gw = max(2, int(round(cells * width / max(height, width) / scale)))
        grid = rng.standard_normal((gh, gw, 1)) * amplitude + \
            rng.standard_normal((gh, gw, 3)) * amplitude * 0.3 * saturation
        image += cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image, 0, 255).astype(np.uint8)

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(rng.integers(1, 4)):
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(6, 30) * scale
        phase = np.cos(angle) * x + np.sin(angle) * y
        stripes = np.sin(2 * np.pi * phase / period + rng.uniform(0, 2 * np.pi)) > rng.uniform(-0.5, 0.5)
        x0, x1 = np.sort(rng.uniform(0, width, 2))
        y0, y1 = np.sort(rng.uniform(0, height, 2))
        region = (x >= x0) & (x <= max(x1, x0 + width / 4)) & (y >= y0) & (y <= max(y1, y0 + height / 4))
        image[stripes & region] = palette[rng.integers(1, 4)].astype(np.uint8)

    count = int(density * rng.uniform(0.5, 1.5) * height * width / (45 * scale) ** 2) + 8
    for _ in range(count):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (max(1, int(rng.uniform(1.5, 18) * scale)), max(1, int(rng.uniform(1.5, 18) * scale)))
        colour = np.clip(palette[rng.integers(0, 4)] + rng.uniform(-50, 50), 0, 255)
        thickness = -1 if rng.uniform() < 0.7 else max(1, int(rng.uniform(1, 3) * scale))
        cv2.ellipse(image, center, axes, float(rng.uniform(0, 180)), 0, 360,
                    tuple(float(c) for c in colour), thickness, cv2.LINE_AA)
    grain = rng.standard_normal((height, width, 1)).astype(np.float32) * 8
    return np.clip(image.astype(np.float32) + grain, 0, 255)


# The photographs and scans that ship inside scikit-image's wheel (skimage.data loads them from
# the package, no download): real appearance for the objects of training pairs. Grey ones are
# tinted with a random colour.
PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket", "page", "text",
          "clock")
_photo_cache = {}


def _photo(name: str) -> np.ndarray:
    if name not in _photo_cache:
        try:
            import skimage.data   # optional: only --textures photos|mixed needs it
        except ImportError as error:
            raise ValueError("--textures photos|mixed needs scikit-image (optional: pip install "
                             "scikit-image==0.26.0)") from error
        image = getattr(skimage.data, name)()
        _photo_cache[name] = image if image.ndim == 3 else image[..., None]
    return _photo_cache[name]


def photo_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width, 3) float32 RGB in [0, 255]: a random crop (30-100 % of the photograph's
    shorter side, the texture's aspect), flip and quarter turn of one of PHOTOS, resized."""
    image = _photo(PHOTOS[rng.integers(len(PHOTOS))])
    if rng.uniform() < 0.5:
        image = image[:, ::-1]
    image = np.rot90(image, int(rng.integers(4)))
    h, w = image.shape[:2]
    aspect = height / width
    side = rng.uniform(0.3, 1.0)
    crop_h = max(8, int(side * min(h, w * aspect)))
    crop_w = max(8, min(w, int(crop_h / aspect)))
    y0 = int(rng.integers(0, h - crop_h + 1))
    x0 = int(rng.integers(0, w - crop_w + 1))
    crop = np.ascontiguousarray(image[y0:y0 + crop_h, x0:x0 + crop_w]).astype(np.float32)
    if crop.shape[-1] == 1:
        tint = rng.uniform(0.6, 1.0, 3).astype(np.float32)
        crop = crop * tint
    interpolation = cv2.INTER_AREA if crop_w > width else cv2.INTER_CUBIC
    out = cv2.resize(crop, (width, height), interpolation=interpolation)
    out = out.reshape(height, width, -1)
    return np.clip(np.broadcast_to(out, (height, width, 3)), 0, 255).astype(np.float32)


def object_texture(rng: np.random.Generator, height: int, width: int, scale: float,
                   kind: str = "procedural") -> np.ndarray:
    """The texture of a procedural object: `kind` procedural (procedural_texture), photos
    (photo_texture) or mixed (either, even odds). procedural draws exactly what it always did,
    so the pairs of earlier runs stay byte-identical."""
    if kind == "procedural":
        return procedural_texture(rng, height, width, scale)
    if kind == "photos" or rng.uniform() < 0.5:
        return photo_texture(rng, height, width)
    return procedural_texture(rng, height, width, scale)

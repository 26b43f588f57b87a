"""Render chest-radiograph-like grayscale images with localised findings (numpy + scipy.ndimage only).

The picture is built like a radiograph is read: soft-tissue body, dark aerated lungs with vessel markings,
bright heart/mediastinum/spine, ribs and clavicles, diaphragm domes, then the findings added as densities
(or, for a pneumothorax, as a rim of air without lung markings), blur, quantum noise and an exposure curve.
All geometry is in normalised coordinates (u = column / size, v = row / size), so 256 px and 448 px images
show the same anatomy. Every lesion also yields a boolean mask, so boxes and segmentation labels come from
exactly the pixels that were changed.

Sides are the patient's: on a frontal image the patient's right lung is on the image's LEFT (u < 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from models.synth.findings import Finding

# Density added per finding kind and severity (image intensity units; aerated lung is ~0.2, soft tissue ~0.5).
_INTENSITY = {
    "opacity": {"mild": 0.12, "moderate": 0.18, "severe": 0.25},
    "consolidation": {"mild": 0.20, "moderate": 0.27, "severe": 0.34},
    "pneumonia": {"mild": 0.16, "moderate": 0.23, "severe": 0.30},
    "atelectasis": {"mild": 0.20, "moderate": 0.25, "severe": 0.30},
    "edema": {"mild": 0.11, "moderate": 0.16, "severe": 0.21},
    "effusion": {"small": 0.30, "moderate": 0.32, "large": 0.34},
    "nodule": {"small": 0.22, "large": 0.26},
    "mass": {"small": 0.26, "large": 0.30},
}
# Lesion radius (normalised) per kind and severity.
_RADIUS = {
    "opacity": {"mild": 0.055, "moderate": 0.075, "severe": 0.095},
    "consolidation": {"mild": 0.045, "moderate": 0.065, "severe": 0.085},
    "pneumonia": {"mild": 0.05, "moderate": 0.07, "severe": 0.09},
    "nodule": {"small": 0.014, "large": 0.024},
    "mass": {"small": 0.04, "large": 0.06},
}
_EFFUSION_HEIGHT = {"small": 0.07, "moderate": 0.15, "large": 0.27}  # fraction of lung height from the base
_PNEUMOTHORAX = {"small": (0.022, 0.35), "moderate": (0.04, 0.55), "large": (0.065, 0.8)}  # rim width, extent
_ATELECTASIS_THICKNESS = {"mild": 0.010, "moderate": 0.018, "severe": 0.030}
_CARDIOMEGALY_CTR = {"mild": 0.56, "moderate": 0.61, "severe": 0.67}  # cardiothoracic ratio
_ZONE_T = {"upper": (0.14, 0.32), "middle": (0.40, 0.58), "lower": (0.64, 0.78), "apex": (0.0, 0.15)}


@dataclass(frozen=True)
class Anatomy:
    """One patient's body habitus; kept across that patient's studies so follow-ups look like the same
    person."""

    mid_u: float  # midline
    apex_v: float  # lung apices
    base_v: float  # lateral costophrenic angles (patient's left); the right dome sits higher
    right_raise: float
    lung_w: float  # width of one lung
    med_d: float  # half-width of the mediastinum between the lungs
    dome_h: float  # height of the diaphragm domes
    heart_ctr: float  # cardiothoracic ratio (normal < 0.5)
    heart_v: float  # heart centre row
    body_w: float  # half-width of the torso
    rib_v0: float
    rib_spacing: float
    markings_seed: int  # the patient's own vessel pattern
    gamma: float  # exposure curve


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw a plausible adult habitus (ranges chosen so lungs, heart and ribs stay inside a square frame)."""
    return Anatomy(
        mid_u=0.5 + rng.normal(0, 0.008),
        apex_v=rng.uniform(0.12, 0.16),
        base_v=rng.uniform(0.74, 0.80),
        right_raise=rng.uniform(0.015, 0.035),
        lung_w=rng.uniform(0.29, 0.33),
        med_d=rng.uniform(0.05, 0.06),
        dome_h=rng.uniform(0.05, 0.085),
        heart_ctr=rng.uniform(0.40, 0.48),
        heart_v=rng.uniform(0.58, 0.62),
        body_w=rng.uniform(0.44, 0.48),
        rib_v0=rng.uniform(0.11, 0.14),
        rib_spacing=rng.uniform(0.058, 0.066),
        markings_seed=int(rng.integers(2**31)),
        gamma=rng.uniform(0.85, 1.15),
    )


@dataclass(frozen=True)
class Lesion:
    """The pixels one finding changed on one side (bilateral findings give one lesion per lung)."""

    finding: Finding
    side: str | None
    mask: np.ndarray  # bool [H, W]

    def box(self) -> tuple[int, int, int, int]:
        """Pixel box (x1, y1, x2, y2) of the mask; x2/y2 are exclusive, so width = x2 - x1."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        cols = np.flatnonzero(self.mask.any(axis=0))
        return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@dataclass(frozen=True)
class Radiograph:
    pixels: np.ndarray  # uint8 [H, W]
    lesions: list[Lesion]


class _Grid:
    """Normalised pixel coordinates plus the lung/heart shapes of one anatomy at one image size."""

    def __init__(self, anatomy: Anatomy, size: int, heart_ctr: float) -> None:
        self.a = anatomy
        self.size = size
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.v, self.u = np.meshgrid(coords, coords, indexing="ij")
        self.d = np.abs(self.u - anatomy.mid_u)  # distance from the midline
        self.t = (self.v - anatomy.apex_v) / (anatomy.base_v - anatomy.apex_v)  # 0 apex .. 1 base
        self.lung = {side: self._lung_mask(side) for side in ("right", "left")}
        self.heart = self.heart_mask(heart_ctr)

    def visible_lung(self, side: str, u: float, v: float) -> bool:
        """Is (u, v) aerated lung of `side` not hidden by the heart (where a lesion would show)?"""
        row, col = int(v * self.size), int(u * self.size)
        if not (0 <= row < self.size and 0 <= col < self.size):
            return False
        return bool(self.lung[side][row, col] and not self.heart[row, col])

    def on_side(self, side: str) -> np.ndarray:
        """Pixels on the patient's `side` of the midline (patient right = image left)."""
        return self.u < self.a.mid_u if side == "right" else self.u >= self.a.mid_u

    def base_v(self, side: str) -> float:
        return self.a.base_v - (self.a.right_raise if side == "right" else 0.0)

    def medial(self, t: np.ndarray | float) -> np.ndarray:
        return self.a.med_d + self.a.lung_w * 0.35 * (1 - np.sqrt(np.clip(np.asarray(t) / 0.15, 0, 1)))

    def lateral(self, t: np.ndarray | float) -> np.ndarray:
        return self.a.med_d + self.a.lung_w * (0.35 + 0.65 * np.sqrt(np.clip(np.asarray(t) / 0.6, 0, 1)))

    def dome_v(self, side: str, d: np.ndarray | float) -> np.ndarray:
        """Row of the diaphragm under distance d from the midline: highest mid-lung, lowest at the angles."""
        half = self.a.lung_w / 2
        shape = np.clip(1 - ((np.asarray(d) - self.a.med_d - half) / half) ** 2, 0, 1)
        return self.base_v(side) - self.a.dome_h * shape

    def _lung_mask(self, side: str) -> np.ndarray:
        t, d = self.t, self.d
        inside = (t >= 0) & (d >= self.medial(t)) & (d <= self.lateral(t)) & (self.v <= self.dome_v(side, d))
        return inside & self.on_side(side)

    def heart_mask(self, ctr: float) -> np.ndarray:
        """Heart as an ellipse whose width is ctr x thoracic width, sitting two thirds to the patient's
        left."""
        thorax = 2 * (self.a.med_d + self.a.lung_w)
        half_w = ctr * thorax / 2
        centre_u = self.a.mid_u + 0.4 * half_w
        half_h = 0.09 + 0.3 * half_w
        du, dv = self.u - centre_u, self.v - self.a.heart_v - 0.03
        x, y = du * 0.94 - dv * 0.34, du * 0.34 + dv * 0.94  # long axis tilted down to the patient's left
        return ((x / half_w) ** 2 + (y / half_h) ** 2 < 1) & (self.v <= self.a.base_v - 0.01)

    def u_of(self, side: str, d: float) -> float:
        return self.a.mid_u - d if side == "right" else self.a.mid_u + d


def _soft(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma_px)


def _smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-variance spatially correlated noise (texture of lung markings and patchy lesions)."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma_px)
    return field / (field.std() + 1e-12)


def _vessel_markings(grid: _Grid) -> np.ndarray:
    """Branching vessel-like lines (ridges of smooth noise), denser towards the hila."""
    rng = np.random.default_rng(grid.a.markings_seed)
    ridges = np.exp(-((_smooth_noise(rng, grid.size, 0.012 * grid.size) / 0.22) ** 2))
    hilum_dist = np.minimum(
        np.hypot(grid.u - grid.u_of("right", 0.10), grid.v - 0.42),
        np.hypot(grid.u - grid.u_of("left", 0.10), grid.v - 0.42),
    )
    return ridges * (0.25 + 0.75 * np.exp(-hilum_dist / 0.16))


def _ribs(grid: _Grid) -> np.ndarray:
    """Posterior ribs (arcs rising from the spine, falling laterally) and fainter anterior ribs (sloping down
    towards the midline), brighter at their cortex. Each family is one warped periodic pattern, so the cost
    does not grow with the number of ribs."""
    a = grid.a
    x = np.clip(grid.d - 0.04, 0, None)
    within = (grid.d > 0.035) & (grid.d < grid.lateral(np.clip(grid.t, 0, 1)) + 0.03) & (grid.t < 1.0)
    half, stretch = 0.009, 0.03  # rib half-thickness; rib k sits at v0 + spacing * k * (1 + stretch * k)
    out = np.zeros_like(grid.u)
    for shape, weight in ((-0.25 * x + 1.5 * x**2, 1.0), (0.09 + 0.35 * (0.3 - x), 0.45)):
        w = np.clip((grid.v - shape - a.rib_v0) / a.rib_spacing, -0.5, None)
        k = np.clip(np.round((np.sqrt(1 + 4 * stretch * w) - 1) / (2 * stretch)), 0, 9)
        offset = (w - k * (1 + stretch * k)) * a.rib_spacing / half
        band = np.exp(-(offset**4)) * (0.6 + 0.4 * np.abs(offset).clip(0, 1))
        out = np.maximum(out, weight * band * within)
    return out


def _clavicles(grid: _Grid) -> np.ndarray:
    x = grid.d - 0.04
    centre = 0.17 - 0.22 * x
    band = np.exp(-(((grid.v - centre) / 0.013) ** 4))
    return band * (x > 0) * (x < 0.30)


def _zone_centre(grid: _Grid, side: str, zone: str, rng: np.random.Generator) -> tuple[float, float]:
    """A random point well inside the given lung zone (kept lateral in the lower zone, clear of the heart)."""
    a = grid.a
    lo, hi = _ZONE_T[zone]
    for _ in range(50):
        t = rng.uniform(lo, hi)
        med, lat = float(grid.medial(t)), float(grid.lateral(t))
        frac = rng.uniform(0.45, 0.75) if zone == "lower" else rng.uniform(0.25, 0.75)
        d = med + frac * (lat - med)
        v = a.apex_v + t * (a.base_v - a.apex_v)
        clear = grid.visible_lung(side, grid.u_of(side, d), v) and grid.visible_lung(
            side, grid.u_of(side, d - 0.03), v
        )
        if v < float(grid.dome_v(side, d)) - 0.03 and clear:
            return grid.u_of(side, d), v
    t = 0.5
    return grid.u_of(side, float(grid.medial(t) + grid.lateral(t)) / 2), a.apex_v + t * (a.base_v - a.apex_v)


def _ellipse_dist(grid: _Grid, centre: tuple[float, float], r: float, rng: np.random.Generator) -> np.ndarray:
    """Distance to `centre` in units of an elliptical radius around r with a random aspect and tilt."""
    aspect = rng.uniform(0.75, 1.3)
    angle = rng.uniform(0, np.pi)
    du, dv = grid.u - centre[0], grid.v - centre[1]
    x = du * np.cos(angle) + dv * np.sin(angle)
    y = -du * np.sin(angle) + dv * np.cos(angle)
    return np.hypot(x / (r * aspect), y / (r / aspect))


def _airspace(grid: _Grid, f: Finding, side: str, rng: np.random.Generator) -> np.ndarray:
    """Envelope (0..1) of an opacity / consolidation / pneumonia / nodule / mass in one lung zone."""
    r = _RADIUS[f.kind][f.severity]
    centre = _zone_centre(grid, side, f.zone, rng)  # type: ignore[arg-type]
    if f.kind == "opacity":
        patchy = np.clip(0.55 + 0.45 * _smooth_noise(rng, grid.size, 0.012 * grid.size), 0, 1.2)
        return np.exp(-(_ellipse_dist(grid, centre, r, rng) ** 2)) * patchy
    if f.kind == "consolidation":
        bronchograms = np.exp(-((_smooth_noise(rng, grid.size, 0.008 * grid.size) / 0.15) ** 2))
        return np.exp(-(_ellipse_dist(grid, centre, r, rng) ** 4)) * (1 - 0.35 * bronchograms)
    if f.kind == "pneumonia":
        env = np.zeros_like(grid.u)
        for _ in range(3):  # multifocal patchy consolidation
            sub = (centre[0] + rng.normal(0, r / 2), centre[1] + rng.normal(0, r / 2))
            env = np.maximum(env, np.exp(-(_ellipse_dist(grid, sub, 0.7 * r, rng) ** 2)))
        patchy = np.clip(0.7 + 0.3 * _smooth_noise(rng, grid.size, 0.01 * grid.size), 0, 1.2)
        return env * patchy
    if f.kind == "nodule":
        return np.exp(-((np.hypot(grid.u - centre[0], grid.v - centre[1]) / r) ** 6))
    # mass: lobulated outline
    theta = np.arctan2(grid.v - centre[1], grid.u - centre[0])
    phase = rng.uniform(0, 2 * np.pi, size=2)
    radius = r * (1 + 0.12 * np.sin(3 * theta + phase[0]) + 0.07 * np.sin(5 * theta + phase[1]))
    return np.exp(-((np.hypot(grid.u - centre[0], grid.v - centre[1]) / radius) ** 6))


def _effusion(grid: _Grid, f: Finding, side: str) -> np.ndarray:
    """Basal whiteout under a meniscus that climbs laterally, blunting the costophrenic angle."""
    a = grid.a
    h = _EFFUSION_HEIGHT[f.severity] * (a.base_v - a.apex_v)
    rel = np.clip((grid.d - a.med_d) / a.lung_w, 0, 1)
    level = grid.base_v(side) - a.dome_h * 0.6 - h - 0.05 * rel**2
    depth = (grid.v - level) / max(h, 1e-6)
    return np.clip(0.25 + 2.5 * depth, 0, 1) * (grid.v > level)


def _atelectasis(grid: _Grid, f: Finding, side: str, rng: np.random.Generator) -> np.ndarray:
    """Plate-like band just above the dome, thicker with severity."""
    a = grid.a
    for _ in range(50):  # centre on visible lung, lateral to the heart
        d = a.med_d + rng.uniform(0.45, 0.85) * a.lung_w
        v = float(grid.dome_v(side, d)) - rng.uniform(0.035, 0.05) - _ATELECTASIS_THICKNESS[f.severity]
        if grid.visible_lung(side, grid.u_of(side, d), v):
            break
    half_len = rng.uniform(0.25, 0.35) * a.lung_w
    tilt = rng.uniform(-0.25, 0.25)
    du, dv = grid.u - grid.u_of(side, d), grid.v - v
    x = du * np.cos(tilt) + dv * np.sin(tilt)
    y = -du * np.sin(tilt) + dv * np.cos(tilt)
    return np.exp(-(((x / half_len) ** 2 + (y / _ATELECTASIS_THICKNESS[f.severity]) ** 2) ** 2))


def _edema(grid: _Grid, side: str, rng: np.random.Generator) -> np.ndarray:
    """Perihilar haze fading towards the periphery ("bat wing")."""
    centre = (grid.u_of(side, grid.a.med_d + 0.09), 0.45)
    haze = np.exp(-((np.hypot(grid.u - centre[0], grid.v - centre[1]) / 0.15) ** 2))
    return haze * np.clip(0.8 + 0.2 * _smooth_noise(rng, grid.size, 0.01 * grid.size), 0, 1.2)


def _pneumothorax_rim(grid: _Grid, f: Finding, side: str) -> tuple[np.ndarray, np.ndarray]:
    """(rim of pleural air along the apex/lateral wall, thin visceral pleural line at its inner edge)."""
    width, extent = _PNEUMOTHORAX[f.severity]
    lung = grid.lung[side]
    depth = ndimage.distance_transform_edt(lung) / grid.size  # distance from the chest wall, inside the lung
    wall = (grid.t < extent) & ((grid.d > grid.a.med_d + 0.3 * grid.a.lung_w) | (grid.t < 0.1))
    rim = lung & wall & (depth < width)
    line = np.exp(-(((depth - width) / 0.003) ** 2)) * lung * wall
    return rim, line


def render_frontal(
    anatomy: Anatomy, findings: list[Finding], size: int, seed: int, portable: bool = False
) -> Radiograph:
    """Render a frontal (PA, or AP when `portable`) radiograph and the lesion masks of `findings`.

    `seed` drives lesion placement and image noise through two independent streams, so the same seed with
    and without a finding gives the same noise: the difference image is exactly the finding.
    """
    noise_rng, lesion_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    if portable:  # AP supine films: shallower inspiration
        anatomy = replace(anatomy, base_v=anatomy.base_v - 0.03)
    cardiomegaly = next((f for f in findings if f.kind == "cardiomegaly"), None)
    ctr = _CARDIOMEGALY_CTR[cardiomegaly.severity] if cardiomegaly else anatomy.heart_ctr
    grid = _Grid(anatomy, size, ctr * (1.04 if portable else 1.0))
    px = size / 256  # blur widths are defined at 256 px
    heart = grid.heart
    lung_any = grid.lung["right"] | grid.lung["left"]
    aerated = _soft(lung_any & ~heart, 1.5 * px)

    body = _soft(
        grid.d < anatomy.body_w * np.clip(0.35 + 0.65 * np.sqrt(np.clip(grid.v / 0.17, 0, 1)), 0, 1), 2 * px
    )
    thickness = np.clip(1 - (grid.d / anatomy.body_w) ** 2, 0, 1)  # more tissue in the middle of the chest
    img = 0.04 + body * (0.42 + 0.16 * thickness)
    img -= 0.36 * aerated * (0.75 + 0.25 * np.clip(grid.t, 0, 1))
    img += 0.04 * _soft(heart, 1.5 * px)
    markings = _vessel_markings(grid) * aerated

    lesions: list[Lesion] = []
    density = np.zeros_like(img)
    for f in findings:
        if f.kind == "cardiomegaly":
            lesions.append(Lesion(f, None, heart))
            continue
        for side in f.sides:
            lung = grid.lung[side]
            if f.kind == "pneumothorax":
                rim, line = _pneumothorax_rim(grid, f, side)
                soft_rim = _soft(rim, 0.7 * px)
                markings = markings * (1 - soft_rim)
                density += -0.09 * soft_rim + 0.10 * line
                lesions.append(Lesion(f, side, rim))
                continue
            if f.kind == "effusion":
                env = _effusion(grid, f, side)
            elif f.kind == "atelectasis":
                env = _atelectasis(grid, f, side, lesion_rng)
            elif f.kind == "edema":
                env = _edema(grid, side, lesion_rng)
            else:
                env = _airspace(grid, f, side, lesion_rng)
            shown = env * _soft(lung & ~heart, 1.0 * px)
            density += _INTENSITY[f.kind][f.severity] * shown
            mask = (shown > 0.35) & lung
            if not mask.any():  # wholly behind the heart: a retrocardiac lesion is still there
                mask = (env > 0.35) & lung
            lesions.append(Lesion(f, side, mask))

    img += 0.10 * markings + np.clip(density, -0.2, 0.4)
    img += 0.06 * _soft(grid.d < 0.04, 1.5 * px) * (0.8 + 0.2 * np.cos(2 * np.pi * grid.v / 0.05))  # spine
    img -= 0.10 * _soft((grid.d < 0.012) & (grid.v < 0.36), 1.0 * px)  # tracheal air column
    img += 0.07 * _ribs(grid) * body + 0.12 * _clavicles(grid) * body
    bubble = np.hypot(
        (grid.u - grid.u_of("left", anatomy.med_d + 0.12)) / 0.05, (grid.v - anatomy.base_v - 0.03) / 0.025
    )
    img -= 0.15 * _soft(bubble < 1, 2 * px)  # gastric air under the left dome

    img = ndimage.gaussian_filter(img, 0.6 * px)
    img += 0.015 * noise_rng.standard_normal(img.shape) + 0.02 * _smooth_noise(noise_rng, size, 20 * px)
    img = np.clip(img, 0, 1) ** anatomy.gamma
    return Radiograph(pixels=np.round(img * 255).astype(np.uint8), lesions=lesions)


def render_lateral(anatomy: Anatomy, size: int, seed: int) -> np.ndarray:
    """A lateral view (anterior to the image left): overlapping lungs, heart in front, spine behind."""
    rng = np.random.default_rng(seed)
    coords = (np.arange(size) + 0.5) / size
    v, u = np.meshgrid(coords, coords, indexing="ij")
    px = size / 256
    body = _soft((np.abs(u - 0.5) / 0.36) ** 2 + (np.clip(0.25 - v, 0, None) / 0.2) ** 2 < 1, 2 * px)
    dome = anatomy.base_v - anatomy.dome_h * (1 - ((u - 0.5) / 0.3) ** 2).clip(0, 1)
    lungs = (np.abs(u - 0.52) < 0.27 * np.sqrt(np.clip((v - anatomy.apex_v) / 0.3, 0, 1))) & (v < dome)
    heart = ((u - 0.36) / 0.14) ** 2 + ((v - 0.62) / 0.15) ** 2 < 1
    spine = np.abs(u - 0.80) < 0.05
    img = 0.05 + 0.45 * body - 0.25 * _soft(lungs & ~heart, 1.5 * px) + 0.05 * _soft(heart, 1.5 * px)
    img += 0.15 * _soft(spine, 1.5 * px) * body * (0.7 + 0.3 * (np.cos(2 * np.pi * v / 0.055) > -0.6))
    img += 0.08 * _soft(np.abs(u - 0.17) < 0.012, 1 * px) * body  # sternum
    img = ndimage.gaussian_filter(img, 0.6 * px) + 0.015 * rng.standard_normal(img.shape)
    return np.round(np.clip(img, 0, 1) ** anatomy.gamma * 255).astype(np.uint8)

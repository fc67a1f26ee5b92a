"""SynthFaces: a procedural face renderer with explicit identity and nuisance factors.

A *world* is fixed by a seed. In it, identity `i` has shape and appearance factors (face outline,
eye/brow/nose/mouth geometry, skin, hair, iris and lip colour) drawn from its group's prior, and
image `j` of identity `i` has nuisance factors (yaw, pitch, roll, light, expression, resolution,
blur, noise, glasses, mask, background) drawn from distributions the user sets. All randomness
comes from a counter-based integer hash of (seed, identity, image, factor), so:

* the same (identity, image) renders the same bytes in any batch, on any run;
* no state is stored: 10,000 identities x 50 images cost nothing until rendered;
* changing one nuisance distribution leaves every other factor of every image unchanged
  (each distribution maps the same per-image uniform number through its inverse CDF).

Rendering is batched pure PyTorch on the device of your choice. The face is a head ellipsoid with
Lambertian shading; features live on its surface and are rotated by yaw and pitch (they shift,
foreshorten and fade when they turn away: self-occlusion), the whole image by roll. Resolution is
a down-sample then up-sample to the output size, blur a Gaussian, noise additive.

    world = SynthFaces(range(0, 1000), images_per_identity=20, seed=0)
    images, labels, meta = world.batch(torch.arange(64))     # 64 x 3 x 64 x 64 in [0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from ..hparams import code_digest

# ---------------------------------------------------------------- counter-based randomness
_M32 = 0xFFFFFFFF
_C = 0x45D9F3B  # < 2**31, so a 32-bit value times it fits in int64 without overflow


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Mueller's), computed in int64 so it is exact on every device."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * _C) & _M32
    x = ((x ^ (x >> 16)) * _C) & _M32
    return x ^ (x >> 16)


def hash_uniform(*keys: torch.Tensor | int) -> torch.Tensor:
    """Uniform numbers in (0, 1), a pure function of the integer keys (broadcast together)."""
    h = torch.as_tensor(0x9E3779B9, dtype=torch.int64)
    for k in keys:
        k = torch.as_tensor(k, dtype=torch.int64)
        h = _mix(h.to(k.device) + _mix(k + 0x7F4A7C15))
    return (h.double() + 0.5) / 2**32


# ---------------------------------------------------------------- sampling distributions
@dataclass(frozen=True)
class Normal:
    """Normal(mean, std) truncated to [lo, hi] (by clamping)."""

    mean: float = 0.0
    std: float = 1.0
    lo: float = -math.inf
    hi: float = math.inf

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return (self.mean + self.std * torch.special.ndtri(u)).clamp(self.lo, self.hi)


@dataclass(frozen=True)
class Uniform:
    lo: float = 0.0
    hi: float = 1.0

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * u


@dataclass(frozen=True)
class Bernoulli:
    p: float = 0.5

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return (u < self.p).double()


@dataclass(frozen=True)
class Const:
    value: float = 0.0

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return torch.full_like(u, self.value)


@dataclass(frozen=True)
class Nuisance:
    """How each nuisance factor is distributed. Angles in degrees; resolution is the factor by
    which the image is down-sampled (1 = full resolution, 4 = a quarter of the pixels per side)."""

    yaw: Normal | Uniform | Const = Normal(0.0, 25.0, -90.0, 90.0)
    pitch: Normal | Uniform | Const = Normal(0.0, 10.0, -40.0, 40.0)
    roll: Normal | Uniform | Const = Normal(0.0, 8.0, -30.0, 30.0)
    light_azimuth: Normal | Uniform | Const = Uniform(-70.0, 70.0)
    light_strength: Normal | Uniform | Const = Uniform(0.3, 0.9)
    expression: Normal | Uniform | Const = Uniform(-1.0, 1.0)
    resolution: Normal | Uniform | Const = Normal(1.0, 1.2, 1.0, 8.0)
    blur: Normal | Uniform | Const = Normal(0.0, 0.4, 0.0, 2.0)
    noise: Normal | Uniform | Const = Normal(0.0, 0.03, 0.0, 0.15)
    glasses: Bernoulli | Const = Bernoulli(0.15)
    mask: Bernoulli | Const = Bernoulli(0.05)
    background: Normal | Uniform | Const = Uniform(0.0, 1.0)
    exposure: Normal | Uniform | Const = Normal(1.0, 0.2, 0.5, 1.6)  # a gain on the whole image
    white_balance: Normal | Uniform | Const = Normal(0.0, 0.08, -0.25, 0.25)  # > 0 warmer, < 0 colder

    @staticmethod
    def frontal() -> Nuisance:
        """Easy conditions: frontal, sharp, unoccluded, even light."""
        return Nuisance(
            yaw=Const(0),
            pitch=Const(0),
            roll=Const(0),
            light_azimuth=Const(0),
            light_strength=Const(0.5),
            expression=Const(0),
            resolution=Const(1),
            blur=Const(0),
            noise=Const(0),
            glasses=Const(0),
            mask=Const(0),
            exposure=Const(1),
            white_balance=Const(0),
        )


NUISANCES = tuple(f.name for f in fields(Nuisance))

# values that show each nuisance's range, for grids and sliders: (min, max, a few values)
SWEEPS = {
    "yaw": (-90, 90, [-80, -50, -25, 0, 25, 50, 80]),
    "pitch": (-40, 40, [-35, -20, -10, 0, 10, 20, 35]),
    "roll": (-30, 30, [-30, -15, -5, 0, 5, 15, 30]),
    "light_azimuth": (-70, 70, [-70, -45, -20, 0, 20, 45, 70]),
    "light_strength": (0, 1, [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]),
    "expression": (-1, 1, [-1.0, -0.6, -0.3, 0.0, 0.3, 0.6, 1.0]),
    "resolution": (1, 8, [1, 1.5, 2, 3, 4, 6, 8]),
    "blur": (0, 2, [0.0, 0.3, 0.6, 0.9, 1.2, 1.6, 2.0]),
    "noise": (0, 0.15, [0.0, 0.02, 0.04, 0.06, 0.08, 0.11, 0.15]),
    "glasses": (0, 1, [0, 1]),
    "mask": (0, 1, [0, 1]),
    "background": (0, 1, [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]),
    "exposure": (0.5, 1.6, [0.5, 0.7, 0.85, 1.0, 1.15, 1.3, 1.6]),
    "white_balance": (-0.25, 0.25, [-0.25, -0.15, -0.05, 0.0, 0.05, 0.15, 0.25]),
}


# ---------------------------------------------------------------- identity factors and groups
# (name, low, high): a factor is low + (high - low) * sigmoid(group offset + spread * z), z ~ N(0, 1)
SHAPE = (
    ("face_w", 0.52, 0.74),
    ("face_h", 0.72, 0.90),
    ("jaw", 0.0, 0.45),
    ("eye_x", 0.20, 0.34),
    ("eye_y", 0.08, 0.26),
    ("eye_w", 0.08, 0.15),
    ("eye_h", 0.035, 0.08),
    ("brow_gap", 0.06, 0.16),
    ("brow_tilt", -0.35, 0.35),
    ("brow_thick", 0.015, 0.05),
    ("nose_y", -0.20, -0.04),
    ("nose_len", 0.05, 0.25),
    ("nose_w", 0.05, 0.12),
    ("mouth_y", -0.50, -0.30),
    ("mouth_w", 0.12, 0.30),
    ("lip", 0.02, 0.06),
    ("hairline", 0.35, 0.80),
    ("hair_volume", 0.0, 0.18),
    ("iris", 0.45, 0.85),
    ("head_depth", 1.0, 1.35),
    ("ear", 0.08, 0.14),
)
COLOUR = (("skin", 3), ("hair", 3), ("eye", 3), ("lips", 3))
SHAPE_NAMES = tuple(n for n, _, _ in SHAPE)


@dataclass(frozen=True)
class Group:
    """A demographic-like group: an appearance prior and a between-identity spread.

    `spread` scales how far identities deviate from the group's mean shape: a group with a small
    spread has identities that look alike, so a model separates them less well.
    """

    name: str = "all"
    weight: float = 1.0
    spread: float = 1.0
    skin: tuple[float, float, float] = (0.80, 0.62, 0.50)
    hair: tuple[float, float, float] = (0.25, 0.18, 0.12)
    colour_spread: float = 0.06
    shape_offset: float = 0.0  # shifts every shape factor's mean (in logit units)


DEFAULT_GROUPS = (Group(),)


def _draw_identities(ids: torch.Tensor, seed: int, groups: Sequence[Group]) -> dict[str, torch.Tensor]:
    """Identity factors of global identity ids (float64, on ids' device)."""
    w = torch.tensor([g.weight for g in groups], dtype=torch.float64, device=ids.device)
    cdf = torch.cumsum(w / w.sum(), 0)
    group = torch.searchsorted(cdf, hash_uniform(seed, ids, -1, 0).contiguous()).clamp(max=len(groups) - 1)
    spread = torch.tensor([g.spread for g in groups], dtype=torch.float64, device=ids.device)[group]
    offset = torch.tensor([g.shape_offset for g in groups], dtype=torch.float64, device=ids.device)[group]
    out: dict[str, torch.Tensor] = {"group": group}
    for k, (name, lo, hi) in enumerate(SHAPE):
        z = torch.special.ndtri(hash_uniform(seed, ids, -1, 1 + k))
        out[name] = lo + (hi - lo) * torch.sigmoid(offset + 1.2 * spread * z)
    base = {"skin": [g.skin for g in groups], "hair": [g.hair for g in groups]}
    for c, (name, dim) in enumerate(COLOUR):
        z = torch.special.ndtri(hash_uniform(seed, ids[:, None], -2, 10 * c + torch.arange(dim, device=ids.device)))
        if name in base:
            mean = torch.tensor(base[name], dtype=torch.float64, device=ids.device)[group]
            cs = torch.tensor([g.colour_spread for g in groups], dtype=torch.float64, device=ids.device)[group]
            shade = torch.special.ndtri(hash_uniform(seed, ids[:, None], -2, 10 * c + 9))  # dark to light
            tint = cs[:, None] * spread[:, None] * z * 0.35
            out[name] = (mean * torch.exp(cs[:, None] * spread[:, None] * 3 * shade) + tint).clamp(0.02, 1.0)
        else:
            out[name] = torch.sigmoid(0.8 * z - (1.0 if name == "eye" else 0.0))
    out["lips"] = (
        0.55 * out["skin"]
        + 0.45 * torch.sigmoid(out["lips"] + torch.tensor([0.9, -0.8, -0.6], dtype=torch.float64, device=ids.device))
    ).clamp(0, 1)
    return out


def difficulty(meta: dict[str, torch.Tensor]) -> torch.Tensor:
    """A scalar in [0, ~1.5]: 0 for a frontal, sharp, unoccluded image; grows with each nuisance."""
    return (
        (meta["yaw"].abs() / 90.0) ** 1.5 * 0.8
        + (meta["pitch"].abs() / 40.0) ** 1.5 * 0.3
        + torch.log2(meta["resolution"]) / 3.0 * 0.6
        + meta["blur"] / 2.0 * 0.2
        + meta["noise"] / 0.15 * 0.2
        + meta["glasses"] * 0.1
        + meta["mask"] * 0.4
    )


# ---------------------------------------------------------------- the renderer
# Rendering has two stages. `_layout` works out everything about each face that does not depend on
# the pixel, for the whole batch at once: where each feature sits after yaw, pitch and roll, its
# radii, visibility and colour. `_paint` then makes the pixels, in blocks of images small enough to
# stay in the CPU's cache. Every coordinate the painter needs is affine in the pixel (x and y are
# the rolled image axes), so the layout hands it over as a *line*: a row and a column of values per
# image, whose sum over the image is the plane p x + q y + c (one pass to expand).

# the soft ellipses of a face, in painting order (glasses last: only the images that have them)
ELLIPSES = (
    "hair_back",
    "ear0",
    "ear1",
    "eye0",
    "iris0",
    "pupil0",
    "brow0",
    "eye1",
    "iris1",
    "pupil1",
    "brow1",
    "nose",
    "nostril0",
    "nostril1",
    "mouth",
    "gap",
    "rim0",
    "lens0",
    "rim1",
    "lens1",
)
_E = {name: k for k, name in enumerate(ELLIPSES)}


def _plane(line: torch.Tensor) -> torch.Tensor:
    """Expand a line (B, 2, S) from the layout to its plane (B, S, S): row value + column value."""
    return torch.add(line[:, 0, None, :], line[:, 1, :, None])


def _alpha(L: dict, name: str) -> torch.Tensor:
    """Soft mask (B, S, S) of one of the layout's ellipses: sigmoid(r - |(u, v)|) times its scale.

    (u, v) is the pixel in the ellipse's frame, scaled so that |(u, v)| = r on the outline, with r
    the ellipse's smaller radius in pixels: edges are about one pixel soft. The mouth and its gap are
    bent: their v is v - bend (x - mx)^2. In-place passes over one buffer: this is the renderer's innermost loop.
    """
    k = _E[name]
    d = torch.add(L["rows"][:, k, 0, None, :], L["cols"][:, k, 0, :, None]).square_()  # u^2
    v = torch.add(L["rows"][:, k, 1, None, :], L["cols"][:, k, 1, :, None])
    if name in ("mouth", "gap"):
        v.sub_(_plane(L["mouth_x"]).square_().mul_(L["bend"][:, k, None]))
    d = d.addcmul_(v, v).sqrt_()
    return torch.sub(L["r"][:, k, None], d, out=d).sigmoid_().mul_(L["scale"][:, k, None])


def _over(img, colour, alpha):
    """Paint colour (B, 3, 1, 1) or (B, 3, H, W) over img with alpha (B, H, W), in place."""
    return img.lerp_(colour.expand_as(img), alpha.unsqueeze(1))


CPU_BLOCK_PIXELS = 1 << 18  # images painted together on the CPU: 64 at 64 x 64, whose ~50 passes then stay in cache


def render(identity: dict[str, torch.Tensor], nuis: dict[str, torch.Tensor], size: int = 64) -> torch.Tensor:
    """Render faces from factor tensors (one row each). Returns (B, 3, size, size) float32 in [0, 1].

    `identity` holds the factors of `SHAPE` and `COLOUR` ((B,) and (B, 3)), `nuis` those of
    `Nuisance` ((B,)), all on the device to render on. Every image depends on its own row only;
    on the CPU, large batches are painted in blocks of images small enough to stay in the cache
    (1.3-1.4x faster than one pass over 256 images at 64 x 64, measured on the 2-core VM).
    """
    L = _layout(identity, nuis, size)
    B = nuis["yaw"].shape[0]
    rows = max(1, CPU_BLOCK_PIXELS // (size * size)) if nuis["yaw"].device.type == "cpu" else B
    if B <= rows:
        return _paint(L, size)
    out = torch.empty(B, 3, size, size, device=nuis["yaw"].device)
    for i in range(0, B, rows):
        out[i : i + rows] = _paint({k: v[i : i + rows] for k, v in L.items()}, size)
    return out


def _layout(identity: dict[str, torch.Tensor], nuis: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Everything `_paint` needs, per image (first dimension B): lines (B, 2, S), the frames of the
    `ELLIPSES` (see `_frames`), colours (B, 3, 1, 1) and scalars (B, 1, 1)."""
    dev = nuis["yaw"].device
    f = {k: v.float()[:, None, None] if v.dim() == 1 else v.float().view(-1, 3, 1, 1) for k, v in identity.items()}
    n = {k: v.float()[:, None, None] for k, v in nuis.items()}
    t = ((torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size * 2 - 1).view(1, 1, size)
    roll = torch.deg2rad(n["roll"])
    cos, sin = torch.cos(roll), torch.sin(roll)
    sharp = size / 2  # pixels per unit: edges are about one pixel soft

    def line(p, q, c=0.0):
        return _line(t, cos, sin, p, q, c).squeeze(1)

    shapes = {}  # name -> (cx, cy, rx, ry, gain, shear), framed together at the end

    def ellipse(name, cx, cy, rx, ry, gain=1.0, shear=0.0):
        """Centre (cx, cy), radii rx and ry, y measured from the line cy + shear (x - cx); `gain`
        scales the alpha."""
        shapes[name] = (cx, cy, rx, ry, gain, shear)

    head = _head(f, n)
    yaw, a, b, c = head["yaw"], head["a"], head["b"], head["c"]
    aw = torch.sqrt((a * torch.cos(yaw)) ** 2 + (c * torch.sin(yaw)) ** 2)  # silhouette half-width
    zero = torch.zeros_like(a)

    def place(fx, fy, depth=0.0):
        return _place(head, fx, fy, depth)

    L = {"x": line(1.0, 0.0), "y": line(0.0, 1.0), "aw": aw, "b": b, "c": c, "jaw": f["jaw"]}
    L["background"] = n["background"].unsqueeze(1) * torch.tensor([0.55, 0.60, 0.65], device=dev).view(1, 3, 1, 1) + 0.2
    L["hair"], L["skin"], L["iris"], L["lips"] = f["hair"], f["skin"], f["eye"], f["lips"]
    ellipse("hair_back", zero, zero + 0.15, aw + f["hair_volume"], b + f["hair_volume"])
    L["hair_cut"] = line(0.0, 1.0, 0.1 * b)  # the hair behind the head ends at y = -0.1 b

    # hair on the head: above a hairline that turns with the head, y > hy - 0.15 ((x - hx) / a)^2
    hx, hy, _, _, _ = place(zero, f["hairline"] * b)
    curve = torch.sqrt(0.075 * sharp / a**2)
    L["hairline"] = line(0.0, 0.5 * sharp, -0.5 * sharp * hy)
    L["hairline_curve"] = line(
        curve, 0.0, -curve * hx
    )  # sigmoid(sharp / 2 (y - hairline)) = sigmoid(hairline + curve^2)
    # turned away, the back of the head shows: hair behind a line that moves forward with |yaw|
    L["back"] = line(-torch.sign(yaw) * 0.5 * sharp, 0.0, -0.5 * sharp * aw * (1 - 1.1 * torch.sin(yaw).abs()))
    L["nape"] = line(0.0, 0.3 * sharp, 0.3 * sharp * 0.25 * b)
    # ears: edge-on from the front, full in profile, hidden on the far side
    for k, side in enumerate((-1.0, 1.0)):
        ex_, ey_, _, _, evis = place(side * 0.97 * a, f["eye_y"] - 0.1)
        ellipse(f"ear{k}", ex_, ey_, 0.5 * f["ear"] * (0.35 + 0.65 * torch.sin(yaw).abs()), f["ear"], evis)

    expr = n["expression"]
    for k, side in enumerate((-1.0, 1.0)):
        ex, ey = side * f["eye_x"], f["eye_y"]
        px, py, sx, sy, vis = place(ex, ey)
        ew, eh = f["eye_w"] * sx, f["eye_h"] * sy * (1 + 0.25 * expr.clamp(max=0))
        ir = f["iris"] * eh
        ellipse(f"eye{k}", px, py, ew, eh, vis)
        ellipse(f"iris{k}", px, py, ir * sx.clamp(min=0.5), ir, vis)
        ellipse(f"pupil{k}", px, py, 0.4 * ir, 0.4 * ir, vis)
        # brow: a thin tilted bar above the eye, raised by a positive expression
        bx, by, bsx, bsy, bvis = place(ex, ey + f["eye_h"] + f["brow_gap"] + 0.03 * expr)
        tilt = side * f["brow_tilt"] * 0.15 / (f["eye_w"] + 1e-3)
        ellipse(f"brow{k}", bx, by, 1.3 * f["eye_w"] * bsx, f["brow_thick"] * bsy, bvis, shear=tilt)
        # glasses (only the images that have them show them): a dark rim around a grey lens
        ellipse(f"rim{k}", px, py, 1.5 * f["eye_w"] * sx + 0.03, 2.4 * f["eye_h"] + 0.05, n["glasses"] * vis)
        ellipse(f"lens{k}", px, py, 1.5 * f["eye_w"] * sx - 0.02, 2.4 * f["eye_h"], n["glasses"] * vis)
    L["glasses"] = n["glasses"]

    # nose: a protruding ridge (it moves more than flat features when the head turns) with a shadow
    nx_, ny_, nsx, nsy, nvis = place(zero, f["nose_y"], depth=f["nose_len"])
    side_shadow = 0.35 * torch.sigmoid(4 * torch.sin(yaw)) + 0.1
    ellipse("nose", nx_ + 0.25 * f["nose_w"] * torch.sin(yaw), ny_, f["nose_w"] * nsx, 1.4 * f["nose_w"], 0.8 * nvis)
    L["nose_shade"] = f["skin"] * (1 - side_shadow.unsqueeze(1))
    for k, side in enumerate((-1.0, 1.0)):
        qx, qy, _, _, qvis = place(
            side * 0.45 * f["nose_w"], f["nose_y"] - 0.6 * f["nose_w"], depth=0.5 * f["nose_len"]
        )
        ellipse(f"nostril{k}", qx, qy, 0.25 * f["nose_w"], 0.15 * f["nose_w"], qvis)

    # mouth: a smile bends it, an open mouth shows a dark gap
    mx, my, msx, msy, mvis = place(zero, f["mouth_y"])
    bend = 0.4 * expr * f["mouth_w"] / (f["mouth_w"] + 1e-3) ** 2
    lip_h = f["lip"] * msy * (1 + 0.8 * expr.clamp(min=0))
    ellipse("mouth", mx, my, f["mouth_w"] * msx, lip_h, mvis)
    ellipse("gap", mx, my, 0.8 * f["mouth_w"] * msx, 0.35 * lip_h * expr.clamp(min=0), mvis)
    L["mouth_x"] = line(1.0, 0.0, -mx)  # both are bent: y - bend (x - mx)^2 for their y

    # a surgical mask (only the images that have one show it): from below the nose to the chin
    mask_top = place(zero, f["nose_y"] - 0.02)[1]
    L["mask"] = n["mask"]
    L["mask_top"], L["chin"] = line(0.0, -0.5 * sharp, 0.5 * sharp * mask_top), line(0.0, 1.0, b)

    az = torch.deg2rad(n["light_azimuth"])
    L["light"] = torch.cat([torch.sin(az), torch.cos(az), n["light_strength"]], 1)  # (B, 3, 1): lx, lz, strength
    wb = n["white_balance"].unsqueeze(1) * torch.tensor([1.0, 0.0, -1.0], device=dev).view(1, 3, 1, 1)
    L["exposure"] = n["exposure"].unsqueeze(1) * (1 + wb)
    L["resolution"], L["blur"] = nuis["resolution"], nuis["blur"]  # for `_degrade`

    # every ellipse's parameters as (B, E, 1), in the order of ELLIPSES, framed at once
    params = zip(*(shapes[name] for name in ELLIPSES))
    cx, cy, rx, ry, gain, shear = (
        torch.cat([v if torch.is_tensor(v) else torch.full_like(a, v) for v in p], 1) for p in params
    )
    L.update(_frames(t, cos, sin, sharp, cx, cy, rx, ry, gain, shear, bend))
    return L


def _head(f: dict[str, torch.Tensor], n: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head ellipsoid of each image: half-width a, half-height b, depth c, yaw and pitch (radians)."""
    a, b = f["face_w"], f["face_h"]
    # the head is deeper than wide: a profile has another silhouette
    return {
        "a": a,
        "b": b,
        "c": a * f["head_depth"],
        "yaw": torch.deg2rad(n["yaw"]),
        "pitch": torch.deg2rad(n["pitch"]),
    }


def _place(head: dict[str, torch.Tensor], fx, fy, depth=0.0):
    """Project a point on the head surface at local (fx, fy), lifted by `depth`: returns its image
    position px, py (before the roll), its foreshortening sx, sy and its visibility."""
    a, b, c, yaw, pitch = head["a"], head["b"], head["c"], head["yaw"], head["pitch"]
    ax = torch.asin((fx / a).clamp(-0.99, 0.99))
    ay = torch.asin((fy / b).clamp(-0.99, 0.99))
    rx = torch.sqrt((c**2) * (1 - (fx / a) ** 2 - (fy / b) ** 2).clamp(min=0.01)) + depth
    px = fx * torch.cos(yaw) + rx * torch.sin(yaw)
    pz = -fx * torch.sin(yaw) + rx * torch.cos(yaw)
    py = fy * torch.cos(pitch) + pz * torch.sin(pitch)
    sx = torch.cos(yaw + ax).clamp(min=0.12)
    sy = torch.cos(pitch + ay).clamp(min=0.12)
    vis = torch.sigmoid(12 * torch.cos(yaw + ax)) * torch.sigmoid(12 * torch.cos(pitch + ay))
    return px, py, sx, sy, vis


LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # as seen in the image


def landmarks(identity: dict[str, torch.Tensor], nuis: dict[str, torch.Tensor], size: int = 64) -> torch.Tensor:
    """Where the five landmarks of `LANDMARKS` land in each rendered image: (B, 5, 2), x (column)
    and y (row) in pixels with pixel centres at integers, like a landmark detector reports them.
    The same geometry as the renderer's: eye centres, the nose's ridge, the mouth's corners (on
    its bent centre line), turned with the head and rolled with the image. A landmark turned away
    from the camera still gets its projected position."""
    f = {k: v.float()[:, None, None] if v.dim() == 1 else v.float().view(-1, 3, 1, 1) for k, v in identity.items()}
    n = {k: v.float()[:, None, None] for k, v in nuis.items()}
    head = _head(f, n)
    zero = torch.zeros_like(head["a"])
    points = [_place(head, side * f["eye_x"], f["eye_y"])[:2] for side in (-1.0, 1.0)]
    nx, ny = _place(head, zero, f["nose_y"], depth=f["nose_len"])[:2]
    points.append((nx + 0.25 * f["nose_w"] * torch.sin(head["yaw"]), ny))
    mx, my, msx = _place(head, zero, f["mouth_y"])[:3]
    rx = f["mouth_w"] * msx
    bend = 0.4 * n["expression"] * f["mouth_w"] / (f["mouth_w"] + 1e-3) ** 2
    points += [(mx + side * rx, my + bend * rx**2) for side in (-1.0, 1.0)]
    x, y = (torch.cat(v, 1).squeeze(-1) for v in zip(*points))  # (B, 5) in face units, before the roll
    roll = torch.deg2rad(n["roll"]).squeeze(-1)
    cos, sin = torch.cos(roll), torch.sin(roll)
    tj, ti = x * cos + y * sin, x * sin - y * cos  # the rolled axes: see `_line`
    return torch.stack([(tj + 1) * size / 2 - 0.5, (ti + 1) * size / 2 - 0.5], -1)


def _line(t, cos, sin, p, q, c=0.0):
    """The line of p x + q y + c (coefficients (B, K, 1)): (B, K, 2, S), its row and its column.
    Pixel (i, j) of the image sits at x = t_j cos + t_i sin, y = t_j sin - t_i cos (the axes rolled
    by the image's roll; t (1, 1, S) the pixel centres in [-1, 1])"""
    return torch.stack(torch.broadcast_tensors(t * (p * cos + q * sin) + c, t * (p * sin - q * cos)), -2)


def _frames(t, cos, sin, sharp, cx, cy, rx, ry, gain, shear, bend):
    """The layout of E soft ellipses per image (parameters (B, E, 1)): centre (cx, cy), radii rx and
    ry, y measured from the line cy + shear (x - cx), alpha scaled by gain. Their frames go to the
    painter as lines (rows and columns (B, E, 2, S)): u = r (x - cx) / rx, v = r (y - cy - shear
    (x - cx)) / ry, so |(u, v)| = r on the outline, with r the smaller radius in pixels. `bend`
    (B, 1, 1) is returned in each ellipse's v units, for those `_alpha` bends."""
    rx, ry = rx.clamp(min=1e-3), ry.clamp(min=1e-3)
    r = torch.minimum(rx, ry) * sharp
    su, sv = r / rx, r / ry
    cx, cy, su, sv, shear, cos, sin = (v.unsqueeze(-1) for v in (cx, cy, su, sv, shear, cos, sin))  # (B, E, 1, 1)
    # `_line`'s row and column of u (p = su, q = 0) and of v (p = -sv shear, q = sv), stacked on dim 2
    rows = torch.addcmul(
        torch.cat([-su * cx, sv * (shear * cx - cy)], 2), t, torch.cat([su * cos, sv * (sin - shear * cos)], 2)
    )
    cols = t * torch.cat([su * sin, -sv * (cos + shear * sin)], 2)
    return {
        "rows": rows,
        "cols": cols,
        "r": r,
        "scale": r.clamp(max=1.0) * gain,
        "bend": sv.squeeze(-1) * bend,
    }  # features under a pixel fade out


def _paint(L: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """The pixels of faces laid out by `_layout`: (B, 3, size, size) float32 in [0, 1]."""
    dev = L["b"].device
    B = L["b"].shape[0]
    x, y, aw, b = _plane(L["x"]), _plane(L["y"]), L["aw"], L["b"]
    sharp = size / 2

    # head outline: an ellipse whose lower half narrows towards the jaw (its half-width varies with y)
    rx = (
        (-y / b).clamp_(min=0).square_().mul_(-L["jaw"]).add_(1).mul_(aw).clamp_(min=1e-3)
    )  # aw (1 - jaw (y / b)^2) below the middle
    X, Y = x.div_(rx), y.div_(b)  # the pixel in the head's frame: X^2 + Y^2 = 1 on the outline
    q = X.square().add_(Y.square())
    r = torch.minimum(rx, b) * sharp
    head = q.sqrt().mul_(-r).add_(r).sigmoid_().mul_(r.clamp(max=1.0))
    # Lambertian shading on the head ellipsoid (camera-aligned), light from the side
    nx, ny, nz = X.div_(rx), Y.div_(b), q.neg_().add_(1).clamp_(min=0).sqrt_().div_(L["c"])  # the normal, unnormalized
    lx, lz, strength = L["light"].unsqueeze(-1).unbind(1)
    lam = (
        (nx * lx)
        .add_(nz * lz)
        .add_(ny, alpha=0.25)
        .div_(torch.sqrt(nx.square() + ny.square() + nz.square() + 1e-9))
        .clamp_(min=0)
    )
    shade = lam.mul_(1.35 * strength).add_(1 - strength)

    gy = 1 - (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size * 2  # y up, without the roll
    img = (L["background"] + 0.08 * gy.view(1, 1, size, 1)).expand(B, 3, size, size).contiguous()  # lighter at the top
    hair = L["hair"]
    img = _over(img, hair, _alpha(L, "hair_back").mul_(_plane(L["hair_cut"]) > 0))
    face = L["skin"].expand(B, 3, size, size).contiguous()
    face = _over(face, hair, _plane(L["hairline"]).add_(_plane(L["hairline_curve"]).square_()).sigmoid_())
    face = _over(face, hair, _plane(L["back"]).sigmoid_().mul_(_plane(L["nape"]).sigmoid_()))
    for k in range(2):
        face = _over(face, 0.85 * L["skin"], _alpha(L, f"ear{k}"))
    white, black = torch.tensor([0.95, 0.95, 0.92], device=dev).view(1, 3, 1, 1), torch.zeros(1, 3, 1, 1, device=dev)
    for k in range(2):
        face = _over(face, white, _alpha(L, f"eye{k}"))
        face = _over(face, L["iris"], _alpha(L, f"iris{k}"))
        face = _over(face, black, _alpha(L, f"pupil{k}"))
        face = _over(face, 0.7 * hair, _alpha(L, f"brow{k}"))
    face = _over(face, L["nose_shade"], _alpha(L, "nose"))
    for k in range(2):
        face = _over(face, 0.35 * L["skin"], _alpha(L, f"nostril{k}"))
    face = _over(face, L["lips"], _alpha(L, "mouth"))
    face = _over(face, torch.full((1, 3, 1, 1), 0.1, device=dev), _alpha(L, "gap"))

    # occlusions, drawn only on the images that have them (most do not)
    on = (L["glasses"].view(B) > 0).nonzero().squeeze(1)
    if len(on):
        G, sub = {k: L[k][on] for k in ("rows", "cols", "r", "scale")}, face[on]
        for k in range(2):
            inner = _alpha(G, f"lens{k}")  # scaled by the glasses' visibility
            sub = _over(sub, torch.full((1, 3, 1, 1), 0.08, device=dev), _alpha(G, f"rim{k}").sub_(inner).clamp_(min=0))
            sub = _over(sub, torch.full((1, 3, 1, 1), 0.25, device=dev), inner.mul_(0.45))
        face[on] = sub
    on = (L["mask"].view(B) > 0).nonzero().squeeze(1)
    if len(on):
        mask = _plane(L["mask_top"][on]).sigmoid_().mul_(_plane(L["chin"][on]) > 0).mul_(L["mask"][on])
        face[on] = _over(face[on], torch.tensor([0.72, 0.82, 0.92], device=dev).view(1, 3, 1, 1), mask)

    img = _over(img, face.mul_(shade.unsqueeze(1)), head).clamp_(0, 1)
    img = img.mul_(L["exposure"]).clamp_(0, 1)
    return _degrade(img, L).clamp_(0, 1)


def _degrade(img: torch.Tensor, nuis: dict[str, torch.Tensor]) -> torch.Tensor:
    """In place: resolution (area down-sample to s x s, bilinear up-sample back), then a Gaussian
    blur with replicated borders, per image. Both are separable linear maps of the rows and of the
    columns, so each image gets one H x H matrix K = blur @ resample and becomes K @ image @ K^T:
    two batched matrix products instead of a loop over sizes and a grouped convolution."""
    _, C, H, W = img.shape
    small = torch.round(H / nuis["resolution"].float()).clamp(4, H).long()
    sigma = nuis["blur"].float()
    on = ((small < H) | (sigma > 0.05)).nonzero().squeeze(1)  # the others are left as they are
    if not len(on):
        return img
    K = _resample_matrices(H, img.device)[small[on] - 4]  # (n, H, H), a copy
    blurred = (sigma[on] > 0.05).nonzero().squeeze(1)
    if len(blurred):
        K[blurred] = _blur_matrices(sigma[on][blurred], H) @ K[blurred]
    n = len(on)
    rows = torch.bmm(img[on].view(n, C * H, W), K.transpose(1, 2))  # each row of each channel: x K^T
    img[on] = torch.bmm(K.repeat_interleave(C, 0), rows.view(n * C, H, W)).view(n, C, H, W)  # K x K^T
    return img


_RESAMPLE: dict[tuple, torch.Tensor] = {}


def _resample_matrices(H: int, device) -> torch.Tensor:
    """(H - 3, H, H): entry s - 4 maps a signal of length H to its area down-sample to length s,
    bilinearly up-sampled back to H (the last, s = H, is the identity)."""
    key = (H, str(device))
    if key not in _RESAMPLE:
        eye = torch.eye(H, device=device).unsqueeze(1)  # H signals, the unit impulses
        maps = [
            F.interpolate(F.interpolate(eye, size=s, mode="area"), size=H, mode="linear", align_corners=False)[:, 0].T
            for s in range(4, H)
        ]
        _RESAMPLE[key] = torch.stack(maps + [torch.eye(H, device=device)])
    return _RESAMPLE[key]


def _blur_matrices(sigma: torch.Tensor, H: int, r: int = 4) -> torch.Tensor:
    """(n, H, H): a (2r + 1)-tap Gaussian of width sigma, borders replicated."""
    k = torch.arange(-r, r + 1, device=sigma.device)
    w = torch.exp(-0.5 * (k[None] / sigma[:, None]) ** 2)
    w = w / w.sum(1, keepdim=True)  # (n, 2r + 1)
    cols = (torch.arange(H, device=sigma.device)[:, None] + k[None]).clamp(0, H - 1)  # (H, 2r + 1)
    G = torch.zeros(len(sigma), H, H, device=sigma.device)
    return G.scatter_add_(2, cols.expand(len(sigma), H, 2 * r + 1), w[:, None].expand(len(sigma), H, 2 * r + 1))


# ---------------------------------------------------------------- the data set
@dataclass
class SynthFaces:
    """A set of synthetic faces: the given global identity ids x `images_per_identity` images.

    Sample k is image k % K of identity ids[k // K]; its label is k // K (0 .. len(ids) - 1).
    Two SynthFaces with the same seed and groups share one world: identity 7 looks the same in
    both, so identity-disjoint train and test sets are just disjoint id ranges.
    """

    identities: Sequence[int] | range = range(100)
    images_per_identity: int = 10
    seed: int = 0
    size: int = 64
    nuisance: Nuisance = field(default_factory=Nuisance)
    groups: Sequence[Group] = DEFAULT_GROUPS

    def __post_init__(self):
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        if self.images_per_identity < 1 or len(self.identities) < 1:
            raise ValueError("SynthFaces needs at least one identity and one image per identity")
        self.ids = torch.as_tensor(list(self.identities), dtype=torch.int64)
        self._identity = _draw_identities(self.ids, self.seed, self.groups)
        self._meta: dict[str, torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.ids)

    def __len__(self) -> int:
        return len(self.ids) * self.images_per_identity

    def with_nuisance(self, **changes) -> SynthFaces:
        """The same identities and images under other nuisance distributions."""
        return replace(self, nuisance=replace(self.nuisance, **changes))

    def nuisance_of(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        label, image = index // self.images_per_identity, index % self.images_per_identity
        u = hash_uniform(self.seed, self.ids[label][:, None], image[:, None], 100 + torch.arange(len(NUISANCES)))
        return {name: getattr(self.nuisance, name)(u[:, k]) for k, name in enumerate(NUISANCES)}

    @property
    def meta(self) -> dict[str, torch.Tensor]:
        """Metadata of every sample without rendering: label, identity, group, nuisances, difficulty,
        and the five landmarks (N, 5, 2) in pixels (see `landmarks`)."""
        if self._meta is None:
            self._meta = self.meta_of(torch.arange(len(self)))
        return self._meta

    def meta_of(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.int64)
        label = index // self.images_per_identity
        m = {"label": label, "identity": self.ids[label], "group": self._identity["group"][label]}
        m.update({k: v.float() for k, v in self.nuisance_of(index).items()})
        m["difficulty"] = difficulty(m)
        m["landmarks"] = landmarks(self.identity_factors(label), {k: m[k] for k in NUISANCES}, self.size)  # (B, 5, 2)
        return m

    def identity_factors(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[labels] for k, v in self._identity.items() if k != "group"}

    def batch(self, index, device: torch.device | str = "cpu"):
        """Render samples `index` -> (images (B, 3, H, W), labels (B,), metadata dict)."""
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)})")
        meta = self.meta_of(index)
        ident = {k: v.to(device) for k, v in self.identity_factors(meta["label"]).items()}
        nuis = {k: meta[k].to(device) for k in NUISANCES}
        images = render(ident, nuis, self.size)
        images = _add_noise(
            images, self.seed, meta["identity"].to(device), (index % self.images_per_identity).to(device), nuis["noise"]
        )
        return images, meta["label"].to(device), meta

    @staticmethod
    def _explicit(nuisance: dict[str, float], device) -> dict[str, torch.Tensor]:
        """One image's nuisance values: the given ones, frontal defaults for the rest."""
        unknown = set(nuisance) - set(NUISANCES)
        if unknown:
            raise ValueError(f"unknown nuisance {sorted(unknown)}; choose from {', '.join(NUISANCES)}")
        values = {k: c.value for k, c in vars(Nuisance.frontal()).items() if isinstance(c, Const)}
        values.update({"background": 0.5, **nuisance})
        return {k: torch.tensor([float(values[k])], device=device) for k in NUISANCES}

    def render(self, label: int, device: torch.device | str = "cpu", **nuisance: float) -> torch.Tensor:
        """One face of identity `label` under explicit nuisance values (frontal defaults): (3, H, W)."""
        nuis = self._explicit(nuisance, device)
        ident = {k: v.to(device) for k, v in self.identity_factors(torch.tensor([label])).items()}
        img = render(ident, nuis, self.size)
        return _add_noise(
            img, self.seed, self.ids[[label]].to(device), torch.tensor([-1], device=device), nuis["noise"]
        )[0]

    def landmarks(self, label: int, **nuisance: float) -> torch.Tensor:
        """The five landmarks (5, 2) of the face `render(label, **nuisance)` draws, in pixels."""
        return landmarks(self.identity_factors(torch.tensor([label])), self._explicit(nuisance, "cpu"), self.size)[0]

    def sweep(
        self, label: int, factor: str, values=None, device: torch.device | str = "cpu", **fixed: float
    ) -> torch.Tensor:
        """Identity `label` with one nuisance swept over `values` (default: `SWEEPS`), the others
        frontal (or as given in `fixed`): (len(values), 3, H, W)."""
        values = SWEEPS[factor][2] if values is None else values
        return torch.stack([self.render(label, device, **{**fixed, factor: v}) for v in values])

    def __getitem__(self, i: int):
        images, labels, _ = self.batch([i])
        return images[0], int(labels[0])


_NOISE_BANK: dict[tuple, torch.Tensor] = {}


def _noise_bank(seed: int, size: int, device) -> torch.Tensor:
    """64 fixed noise images (zero mean, unit variance, uniform), a pure function of (seed, size),
    tiled 2 x 2 so that any circular shift of one is a plain window: (64, 3, 2 size, 2 size)."""
    key = (seed, size, str(device))
    if key not in _NOISE_BANK:
        u = hash_uniform(seed, torch.arange(64 * 3 * size * size, device=device), -3).float()
        _NOISE_BANK[key] = ((u - 0.5) * math.sqrt(12.0)).view(64, 3, size, size).repeat(1, 1, 2, 2)
    return _NOISE_BANK[key]


def _add_noise(images, seed, identity, image, std):
    """Additive noise, per image: one of 64 fixed noise fields, circularly shifted by amounts
    hashed from (identity, image). As deterministic as hashing every pixel, at a gather's cost."""
    on = (std > 0).nonzero().squeeze(1)  # only the noisy images pay for the gather
    if not len(on):
        return images
    _, C, H, W = images.shape
    bank = _noise_bank(seed, H, images.device)
    u = hash_uniform(seed, identity[on, None], image[on, None], torch.arange(1000, 1003, device=images.device))
    k, dy, dx = (u * torch.tensor([64, H, W], device=images.device)).long().unbind(1)
    _, _, H2, W2 = bank.shape
    window = (
        torch.arange(C, device=images.device).view(C, 1, 1) * (H2 * W2)
        + torch.arange(H, device=images.device).view(H, 1) * W2
        + torch.arange(W, device=images.device)
    )
    corner = k * (C * H2 * W2) + dy * W2 + dx  # where each image's window starts in the flat bank
    noise = bank.view(-1).take(corner.view(-1, 1, 1, 1) + window)
    images[on] = (images[on] + noise.mul_(std[on].float().view(-1, 1, 1, 1))).clamp_(0, 1)
    return images


# ---------------------------------------------------------------- rendered once, kept in memory
@dataclass
class FaceTensors:
    """Rendered faces held in memory as uint8 (a quarter of float32), with the same `batch` API."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64, 0 .. num_classes - 1
    meta: dict[str, torch.Tensor]
    num_classes: int
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index, device: torch.device | str = "cpu"):
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        images = self.images[index].to(device, non_blocking=True).float().div_(255)
        return images, self.labels[index].to(device), {k: v[index] for k, v in self.meta.items()}

    def subset(self, mask_or_index) -> FaceTensors:
        idx = torch.as_tensor(mask_or_index)
        idx = idx.nonzero().squeeze(1) if idx.dtype == torch.bool else idx.long()
        return FaceTensors(
            self.images[idx],
            self.labels[idx],
            {k: v[idx] for k, v in self.meta.items()},
            self.num_classes,
            f"{self.fingerprint}[{_digest(idx)}]",
        )


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()[:12]


def materialize(
    faces: SynthFaces, batch_size: int = 512, device: torch.device | str = "cpu", progress: bool = True
) -> FaceTensors:
    """Render every sample of `faces` once (on `device`) and keep them as uint8 on the CPU."""
    from tqdm.auto import tqdm

    chunks = []
    for start in tqdm(range(0, len(faces), batch_size), desc="rendering", disable=not progress, leave=False):
        images, _, _ = faces.batch(torch.arange(start, min(start + batch_size, len(faces))), device)
        chunks.append(images.mul(255).round_().to(torch.uint8).cpu())
    meta = faces.meta
    # the fingerprint names the world and the renderer's code: a model cache keyed by it retrains
    # when the images would change
    return FaceTensors(
        torch.cat(chunks), meta["label"].clone(), dict(meta), faces.num_classes, f"{faces!r}@{code_digest(faces)}"
    )

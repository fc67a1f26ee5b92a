"""SynthFaces: a procedural face renderer with explicit identity and nuisance factors.

A *world* is fixed by a seed. In it, identity `i` has shape and appearance factors (face outline,
eye/brow/nose/mouth geometry, the face's relief, skin, hair, iris and lip colour) drawn from its
group's prior, and
image `j` of identity `i` has nuisance factors (yaw, pitch, roll, light, expression, resolution,
blur, noise, glasses, mask, background) drawn from distributions the user sets. All randomness
comes from a counter-based integer hash of (seed, identity, image, factor), so:

* the same (identity, image) renders the same bytes in any batch, on any run;
* no state is stored: 10,000 identities x 50 images cost nothing until rendered;
* changing one nuisance distribution leaves every other factor of every image unchanged
  (each distribution maps the same per-image uniform number through its inverse CDF).

Rendering is batched pure PyTorch on the device of your choice (`frlab.data.face3d`): the head is
a 3-D shape (cranium, lower face, nose, ears, hair) ray-cast under yaw, pitch and roll, with its
features painted on its surface, so a profile is a profile; then the camera: resolution is a
down-sample then up-sample to the output size, blur a Gaussian, noise additive. Identities differ
mostly in shape (face outline, proportions, the size and placement of every feature, the relief
of cheekbones, brow ridge, chin, muzzle and eye sockets that the light shades); skin, hair and eye
colours come from one population-wide prior, whatever the group.

    world = SynthFaces(range(0, 1000), images_per_identity=20, seed=0)
    images, labels, meta = world.batch(torch.arange(64))     # 64 x 3 x 64 x 64 in [0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from .. import checks
from ..hparams import code_digest
from . import face3d
from .face3d import landmarks

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
def _bounds(kind: str, lo, hi, finite: bool = False) -> None:
    """lo and hi: numbers (infinite too, unless `finite`) with lo <= hi."""
    for name, v in (("lo", lo), ("hi", hi)):
        checks.number(f"{kind}'s {name}", v, finite=finite)
    if lo > hi:
        raise ValueError(f"{kind}'s lo must not exceed its hi, got lo={lo:g} > hi={hi:g}")


@dataclass(frozen=True)
class Normal:
    """Normal(mean, std) truncated to [lo, hi] (by clamping)."""

    mean: float = 0.0
    std: float = 1.0
    lo: float = -math.inf
    hi: float = math.inf

    def __post_init__(self):
        checks.number("Normal's mean", self.mean)
        checks.number("Normal's std", self.std, lo=0)
        _bounds("Normal", self.lo, self.hi)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return (self.mean + self.std * torch.special.ndtri(u)).clamp(self.lo, self.hi)


@dataclass(frozen=True)
class Uniform:
    lo: float = 0.0
    hi: float = 1.0

    def __post_init__(self):
        _bounds("Uniform", self.lo, self.hi, finite=True)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * u


@dataclass(frozen=True)
class Bernoulli:
    p: float = 0.5

    def __post_init__(self):
        checks.number("Bernoulli's p", self.p, lo=0, hi=1)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return (u < self.p).double()


@dataclass(frozen=True)
class Const:
    value: float = 0.0

    def __post_init__(self):
        checks.number("Const's value", self.value)

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

    def __post_init__(self):
        for f in fields(self):
            kinds = (Bernoulli, Const) if f.name in ("glasses", "mask") else (Normal, Uniform, Const)
            value = getattr(self, f.name)
            if not isinstance(value, kinds):
                names = ", ".join(k.__name__ for k in kinds[:-1]) + f" or {kinds[-1].__name__}"
                raise TypeError(f"Nuisance's {f.name} must be a {names}, got {value!r}")

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
# (name, low, high): a factor is low + (high - low) * sigmoid(group offset + 1.6 spread z), z ~ N(0, 1)
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
    ("brow_thick", 0.027, 0.062),
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
    # the face's relief (see `face3d.relief`): how far each part stands out of the smooth front
    ("cheekbones", -0.12, 0.12),
    ("brow_ridge", -0.12, 0.12),
    ("chin", -0.12, 0.12),
    ("muzzle", -0.12, 0.12),
    ("sockets", 0.04, 0.12),
)
COLOUR = (("skin", 3), ("hair", 3), ("eye", 3), ("lips", 3))
SHAPE_NAMES = tuple(n for n, _, _ in SHAPE)
FACTOR_CLASSES = {  # every identity factor in one class: what kind of difference between two faces it makes
    "outline": ("face_w", "face_h", "jaw", "head_depth", "ear", "hairline", "hair_volume"),
    "placement": ("eye_x", "eye_y", "brow_gap", "nose_y", "mouth_y"),
    "feature shape": ("eye_w", "eye_h", "brow_tilt", "brow_thick", "nose_len", "nose_w", "mouth_w", "lip", "iris"),
    "relief": ("cheekbones", "brow_ridge", "chin", "muzzle", "sockets"),
    "colour": tuple(n for n, _ in COLOUR),
}


@dataclass(frozen=True)
class Group:
    """A group of identities that differ from one another by more or less: `spread` scales how far
    identities deviate from the group's mean face shape (and `shape_offset` moves that mean). A
    group with a small spread has identities that look alike, so a model separates them less well:
    a way to make a model unfair on purpose, for fairness experiments. Nothing else tells groups
    apart: skin tone, hair and eye colour are drawn for every identity from one population-wide
    prior, the same in every group, so no group stands for a skin tone.
    """

    name: str = "all"
    weight: float = 1.0
    spread: float = 1.0
    shape_offset: float = 0.0  # shifts every shape factor's mean (in logit units)

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"a Group's name must be a string, got {self.name!r}")
        checks.number(f"the weight of group {self.name!r}", self.weight, lo=0)
        checks.number(f"the spread of group {self.name!r}", self.spread, lo=0)
        checks.number(f"the shape_offset of group {self.name!r}", self.shape_offset)


DEFAULT_GROUPS = (Group(),)

# skin tones from light to dark (linear RGB-ish reflectances), and hair colours, for the population
SKIN_TONES = ((0.95, 0.80, 0.70), (0.86, 0.66, 0.53), (0.71, 0.50, 0.36), (0.52, 0.34, 0.23), (0.34, 0.22, 0.15))
HAIR_COLOURS = ((0.05, 0.045, 0.04), (0.17, 0.11, 0.07), (0.33, 0.21, 0.12), (0.62, 0.47, 0.28), (0.50, 0.22, 0.10))
HAIR_WEIGHTS = (0.35, 0.30, 0.18, 0.12, 0.05)  # black, dark brown, brown, blond, red


def _palette(u: torch.Tensor, colours, weights=None) -> torch.Tensor:
    """A colour (N, 3) for each u in (0, 1): colour i owns a share weights[i] of the unit interval
    (equal shares by default) and blends halfway toward colour i + 1 across it, so shades are
    continuous within each colour."""
    table = torch.tensor(colours, dtype=torch.float64, device=u.device)
    w = torch.tensor(weights or [1.0] * len(colours), dtype=torch.float64, device=u.device)
    edges = torch.cumsum(w / w.sum(), 0)
    k = torch.searchsorted(edges, u.contiguous()).clamp(max=len(colours) - 1)
    start = torch.where(k > 0, edges[(k - 1).clamp(min=0)], torch.zeros_like(u))
    frac = ((u - start) / (w / w.sum())[k]).clamp(0, 1)[:, None]
    nxt = (k + 1).clamp(max=len(colours) - 1)
    return table[k] + 0.5 * frac * (table[nxt] - table[k])


def _draw_identities(ids: torch.Tensor, seed: int, groups: Sequence[Group]) -> dict[str, torch.Tensor]:
    """Identity factors of global identity ids (float64, on ids' device): the shape factors from
    the group's prior, the colours from the population's."""
    w = torch.tensor([g.weight for g in groups], dtype=torch.float64, device=ids.device)
    cdf = torch.cumsum(w / w.sum(), 0)
    group = torch.searchsorted(cdf, hash_uniform(seed, ids, -1, 0).contiguous()).clamp(max=len(groups) - 1)
    spread = torch.tensor([g.spread for g in groups], dtype=torch.float64, device=ids.device)[group]
    offset = torch.tensor([g.shape_offset for g in groups], dtype=torch.float64, device=ids.device)[group]
    out: dict[str, torch.Tensor] = {"group": group}
    for k, (name, lo, hi) in enumerate(SHAPE):
        z = torch.special.ndtri(hash_uniform(seed, ids, -1, 1 + k))
        out[name] = lo + (hi - lo) * torch.sigmoid(offset + 1.6 * spread * z)  # shape carries most of identity
    u = lambda key, dim=1: hash_uniform(seed, ids[:, None], -2, key + torch.arange(dim, device=ids.device))  # noqa: E731
    jitter = lambda key, sd: sd * torch.special.ndtri(u(key, 3))  # noqa: E731
    out["skin"] = (_palette(u(0)[:, 0], SKIN_TONES) + jitter(10, 0.02)).clamp(0.02, 1.0)
    out["hair"] = (_palette(u(20)[:, 0], HAIR_COLOURS, HAIR_WEIGHTS) * torch.exp(jitter(30, 0.12))).clamp(0.02, 1.0)
    out["eye"] = torch.sigmoid(0.8 * torch.special.ndtri(u(40, 3)) - 1.0)
    red = torch.tensor([0.9, -0.8, -0.6], dtype=torch.float64, device=ids.device)
    out["lips"] = (0.55 * out["skin"] + 0.45 * torch.sigmoid(torch.special.ndtri(u(50, 3)) + red)).clamp(0, 1)
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


# ---------------------------------------------------------------- the renderer (frlab.data.face3d) and the camera
def render(identity: dict[str, torch.Tensor], nuis: dict[str, torch.Tensor], size: int = 64) -> torch.Tensor:
    """Faces from factor tensors (one row each): `face3d.render`, then the camera's degradations
    (resolution, blur; noise is added per image by `SynthFaces`, keyed by the image). (B, 3, size,
    size) float32 in [0, 1]."""
    return _degrade(face3d.render(identity, nuis, size), nuis).clamp_(0, 1)


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
        checks.integer("size (pixels)", self.size, lo=16)
        checks.integer("images_per_identity", self.images_per_identity, lo=1)
        checks.integer("seed", self.seed)
        if not isinstance(self.nuisance, Nuisance):
            raise TypeError(f"nuisance must be a Nuisance, got {self.nuisance!r}")
        if not len(self.groups) or not all(isinstance(g, Group) for g in self.groups):
            raise TypeError(f"groups must be one or more Group, got {self.groups!r}")
        if sum(g.weight for g in self.groups) <= 0:
            raise ValueError("the groups' weights must not all be 0")
        ids = torch.as_tensor(list(self.identities))
        if not len(ids):
            raise ValueError("SynthFaces needs at least one identity")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"identities must be integers, got {ids.dtype}")
        values, counts = ids.unique(return_counts=True)
        if (counts > 1).any():
            twice = values[counts > 1][:3].tolist()
            raise ValueError(f"identities must be distinct (each id is one face), got {twice} more than once")
        self.ids = ids.to(torch.int64)
        # drawn in float64 (exact hashing), kept in float32: what the renderer computes in
        drawn = _draw_identities(self.ids, self.seed, self.groups)
        self._identity = {k: v.float() if v.is_floating_point() else v for k, v in drawn.items()}
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

    def _label(self, label) -> int:
        return checks.integer("label", label, lo=0, hi=self.num_classes - 1)

    @staticmethod
    def _explicit(nuisance: dict[str, float], device) -> dict[str, torch.Tensor]:
        """One image's nuisance values: the given ones, frontal defaults for the rest."""
        unknown = set(nuisance) - set(NUISANCES)
        if unknown:
            raise ValueError(f"unknown nuisance {sorted(unknown)}; choose from {', '.join(NUISANCES)}")
        for k, v in nuisance.items():
            checks.number(k, v)
        values = {k: c.value for k, c in vars(Nuisance.frontal()).items() if isinstance(c, Const)}
        values.update({"background": 0.5, **nuisance})
        return {k: torch.tensor([float(values[k])], device=device) for k in NUISANCES}

    def render(self, label: int, device: torch.device | str = "cpu", **nuisance: float) -> torch.Tensor:
        """One face of identity `label` under explicit nuisance values (frontal defaults): (3, H, W)."""
        label = self._label(label)
        nuis = self._explicit(nuisance, device)
        ident = {k: v.to(device) for k, v in self.identity_factors(torch.tensor([label])).items()}
        img = render(ident, nuis, self.size)
        return _add_noise(
            img, self.seed, self.ids[[label]].to(device), torch.tensor([-1], device=device), nuis["noise"]
        )[0]

    def landmarks(self, label: int, **nuisance: float) -> torch.Tensor:
        """The five landmarks (5, 2) of the face `render(label, **nuisance)` draws, in pixels."""
        label = self._label(label)
        return landmarks(self.identity_factors(torch.tensor([label])), self._explicit(nuisance, "cpu"), self.size)[0]

    def sweep(
        self, label: int, factor: str, values=None, device: torch.device | str = "cpu", **fixed: float
    ) -> torch.Tensor:
        """Identity `label` with one nuisance swept over `values` (default: `SWEEPS`), the others
        frontal (or as given in `fixed`): (len(values), 3, H, W)."""
        checks.choice("factor", factor, NUISANCES)
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

"""The SynthFaces renderer: a head in 3-D, ray-cast, with its features painted on its surface.

Every image is an orthographic view of one head. The head is a union of ellipsoids in its own
frame (x to the image's right in a frontal view, y up, z toward the camera): the cranium, the
lower face (narrower by the `jaw` factor), the nose (protruding by `nose_len`), two ears, and a
shell of hair over the cranium where hair grows (above a hairline and round the back). Yaw and
pitch turn the whole shape, so a profile shows the nose in outline, one ear, the back of the head
and its own silhouette; roll turns the image. For every pixel the renderer casts a ray, keeps the
nearest surface it meets, shades it (Lambertian, one light from the side, with the face's relief:
cheekbones, brow ridge, chin, muzzle and eye sockets as a bump map) and paints the features that
lie on that surface there, from their outlines in the head's frame: eyes with their upper lids,
brows, lips and the line where they meet on the face, nostrils on the nose and its shadow below.
A feature turned away is hidden by whatever the ray meets first.

    images = render(identity, nuisance, size=64)      # (B, 3, 64, 64) in [0, 1]
    points = landmarks(identity, nuisance, size=64)   # (B, 5, 2): eyes, nose tip, mouth corners

How it stays cheap: in each image every quantity the ray cast needs is an affine or quadratic
function of the pixel, so a primitive's ray equation comes from a few *planes* (a row plus a
column per image, expanded in one pass) and a handful of element-wise passes; images are painted
in blocks that stay in the CPU's cache.
"""

from __future__ import annotations

import math

import torch

# the primitives of the head, in the order their hits are stacked; SKIN ones are painted with skin
PRIMITIVES = ("cranium", "lower", "nose", "ear_left", "ear_right", "hair")
SKIN = ("cranium", "lower", "nose", "ear_left", "ear_right")
LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # as seen in the image
CPU_BLOCK_PIXELS = 1 << 18  # pixels painted together on the CPU: 64 images at 64 x 64
TINY = 1e-30  # the smallest squared half chord a ray is given: its root, 1e-15 face units, is no length


# ---------------------------------------------------------------- the head's geometry
def _factors(identity: dict[str, torch.Tensor], nuis: dict[str, torch.Tensor]):
    """Identity factors as (B, 1, 1) (colours (B, 3, 1, 1)) and nuisances as (B, 1, 1), float32."""
    f = {k: v.float()[:, None, None] if v.dim() == 1 else v.float().view(-1, 3, 1, 1) for k, v in identity.items()}
    n = {k: v.float()[:, None, None] for k, v in nuis.items()}
    return f, n


def rotation(yaw: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
    """M (B, 3, 3) with camera point = M @ head point: yaw about the head's y axis (positive turns
    the face to the image's right), then pitch about x (positive tilts the face up)."""
    cy, sy, cp, sp = torch.cos(yaw), torch.sin(yaw), torch.cos(pitch), torch.sin(pitch)
    zero, one = torch.zeros_like(yaw), torch.ones_like(yaw)
    r_yaw = torch.stack(
        [torch.stack([cy, zero, sy], -1), torch.stack([zero, one, zero], -1), torch.stack([-sy, zero, cy], -1)], -2
    )
    r_pitch = torch.stack(
        [torch.stack([one, zero, zero], -1), torch.stack([zero, cp, sp], -1), torch.stack([zero, -sp, cp], -1)], -2
    )
    return r_pitch @ r_yaw


def geometry(f: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Centre and semi-axes (B, 3) of each primitive in the head's frame, from identity factors."""
    a, b = f["face_w"].view(-1), f["face_h"].view(-1)
    c = a * f["head_depth"].view(-1)
    z = torch.zeros_like(a)
    v = lambda *xs: torch.stack(torch.broadcast_tensors(*xs), -1)  # noqa: E731
    jaw = f["jaw"].view(-1)
    nose_y, nose_len, nose_w = f["nose_y"].view(-1), f["nose_len"].view(-1), f["nose_w"].view(-1)
    ear, eye_y = f["ear"].view(-1), f["eye_y"].view(-1)
    hv = f["hair_volume"].view(-1)
    out = {
        "cranium": (v(z, 0.12 * b, -0.05 * c), v(a, 0.88 * b, c)),
        "lower": (v(z, -0.35 * b, 0.02 * c), v(a * (1 - jaw), 0.65 * b, 0.86 * c)),
    }
    # the nose stands on the face's front below the eyes; its tip sticks out by 0.6 nose_len
    front = _front(out, z, nose_y)
    out["nose"] = (v(z, nose_y + 0.09, front - 0.5 * nose_len), v(0.8 * nose_w, 0.12 + 0.1 * nose_len, 1.1 * nose_len))
    for side, name in ((-1.0, "ear_left"), (1.0, "ear_right")):  # thin plates on the sides
        out[name] = (v(side * 0.96 * a, eye_y - 0.08, -0.12 * c), v(0.035 + z, ear, 0.6 * ear))
    out["hair"] = (out["cranium"][0], out["cranium"][1] + (0.03 + hv)[:, None])
    return out


def _front(geo, x, y):
    """z of the face's front surface (the larger of cranium and lower face) at head (x, y)."""
    zs = []
    for name in ("cranium", "lower"):
        (cx, cy, cz), (sx, sy, sz) = (t.unbind(-1) for t in geo[name])
        inside = (1 - ((x - cx) / sx) ** 2 - ((y - cy) / sy) ** 2).clamp(min=0)
        zs.append(cz + sz * inside.sqrt())
    return torch.maximum(*zs)


# ---------------------------------------------------------------- landmarks
def landmarks(identity: dict[str, torch.Tensor], nuis: dict[str, torch.Tensor], size: int = 64) -> torch.Tensor:
    """Where the five landmarks of `LANDMARKS` land in each image: (B, 5, 2), x (column) and y (row)
    in pixels with pixel centres at integers, as a landmark detector reports them: eye centres and
    mouth corners on the face's front surface, the nose's tip, turned with the head and rolled with
    the image. A landmark turned away from the camera still gets its projected position."""
    f, n = _factors(identity, nuis)
    geo = geometry(f)
    eye_x, eye_y = f["eye_x"].view(-1), f["eye_y"].view(-1)
    mouth_w, mouth_y = f["mouth_w"].view(-1), f["mouth_y"].view(-1)
    bend = _bend(f, n).view(-1)
    xs = [-eye_x, eye_x, None, -mouth_w, mouth_w]
    ys = [eye_y, eye_y, None, mouth_y + bend * mouth_w**2, mouth_y + bend * mouth_w**2]
    points = []
    for x, y in zip(xs, ys):
        if x is None:  # the nose tip: the front of the nose
            centre, axes = geo["nose"]
            points.append(centre + torch.stack([torch.zeros_like(eye_x), torch.zeros_like(eye_x), axes[:, 2]], -1))
        else:
            points.append(torch.stack([x, y, _front(geo, x, y)], -1))
    M = rotation(torch.deg2rad(n["yaw"].view(-1)), torch.deg2rad(n["pitch"].view(-1)))
    cam = torch.stack(points, 1) @ M.transpose(1, 2)  # (B, 5, 3) in the camera frame
    roll = torch.deg2rad(n["roll"].view(-1, 1))
    cos, sin = torch.cos(roll), torch.sin(roll)
    x, y = cam[..., 0], cam[..., 1]
    tj, ti = x * cos + y * sin, x * sin - y * cos  # the image's axes, rolled: see `_grid`
    return torch.stack([(tj + 1) * size / 2 - 0.5, (ti + 1) * size / 2 - 0.5], -1)


def _bend(f, n):
    """How far a smile bends the mouth: its centre line is y + bend x^2 (per face unit)."""
    return 0.4 * n["expression"] * f["mouth_w"] / (f["mouth_w"] + 1e-3) ** 2


# ---------------------------------------------------------------- rendering
def render(identity: dict[str, torch.Tensor], nuis: dict[str, torch.Tensor], size: int = 64) -> torch.Tensor:
    """Render faces from factor tensors (one row each): (B, 3, size, size) float32 in [0, 1], before
    the image degradations (resolution, blur, noise), which `frlab.data.synth` applies. `identity`
    holds the factors of `synth.SHAPE` and `synth.COLOUR`, `nuis` those of `synth.Nuisance`, all
    on the device to render on. Every image depends on its own row only; on the CPU, large batches
    are painted in blocks of images that stay in the cache."""
    B = nuis["yaw"].shape[0]
    rows = max(1, CPU_BLOCK_PIXELS // (size * size)) if nuis["yaw"].device.type == "cpu" else B
    if B <= rows:
        return _render(identity, nuis, size)
    out = torch.empty(B, 3, size, size, device=nuis["yaw"].device)
    for i in range(0, B, rows):
        out[i : i + rows] = _render(
            {k: v[i : i + rows] for k, v in identity.items()}, {k: v[i : i + rows] for k, v in nuis.items()}, size
        )
    return out


def _grid(n, size):
    """Pixel centres t in [-1, 1] (S,), and the roll's (B, 1, 1) cos and sin: pixel (i, j) sees the
    camera-frame point x = t_j cos + t_i sin, y = t_j sin - t_i cos."""
    t = (torch.arange(size, device=n["yaw"].device, dtype=torch.float32) + 0.5) / size * 2 - 1
    roll = torch.deg2rad(n["roll"])
    return t, torch.cos(roll), torch.sin(roll)


def _plane(t, p_col, p_row, c):
    """The plane p_col t_j + p_row t_i + c over the image (coefficients (B, 1, 1)): (B, S, S) in one
    pass, a column-line plus a row-line."""
    return torch.add((p_col * t + c), (p_row * t).transpose(1, 2))


def cast(identity: dict[str, torch.Tensor], nuis: dict[str, torch.Tensor], size: int = 64) -> dict[str, torch.Tensor]:
    """The ray cast, per pixel (B, S, S): the camera depth of the surface each ray meets first
    ("depth", -1e4 where it meets none), which primitive it is ("winner", an index into
    `PRIMITIVES`), the soft coverage of the head ("coverage", in [0, 1]) and the surface point in
    the head's frame ("x", "y", "z")."""
    f, n = _factors(identity, nuis)
    t, cos, sin = _grid(n, size)
    t = t.view(1, 1, size)
    M = rotation(torch.deg2rad(n["yaw"].view(-1)), torch.deg2rad(n["pitch"].view(-1)))  # (B, 3, 3)
    Mt = M.transpose(1, 2)
    # head point of the ray through pixel (i, j) at camera depth s: O + s d, with O = M^T (x, y, 0)
    # affine in (t_j, t_i): its coefficients (B, 3) of t_j, of t_i, and d = M^T e_z
    col = Mt[:, :, 0] * cos.view(-1, 1) + Mt[:, :, 1] * sin.view(-1, 1)
    row = Mt[:, :, 0] * sin.view(-1, 1) - Mt[:, :, 1] * cos.view(-1, 1)
    d = Mt[:, :, 2]
    geo = geometry(f)
    sharp = size / 2  # pixels per face unit

    tt = t.transpose(1, 2) * t  # (1, S, S): t_i t_j, for the cross term of the quadratics
    half = torch.full((1, 1, 1), 0.5, device=t.device)
    hits, cover = [], []
    for name in PRIMITIVES:
        centre, axes = geo[name]
        # in the primitive's unit frame u = (O + s d - centre) / axes = uc t_j + ur t_i + u0 + s w, and
        # |u|^2 = 1 on its surface: a quadratic in s whose coefficients are a plane (beta) and a
        # quadratic in (t_j, t_i) (gamma: a column line, a row line and a t_i t_j term)
        uc, ur, u0, w = col / axes, row / axes, -centre / axes, d / axes
        dot = lambda a, b: (a * b).sum(1).view(-1, 1, 1)  # noqa: E731
        ww = dot(w, w)
        # s^2 + 2 beta s + gamma = 0 (divided by |w|^2), roots s = -beta +- sqrt(beta^2 - gamma)
        beta = _plane(t, dot(uc, w) / ww, dot(ur, w) / ww, dot(u0, w) / ww)
        gamma = torch.add(
            (dot(uc, uc) * t * t + 2 * dot(uc, u0) * t + dot(u0, u0) - 1) / ww,
            ((dot(ur, ur) * t * t + 2 * dot(ur, u0) * t) / ww).transpose(1, 2),
        ).addcmul_(tt, 2 * dot(uc, ur) / ww)
        disc = torch.addcmul(gamma.neg_(), beta, beta)  # beta^2 - gamma: the squared half chord
        # edges a pixel soft (a linear ramp): near the silhouette the half chord is ~ sqrt(2 r inside),
        # for `inside` the distance in from it
        r = axes.min(1).values.view(-1, 1, 1)
        cover.append(torch.addcmul(half, disc, sharp / (2 * r)).clamp_(0, 1))
        # (clamped at TINY, not 0: on some CPUs the square root of 0 or of a subnormal number is an
        # order of magnitude slower than of any normal one, and most rays miss most primitives)
        root = disc.clamp_(min=TINY).sqrt_()
        if name == "hair":  # where the ray grazes the shell or crosses it: its near and its far side
            far = torch.add(root, beta).neg_()
            near = torch.sub(root, beta)
            grows = _grows(f, *_surface(t, col, row, d, near), sharp)
            hits.append(near.masked_fill_(cover[-1] < 0.5, -1e4))
        else:
            hits.append(root.sub_(beta).masked_fill_(cover[-1] < 0.5, -1e4))  # the nearer root: what the camera sees
    # the hair shell is hair only where hair grows (above the hairline, and round the back); where it
    # grows on the shell's near side the ray meets hair first; where the ray misses the skin, the
    # hair on the shell's far side shows (behind a cheek in a three-quarter view)
    hair = PRIMITIVES.index("hair")
    depth, winner = hits[0].clone(), torch.zeros(hits[0].shape, dtype=torch.uint8, device=t.device)
    for k in range(1, hair):  # the nearest skin surface (a running maximum: no stacked copy)
        winner.masked_fill_(hits[k] > depth, k)
        torch.maximum(depth, hits[k], out=depth)
    missed = depth < -1e3
    behind = torch.zeros_like(grows)
    band = (missed & (hits[hair] > -1e3)).nonzero(as_tuple=True)  # few pixels: the far side only there
    if len(band[0]):
        b, i, j = band
        ti, tj = t.view(-1)[i], t.view(-1)[j]
        far_point = (col[b] * tj[:, None] + row[b] * ti[:, None] + d[b] * far[band][:, None]).unbind(1)
        behind[band] = _grows({k: f[k][b].view(-1) for k in ("hairline", "face_h", "face_w")}, *far_point, sharp)
    hair_wins = (hits[hair] > -1e3) & ((grows >= 0.5) | missed)  # (a fringe that is not hair has no coverage)
    depth = torch.where(hair_wins, hits[hair], depth)
    winner = winner.masked_fill_(hair_wins, hair)
    coverage = cover[hair].mul_(torch.maximum(grows, behind))
    for c in cover[:hair]:
        torch.maximum(coverage, c, out=coverage)
    qx, qy, qz = _surface(t, col, row, d, depth)
    return {"depth": depth, "winner": winner, "coverage": coverage, "x": qx, "y": qy, "z": qz, "M": M, "geometry": geo}


def _render(identity, nuis, size):
    f, n = _factors(identity, nuis)
    dev = n["yaw"].device
    B = n["yaw"].shape[0]
    ray = cast(identity, nuis, size)
    winner, coverage, depth, qx, qy, qz = (ray[k] for k in ("winner", "coverage", "depth", "x", "y", "z"))
    sharp = size / 2
    front = (winner <= PRIMITIVES.index("nose")).float()  # the face and the nose: where the relief is
    shade = _shade(relief(f, qx, qy).mul_(front).add_(depth), n, size)

    # each pixel's base colour: skin (the ears a little darker) or hair, by the surface it shows
    face = torch.where((winner == PRIMITIVES.index("hair")).unsqueeze(1), f["hair"], f["skin"])
    ears = ((winner == PRIMITIVES.index("ear_left")) | (winner == PRIMITIVES.index("ear_right"))).unsqueeze(1)
    face.mul_(1 - 0.15 * ears)
    on_face = (winner <= PRIMITIVES.index("lower")).float().mul_(qz > 0)
    on_nose = (winner == PRIMITIVES.index("nose")).float()
    face = _features(face, f, n, qx, qy, on_face, on_nose, sharp)

    gy = 1 - (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size * 2  # y up, without the roll
    background = n["background"].unsqueeze(1) * torch.tensor([0.55, 0.60, 0.65], device=dev).view(1, 3, 1, 1) + 0.2
    img = (background + 0.08 * gy.view(1, 1, size, 1)).expand(B, 3, size, size).contiguous()
    img = img.lerp_(face.mul_(shade.unsqueeze(1)), coverage.unsqueeze(1))
    wb = n["white_balance"].unsqueeze(1) * torch.tensor([1.0, 0.0, -1.0], device=dev).view(1, 3, 1, 1)
    return img.mul_(n["exposure"].unsqueeze(1) * (1 + wb)).clamp_(0, 1)


def relief(f, qx, qy) -> torch.Tensor:
    """The face's relief (B, S, S): how far, in face units, its front stands out of the smooth
    ellipsoids at each surface point (x, y) of the head's frame. Soft bumps at the cheekbones, along
    the brow ridge, at the chin and round the mouth (the muzzle), each by its identity factor
    (negative: a hollow), and hollows round the eyes (the sockets). A bump map: it changes the
    depth that shading reads (along the view ray), not the silhouette or where features sit, so
    what it adds is the light and shadow a face's bone structure casts."""
    a = f["face_w"]
    out = _bump(qx, qy, 0.0, f["eye_y"] + 0.12, 0.5, 0.05).mul_(f["brow_ridge"])
    out.addcmul_(_bump(qx, qy, 0.0, f["mouth_y"] - 0.2, 0.15, 0.1), f["chin"])
    out.addcmul_(_bump(qx, qy, 0.0, 0.5 * (f["mouth_y"] + f["nose_y"]), 0.3, 0.1), f["muzzle"])
    for side in (-1.0, 1.0):
        out.addcmul_(_bump(qx, qy, side * 0.55 * a, f["nose_y"], 0.18, 0.12), f["cheekbones"])
        out.addcmul_(_bump(qx, qy, side * f["eye_x"], f["eye_y"], 0.12, 0.08), f["sockets"], value=-1)
    return out


def _bump(x, y, cx, cy, sx: float, sy: float) -> torch.Tensor:
    """exp(-((x - cx) / sx)^2 - ((y - cy) / sy)^2), a new tensor, with the exponent clamped at -20
    (far from the bump, exp would return subnormal numbers, which a CPU computes slowly)."""
    u = torch.sub(x, cx).mul_(1 / sx).square_()
    v = torch.sub(y, cy).mul_(1 / sy)
    return u.addcmul_(v, v).clamp_(max=20).neg_().exp_()


def _shade(depth: torch.Tensor, n, size: int) -> torch.Tensor:
    """Lambertian shading (B, S, S) of the depth map: the surface normal (-ds/dx, -ds/dy, 1) from
    central differences (slopes clamped where the surface ends or steps, at silhouettes and round
    the nose), a light from the side at `light_azimuth`, slightly from above."""
    k = size / 4  # central differences over two pixels of 2 / size each
    gj, gi = torch.zeros_like(depth), torch.zeros_like(depth)
    torch.sub(depth[:, :, 2:], depth[:, :, :-2], out=gj[:, :, 1:-1]).mul_(k).clamp_(-6, 6)
    torch.sub(depth[:, 2:, :], depth[:, :-2, :], out=gi[:, 1:-1, :]).mul_(k).clamp_(-6, 6)
    roll = torch.deg2rad(n["roll"])
    cos, sin = torch.cos(roll), torch.sin(roll)
    # pixel axes to the camera's: ds/dx = ds/dt_j cos + ds/dt_i sin, ds/dy = ds/dt_j sin - ds/dt_i cos
    gx = torch.mul(gj, cos).addcmul_(gi, sin)
    gy = torch.mul(gj, sin).addcmul_(gi, -cos)
    az = torch.deg2rad(n["light_azimuth"])
    lx, ly, lz = torch.sin(az), 0.25, torch.cos(az)
    lam = torch.mul(gx, -lx).add_(gy, alpha=-ly).add_(lz)  # n . l with n = (-gx, -gy, 1)
    norm = gx.square_().addcmul_(gy, gy).add_(1).sqrt_().mul_(math.sqrt(1 + ly * ly))
    lam = lam.div_(norm).clamp_(min=0)
    return lam.mul_(1.35 * n["light_strength"]).add_(1 - n["light_strength"])


def _grows(f, hx, hy, hz, sharp):
    """Whether hair grows at head point (x, y, z), softly (a ramp about two pixels wide): above a
    hairline that comes lower at the temples, or round the back of the head down to the nape."""
    k = 0.25 * sharp
    top = (
        hx.square_()
        .mul_(0.9 * k / f["face_w"])
        .add_(hy, alpha=k)
        .sub_(k * f["hairline"] * f["face_h"] - 0.5)
        .clamp_(0, 1)
    )
    back = hz.mul_(-k).sub_(0.35 * k * f["face_w"] - 0.5).clamp_(0, 1)
    nape = hy.mul(k).add_(0.25 * k * f["face_h"] + 0.5).clamp_(0, 1)
    return torch.maximum(top, back.mul_(nape))


def _surface(t, col, row, d, depth):
    """The head-frame point (x, y, z) each pixel's ray meets at `depth`."""
    return tuple(
        _plane(t, col[:, k].view(-1, 1, 1), row[:, k].view(-1, 1, 1), 0.0).addcmul_(d[:, k].view(-1, 1, 1), depth)
        for k in range(3)
    )


def _ellipse(qx, qy, cx, cy, rx, ry, sharp, shear=None, weight=None):
    """A soft ellipse on the surface, in the head's (x, y), centre (cx, cy), radii rx and ry, y
    measured from the line cy + shear (x - cx): alpha 1 inside, 0 outside, a ramp about a pixel
    wide at the front across the outline (exactly 0 a pixel away, so features that do not touch
    can be painted in any order); features smaller than a pixel fade. Times `weight` (where the
    feature can show)."""
    dx, v = torch.sub(qx, cx), torch.sub(qy, cy)
    if shear is not None:
        v.addcmul_(dx, shear, value=-1)
    return _centred(dx.square_(), v.square_(), rx, ry, sharp, weight)


def _centred(x2, y2, rx, ry, sharp, weight=None):
    """`_ellipse` from the squared offsets x2, y2 of every point from its centre (shared by ellipses
    with one centre): a new tensor."""
    r = torch.minimum(rx, ry).clamp(min=1e-3)
    rho2 = torch.mul(x2, (r / rx.clamp(min=1e-3)) ** 2).addcmul_(y2, (r / ry.clamp(min=1e-3)) ** 2)
    return _ramp(rho2, r, sharp, weight)


def _ramp(rho2, r, sharp, weight=None, inplace=True):
    """The alpha of a disc of radius r at squared distance rho2 from its centre (scaled units):
    clamp((r^2 - rho2) / (2 r) sharp + 1/2, 0, 1), which is (r - rho) sharp + 1/2 at the outline
    (a pixel-wide ramp, no square root), faded by r sharp where that is under a pixel, times weight."""
    k = sharp / (2 * r)
    alpha = rho2.mul_(-k) if inplace else torch.mul(rho2, -k)
    alpha = alpha.add_(r * r * k + 0.5).clamp_(0, 1).mul_((r * sharp).clamp(max=1.0))
    return alpha if weight is None else alpha.mul_(weight)


def _over(img, colour, alpha):
    """Paint colour (B, 3, 1, 1) over img with alpha (B, H, W), in place."""
    return img.lerp_(colour.expand_as(img), alpha.unsqueeze(1))


def _features(face, f, n, qx, qy, on_face, on_nose, sharp):
    """Eyes (white, iris, pupil, and the upper lid with its lashes over them), brows, lips, the
    mouth and the line where the lips meet, and the shadow under the nose on the face; nostrils on
    the nose; glasses and a mask where the image has them."""
    dev = face.device
    white_colour = torch.tensor([0.95, 0.95, 0.92], device=dev).view(1, 3, 1, 1)
    black = torch.zeros(1, 3, 1, 1, device=dev)
    expr = n["expression"]
    for side in (-1.0, 1.0):
        ex, ey = side * f["eye_x"], f["eye_y"]
        ew, eh = f["eye_w"], f["eye_h"] * (1 + 0.25 * expr.clamp(max=0))
        ir = f["iris"] * eh
        dx, dy = torch.sub(qx, ex), torch.sub(qy, ey)  # shared by the white, the iris and the pupil
        r = torch.minimum(ew, eh)
        white = torch.mul(dx, r / ew).square_().add_(torch.mul(dy, r / eh).square_())
        face = _over(face, white_colour, _ramp(white, r, sharp, on_face))
        rho2 = dx.square_().addcmul_(dy, dy)  # round: iris and pupil
        face = _over(face, f["eye"], _ramp(rho2, ir, sharp, on_face, inplace=False))
        face = _over(face, black, _ramp(rho2, 0.4 * ir, sharp, on_face))
        # the upper lid and its lashes, over the top of the eye and the iris
        lid = _ellipse(qx, qy, ex, ey + 0.6 * eh, 1.05 * ew, 0.5 * eh + 0.01, sharp, weight=on_face)
        face = _over(face, 0.2 * f["hair"] + 0.05, lid.mul_(0.8))
        by = ey + f["eye_h"] + f["brow_gap"] + 0.03 * expr
        tilt = side * f["brow_tilt"] * 0.15 / (f["eye_w"] + 1e-3)
        brow = _ellipse(qx, qy, ex, by, 1.3 * f["eye_w"], f["brow_thick"], sharp, tilt, on_face)
        face = _over(face, 0.5 * f["hair"], brow)
    for side in (-1.0, 1.0):
        ny = f["nose_y"] - 0.2 * f["nose_w"]
        nostril = _ellipse(
            qx, qy, side * 0.4 * f["nose_w"], ny, 0.25 * f["nose_w"], 0.14 * f["nose_w"], sharp, weight=on_nose
        )
        face = _over(face, 0.35 * f["skin"], nostril)
    # the lips, the gap of a smile and the line where the lips meet: ellipses centred on the lips'
    # centre line (a smile bends it), from the squared distances along it and above it
    qx2 = qx.square()
    above2 = torch.sub(qy, f["mouth_y"]).addcmul_(qx2, _bend(f, n), value=-1).square_()
    lip_h, mouth_w = f["lip"] * (1 + 0.8 * expr.clamp(min=0)), f["mouth_w"]
    face = _over(face, f["lips"], _centred(qx2, above2, mouth_w, lip_h, sharp, on_face))
    gap = _centred(qx2, above2, 0.8 * mouth_w, 0.35 * lip_h * expr.clamp(min=0), sharp, on_face)
    face = _over(face, torch.full((1, 3, 1, 1), 0.1, device=dev), gap)
    line = _centred(qx2, above2, 0.9 * mouth_w, torch.full_like(mouth_w, 0.012), sharp, on_face)
    face = _over(face, 0.35 * f["lips"], line)
    below = torch.sub(qy, f["nose_y"] - 0.25 * f["nose_w"] - 0.02).square_()  # the shadow under the nose
    shadow = _centred(qx2, below, f["nose_w"], torch.full_like(mouth_w, 0.03), sharp, on_face)
    face = _over(face, 0.5 * f["skin"], shadow.mul_(0.7))
    on = (n["glasses"].view(-1) > 0).nonzero().squeeze(1)  # occlusions: only the images that have them
    if len(on):
        sub, g = face[on], {k: f[k][on] for k in ("eye_x", "eye_y", "eye_w", "eye_h")}
        x, y, front = qx[on], qy[on], (on_face[on] + on_nose[on]).clamp_(max=1)
        for side in (-1.0, 1.0):
            cx, cy = side * g["eye_x"], g["eye_y"]
            outer = _ellipse(x, y, cx, cy, 1.5 * g["eye_w"] + 0.03, 2.4 * g["eye_h"] + 0.05, sharp)
            inner = _ellipse(x, y, cx, cy, 1.5 * g["eye_w"] - 0.01, 2.4 * g["eye_h"] + 0.01, sharp)
            sub = _over(sub, torch.full((1, 3, 1, 1), 0.08, device=dev), (outer - inner).clamp_(min=0).mul_(front))
            sub = _over(sub, torch.full((1, 3, 1, 1), 0.6, device=dev), inner.mul_(0.12).mul_(front))  # a clear lens
        face[on] = sub
    on = (n["mask"].view(-1) > 0).nonzero().squeeze(1)
    if len(on):
        g = {"nose_y": f["nose_y"][on]}
        below = torch.sigmoid((g["nose_y"] + 0.02 - qy[on]) * sharp)  # from just below the nose down
        skin = (on_face[on] + on_nose[on]).clamp_(max=1)
        face[on] = _over(face[on], torch.tensor([0.72, 0.82, 0.92], device=dev).view(1, 3, 1, 1), below.mul_(skin))
    return face

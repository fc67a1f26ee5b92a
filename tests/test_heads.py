"""Every head against a naive float64 reference written here, loop by loop, for values and gradients;
and every registered head's fused forward against its own autograd reference path."""

import math
import os

import pytest
import torch

from frlab import _fused, heads


# ------------------------------------------------------------------ naive references (float64, loops)
def cosines(x, w):
    x, w = x.double(), w.double()
    return torch.stack([torch.stack([(xi @ wj) / (xi.norm() * wj.norm()) for wj in w]) for xi in x])


def ce(logits, y):
    return torch.logsumexp(logits, 0) - logits[y]


def ref_margin(x, w, labels, s, target):
    cos = cosines(x, w)
    losses = []
    for b, y in enumerate(labels.tolist()):
        logits = [s * cos[b, j] if j != y else s * target(cos[b, y]) for j in range(w.shape[0])]
        losses.append(ce(torch.stack(logits), y))
    return torch.stack(losses).mean()


def ref_arc_target(c, m):
    theta = torch.acos(c.clamp(-1, 1))
    if theta + m <= math.pi:
        return torch.cos(theta + m)
    return c - m * math.sin(m)


def ref_softmax(x, w, labels):
    x, w = x.double(), w.double()
    return torch.stack([ce(torch.stack([xi @ wj for wj in w]), y) for xi, y in zip(x, labels.tolist())]).mean()


def ref_curricular(x, w, labels, s, m, t_old, momentum):
    cos = cosines(x, w)
    cos_y = torch.stack([cos[b, y] for b, y in enumerate(labels.tolist())])
    t = momentum * cos_y.detach().mean() + (1 - momentum) * t_old
    losses = []
    for b, y in enumerate(labels.tolist()):
        theta = torch.acos(cos_y[b].clamp(-1, 1))
        boundary = torch.cos(theta + m)  # hardness is judged before the fallback
        logits = []
        for j in range(w.shape[0]):
            c = cos[b, j]
            if j == y:
                logits.append(s * ref_arc_target(c, m))
            elif c > boundary:
                logits.append(s * c * (t + c))
            else:
                logits.append(s * c)
        losses.append(ce(torch.stack(logits), y))
    return torch.stack(losses).mean(), t


def ref_npt(x, w, labels, k, r, delta):
    cos = cosines(x, w)
    losses = []
    for b, y in enumerate(labels.tolist()):
        negatives = sorted(
            (cos[b, j] for j in range(w.shape[0]) if j != y), key=lambda c: float(c.detach()), reverse=True
        )[:k]
        losses.append(2 * r**2 * sum(torch.clamp(c - cos[b, y] + delta / (2 * r**2), min=0) for c in negatives))
    return torch.stack(losses).mean()


def _with_t(head, t):
    head.t.fill_(t)
    return head


class CubicMargin(heads.MarginHead):
    def target(self, cos_y):
        return cos_y - 0.2 * (1 + cos_y) ** 3


CASES = {
    "softmax": (lambda D, C: heads.Softmax(D, C), lambda h, x, y: ref_softmax(x, h.weight, y)),
    "normface": (lambda D, C: heads.NormFace(D, C), lambda h, x, y: ref_margin(x, h.weight, y, 64.0, lambda c: c)),
    "cosface": (lambda D, C: heads.CosFace(D, C), lambda h, x, y: ref_margin(x, h.weight, y, 64.0, lambda c: c - 0.35)),
    "arcface": (
        lambda D, C: heads.ArcFace(D, C),
        lambda h, x, y: ref_margin(x, h.weight, y, 64.0, lambda c: ref_arc_target(c, 0.5)),
    ),
    "arcface_s30_m02": (
        lambda D, C: heads.ArcFace(D, C, s=30, m=0.2),
        lambda h, x, y: ref_margin(x, h.weight, y, 30.0, lambda c: ref_arc_target(c, 0.2)),
    ),
    "curricular": (
        lambda D, C: heads.CurricularFace(D, C),
        lambda h, x, y: ref_curricular(x, h.weight, y, 64.0, 0.5, 0.0, 0.01)[0],
    ),
    "curricular_t05": (
        lambda D, C: _with_t(heads.CurricularFace(D, C, s=16.0, m=0.3, t_momentum=0.1), 0.5),
        lambda h, x, y: ref_curricular(x, h.weight, y, 16.0, 0.3, 0.5, 0.1)[0],
    ),
    # a head that defines only `target`: its slope comes from the default, autograd
    "custom_target": (
        lambda D, C: CubicMargin(D, C, s=16.0),
        lambda h, x, y: ref_margin(x, h.weight, y, 16.0, lambda c: c - 0.2 * (1 + c) ** 3),
    ),
    "npt": (lambda D, C: heads.NPT(D, C), lambda h, x, y: ref_npt(x, h.weight, y, 1, 1.0, 1.0)),
    "npt_k3_r2": (
        lambda D, C: heads.NPT(D, C, k=3, r=2.0, delta=1.5),
        lambda h, x, y: ref_npt(x, h.weight, y, 3, 2.0, 1.5),
    ),
}


def make(name, D=8, C=6, B=10, seed=0):
    torch.manual_seed(seed)
    head = CASES[name][0](D, C)
    with torch.no_grad():
        head.weight.normal_()
    x = torch.randn(B, D)
    y = torch.randint(0, C, (B,))
    return head, x, y


@pytest.mark.parametrize(
    "head",
    [
        heads.NormFace(4, 3),
        heads.CosFace(4, 3),
        heads.ArcFace(4, 3),
        heads.ArcFace(4, 3, m=0.2),
        heads.CurricularFace(4, 3, m=0.3),
    ],
    ids=lambda h: repr(h).split("(")[0] + f"_m{getattr(h, 'm', 0)}",
)
def test_closed_form_target_slopes_match_autograd(head):
    """The built-in heads' target_slope is the derivative of their target, at cos = +-1, across
    ArcFace's fallback boundary cos(pi - m), and everywhere between (float64)."""
    m = getattr(head, "m", 0.0)
    edge = math.cos(math.pi - m) if m else -0.5
    c = torch.cat(
        [
            torch.linspace(-1, 1, 201, dtype=torch.float64),
            torch.tensor([edge - 1e-9, edge + 1e-9, -1 + 1e-14, 1 - 1e-14], dtype=torch.float64),
        ]
    )
    expected = heads.MarginHead.target_slope(head, c)  # the generic one: autograd of target
    torch.testing.assert_close(head.target_slope(c), expected, rtol=1e-9, atol=1e-9)


def check_against_reference(name, head, x, y, rtol=1e-4, atol=1e-5):
    ref_fn = CASES[name][1]
    x32 = x.clone().requires_grad_(True)
    loss = head(x32, y)
    loss.backward()
    assert head.weight.grad.layout == torch.strided  # the target rows' gradient lands in the dense one
    gx, gw = x32.grad.clone(), head.weight.grad.clone()
    head.weight.grad = None

    x64 = x.double().clone().requires_grad_(True)
    w64 = head.weight.detach().double().clone().requires_grad_(True)
    ref_head = type("W", (), {"weight": w64})()
    ref = ref_fn(ref_head, x64, y)
    ref.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=atol)
    scale = max(1.0, float(x64.grad.abs().max()), float(w64.grad.abs().max()))
    torch.testing.assert_close(gx.double(), x64.grad, rtol=rtol, atol=atol * scale)
    torch.testing.assert_close(gw.double(), w64.grad, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("name", list(CASES))
def test_value_and_gradient_match_reference(name):
    head, x, y = make(name)
    check_against_reference(name, head, x, y)


@pytest.mark.parametrize("serial", [True, False])
@pytest.mark.parametrize("name", ["arcface", "curricular_t05"])
def test_fused_cross_entropy_over_several_row_blocks(name, serial, monkeypatch):
    """The fused cross-entropy walks over blocks of rows: 150 rows of 7 logits in blocks of 64, and
    dL/dW's normalization term over blocks of 3 proxies; on one thread (a busy machine) and on
    every thread, which it gives back afterwards."""
    monkeypatch.setattr(_fused._CosineCrossEntropy, "BLOCK", 64 * 7)
    monkeypatch.setattr(_fused._CosineCrossEntropy, "PROXY_ROWS", 3)
    monkeypatch.setattr(_fused, "SERIAL_BLOCKS", serial)
    threads = torch.get_num_threads()
    head, x, y = make(name, B=150, C=7, seed=3)
    check_against_reference(name, head, x, y)
    assert torch.get_num_threads() == threads


def test_the_cpu_blocks_run_on_one_thread_when_the_machine_is_busy(monkeypatch):
    cores = os.cpu_count() or 1
    monkeypatch.setattr(_fused, "SERIAL_BLOCKS", None)
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 0.5, 0.0, 0.0))
    assert _fused.serial_blocks()
    monkeypatch.setattr(os, "getloadavg", lambda: (cores - 0.5, 9.0, 9.0))  # the last minute counts
    assert not _fused.serial_blocks()
    monkeypatch.setattr(_fused, "SERIAL_BLOCKS", True)  # a setting overrides the load
    assert _fused.serial_blocks()

    def unknown():
        raise OSError("no load average here")

    monkeypatch.setattr(_fused, "SERIAL_BLOCKS", None)
    monkeypatch.setattr(os, "getloadavg", unknown)
    assert not _fused.serial_blocks()


@pytest.mark.parametrize("name", ["softmax", "arcface", "curricular_t05", "npt"])
def test_float64_heads_match_the_reference_to_float64_precision(name):
    head, x, y = make(name)
    head = head.double()
    x64 = x.double().requires_grad_()
    loss = head(x64, y)
    loss.backward()
    assert loss.dtype == torch.float64
    w64 = head.weight.detach().clone().requires_grad_()
    xr = x.double().requires_grad_()
    ref = CASES[name][1](type("W", (), {"weight": w64})(), xr, y)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x64.grad, xr.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, w64.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_one_sample_per_class(name):
    head, x, _ = make(name, B=6, C=6)
    check_against_reference(name, head, x, torch.arange(6))


@pytest.mark.parametrize("name", ["arcface", "curricular", "cosface", "npt"])
def test_theta_plus_m_beyond_pi_and_cos_near_minus_one(name):
    """Embeddings pointing almost opposite their proxy: theta_y + m > pi, the ArcFace fallback."""
    head, x, y = make(name, B=6, C=6)
    with torch.no_grad():
        x = -head.weight[y] + 0.05 * torch.randn_like(x)
    check_against_reference(name, head, x, y)


@pytest.mark.parametrize("name", [n for n in CASES if n != "softmax"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_finite_at_cos_exactly_plus_minus_one(name, sign):
    head, _, y = make(name, B=6, C=6)
    x = (sign * head.weight[y]).detach().clone().requires_grad_(True)
    loss = head(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    # the value is still right (the reference needs no gradient here)
    ref = CASES[name][1](type("W", (), {"weight": head.weight.detach().double()})(), x.detach().double(), y)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_fp16_inputs(name):
    head, x, y = make(name)
    xh = x.half()
    loss = head(xh, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = CASES[name][1](type("W", (), {"weight": head.weight.detach().double()})(), xh.double(), y)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["arcface", "cosface", "curricular", "npt"])
def test_bf16_autocast_keeps_the_margin_in_float32(name):
    head, x, y = make(name, D=32, C=20, B=16)
    xa = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(xa, y)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert xa.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    w64 = head.weight.detach().double().requires_grad_()
    x64 = x.double().requires_grad_()
    ref = CASES[name][1](type("W", (), {"weight": w64})(), x64, y)
    ref.backward()
    # the B x C product is bf16 (3 significant digits, times s = 64); the target is exact float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=0.05, atol=0.05 * float(ref.detach()))
    for got, want in ((xa.grad, x64.grad), (head.weight.grad, w64.grad)):
        assert float((got.double() - want).norm()) < 0.1 * float(want.norm())


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("name", ["cosface", "curricular_t05", "cifp_code", "cifp_paper"])
def test_a_second_backward_through_the_graph_gives_the_same_gradients(name, autocast):
    """The kernel's backward writes its gradient over the forward's B x C product: a second backward
    through a retained graph must make the product again, not read the gradient as the product."""
    if name.startswith("cifp"):
        torch.manual_seed(0)
        head, x, y = heads.CIFP(8, 6, form=name[5:]), torch.randn(10, 8), torch.randint(0, 6, (10,))
    else:
        head, x, y = make(name)
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = head(x, y)
    loss.backward(retain_graph=True)
    first = x.grad.clone(), head.weight.grad.clone()
    x.grad = head.weight.grad = None
    loss.backward()
    torch.testing.assert_close(x.grad, first[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(head.weight.grad, first[1], rtol=1e-6, atol=1e-7)


def test_curricular_t_updates_before_use_and_carries_over():
    head, x, y = make("curricular")
    t = torch.tensor(0.0, dtype=torch.float64)
    for step in range(3):
        xs = x + 0.1 * step
        loss = head(xs, y)
        ref, t = ref_curricular(xs, head.weight.detach(), y, 64.0, 0.5, t, 0.01)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(head.t.double(), t, rtol=1e-5, atol=1e-7)
    head.eval()
    before = head.t.clone()
    head(x, y)
    assert head.t == before, "t must not move in eval mode"


def test_npt_never_takes_the_target_as_a_negative():
    """cos_y = 0.2 and every negative cosine below 0: the released code's zero-filled target slot
    would be the nearest "negative" (loss 2 * (0 - 0.2 + 0.5) = 0.6); the true nearest negative has
    cos = -0.1, so the loss is 2 * (-0.1 - 0.2 + 0.5) = 0.4."""
    x = torch.tensor([[1.0, 0.0]])
    angles = torch.acos(torch.tensor([0.2, -0.1, -0.5]))
    signs = torch.tensor([1.0, -1.0, 1.0])
    head = heads.NPT(2, 3, k=1)
    with torch.no_grad():
        head.weight.copy_(torch.stack([torch.cos(angles), signs * torch.sin(angles)], 1))
    loss = head(x, torch.tensor([0]))
    assert math.isclose(loss.item(), 0.4, rel_tol=1e-5)
    assert math.isclose(float(ref_npt(x, head.weight.detach(), torch.tensor([0]), 1, 1.0, 1.0)), 0.4, rel_tol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_proxies_move_after_one_optimizer_step(name):
    head, x, y = make(name)
    before = head.weight.detach().clone()
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    head(x, y).backward()
    opt.step()
    assert not torch.equal(before, head.weight.detach())


@pytest.mark.parametrize("name", list(CASES))
def test_logits_are_cosines(name):
    head, x, _ = make(name)
    torch.testing.assert_close(head.logits(x).double(), cosines(x, head.weight.detach()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "x, y, message",
    [
        (torch.randn(4, 7), torch.tensor([0, 1, 2, 3]), "shape"),
        (torch.randn(4, 8), torch.tensor([0, 1, 2]), "labels must have shape"),
        (torch.randn(4, 8), torch.tensor([0, 1, 2, 6]), r"labels must lie in \[0, 6\)"),
        (torch.randn(4, 8), torch.tensor([0, 1, -1, 3]), r"labels must lie in \[0, 6\)"),
        (torch.tensor([[float("nan")] * 8] * 4), torch.tensor([0, 1, 2, 3]), "NaN or inf"),
        (torch.randn(4, 8), torch.tensor([0.0, 1, 2, 3]), "integer"),
    ],
)
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_rejected_with_a_clear_error(name, x, y, message):
    head = CASES[name][0](8, 6)
    with pytest.raises((ValueError, TypeError), match=message):
        head(x, y)


def test_bad_hyper_parameters():
    with pytest.raises(ValueError, match="k must lie"):
        heads.NPT(8, 4, k=4)
    with pytest.raises(ValueError, match=r"s must lie in \(0, inf\), got 0"):
        heads.ArcFace(8, 4, s=0)
    with pytest.raises(ValueError, match="unknown head"):
        heads.make_head("arcfce", 8, 4)
    with pytest.raises(ValueError, match=r"Softmax has no hyper-parameter \['s'\]"):
        heads.make_head("softmax", 8, 4, s=3.0)
    assert isinstance(heads.make_head("softmax", 8, 4, ignore_unknown=True, s=3.0), heads.Softmax)
    assert heads.make_head("CosFace", 8, 4, ignore_unknown=True, s=3.0, k=2).s == 3.0


@pytest.mark.parametrize("name", ["normface", "cosface", "arcface", "curricular"])
def test_margin_logits_are_what_training_compares(name):
    head, x, y = make(name)
    head.eval()
    with torch.no_grad():
        head.t.fill_(0.3) if hasattr(head, "t") else None
        expected = head(x, y, with_logits=True)[1] / head.s  # the fused kernel's logits
        got = head.margin_logits(head.logits(x), y)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_npt_margin_logits_mark_where_the_hinge_vanishes():
    head, x, y = make("npt", B=40)
    cos = head.logits(x)
    satisfied = head.margin_logits(cos, y).argmax(1) == y
    per_sample = torch.stack([head(x[i : i + 1], y[i : i + 1]) for i in range(40)])
    assert torch.equal(satisfied, per_sample == 0)


DEVICE = os.environ.get("FRLAB_TEST_DEVICE", "cuda")  # FRLAB_TEST_DEVICE=cpu rehearses the GPU tests here


@pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_the_reference_in_fp32_and_under_bf16_autocast(name):
    head, x, y = make(name)
    head = head.to(DEVICE)
    xc = x.clone().to(DEVICE).requires_grad_(True)
    loss = head(xc, y.to(DEVICE))
    loss.backward()
    x64 = x.double().requires_grad_(True)
    w64 = head.weight.detach().cpu().double().requires_grad_(True)
    ref = CASES[name][1](type("W", (), {"weight": w64})(), x64, y)
    ref.backward()
    ref = ref.detach()
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xc.grad.double().cpu(), x64.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(head.weight.grad.double().cpu(), w64.grad, rtol=1e-3, atol=1e-4)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        loss16 = head(x.to(DEVICE), y.to(DEVICE))
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16.double().cpu(), ref, rtol=0.05, atol=0.05 * float(ref))


# ------------------------------------------------------------------ forward == reference, for every registered head
class Amplified(heads.MarginHead):
    """A user's head whose negatives the kernel has no fused form of: positive cosines x 1.5."""

    def __init__(self, in_features, num_classes, s=16.0, m=0.2):
        super().__init__(in_features, num_classes, s)
        self.m = m

    def target(self, cos_y):
        return cos_y - self.m

    def negatives(self, cos, cos_y):
        return torch.where(cos > 0, 1.5 * cos, cos)


class ArcWithoutSlope(heads.ArcFace):
    """Changes ArcFace's target but not its closed-form slope: training must not use ArcFace's."""

    def target(self, cos_y):
        return heads.arc_target(cos_y, self.m) - 0.1 * cos_y**2


class CurricularSquared(heads.CurricularFace):
    """Changes CurricularFace's negatives, not their fused form: the fused form must not be used."""

    def negatives(self, cos, cos_y):
        return torch.where(cos > self.hardness_threshold(cos_y), cos * (self.t + cos) ** 2, cos)


@pytest.fixture
def registered():
    """The built-in heads and three user heads, registered as a user would."""
    added = [heads.register(cls) for cls in (Amplified, ArcWithoutSlope, CurricularSquared)]
    yield dict(heads.HEADS)
    for cls in added:
        del heads.HEADS[cls.__name__.lower()]


def _pair(cls, D=8, C=7, B=12, seed=0):
    """A head, an identical copy of it (state included) and a batch."""
    torch.manual_seed(seed)
    kw = {"k": 2} if cls is heads.NPT else {}
    a = cls(D, C, **kw)
    with torch.no_grad():
        a.weight.normal_()
        if hasattr(a, "t"):
            a.t.fill_(0.4)
    b = cls(D, C, **kw)
    b.load_state_dict(a.state_dict())
    return a, b, torch.randn(B, D), torch.randint(0, C, (B,))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_registered_head_trains_what_its_reference_defines(registered, reduction, training):
    for name, cls in registered.items():
        if not issubclass(cls, heads.MarginHead):
            continue
        fused, ref, x, y = _pair(cls)
        fused.train(training), ref.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        la, lb = fused(xa, y, reduction=reduction), ref.reference(xb, y, reduction=reduction)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        weights = torch.linspace(0.5, 1.5, len(y)) if reduction == "none" else torch.tensor(1.0)
        (la * weights).sum().backward()
        (lb * weights).sum().backward()
        scale = max(1.0, float(xb.grad.abs().max()), float(ref.weight.grad.abs().max()))  # float32 at s = 64
        torch.testing.assert_close(
            xa.grad, xb.grad, rtol=1e-4, atol=1e-6 * scale, msg=lambda m, name=name: f"{name}: {m}"
        )
        torch.testing.assert_close(
            fused.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-6 * scale, msg=lambda m, name=name: f"{name}: {m}"
        )
        if hasattr(fused, "t"):
            assert float(fused.t) == pytest.approx(float(ref.t), abs=1e-7), name


def test_heads_without_a_fused_form_fall_back_and_the_others_do_not(registered):
    assert not Amplified(8, 4).fusable() and not CurricularSquared(8, 4).fusable()
    assert all(
        cls(8, 4).fusable()
        for cls in (heads.NormFace, heads.CosFace, heads.ArcFace, heads.CurricularFace, ArcWithoutSlope)
    )
    head, _, x, y = _pair(Amplified)
    assert head(x, y).grad_fn.name() == head.reference(x, y).grad_fn.name() == "NllLossBackward0"
    head, _, x, y = _pair(heads.ArcFace)
    assert "CosineCrossEntropy" in head(x, y).grad_fn.name()


@pytest.mark.parametrize("name", ["softmax", "normface", "cosface", "arcface", "curricular", "npt"])
def test_per_sample_losses_are_the_losses_of_each_sample(name):
    head, x, y = make(name)
    head.eval()  # CurricularFace's t must not move between the calls
    per_sample = head(x, y, reduction="none")
    one_by_one = torch.stack([head(x[i : i + 1], y[i : i + 1]) for i in range(len(y))])
    torch.testing.assert_close(per_sample, one_by_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head(x, y, reduction="sum"), per_sample.sum(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["normface", "cosface", "arcface", "curricular"])
def test_with_logits_returns_the_margin_logits_without_a_second_product(name):
    head, x, y = make(name)
    head.eval()
    loss, logits = head(x, y, with_logits=True)
    assert not logits.requires_grad and logits.shape == (len(y), head.num_classes)
    torch.testing.assert_close(logits, head.s * head.margin_logits(head.logits(x), y), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make_head, message",
    [
        (lambda: heads.ArcFace(8, 4, m=2.0), r"m must lie in \[0, 1.57"),
        (lambda: heads.ArcFace(8, 4, m=-0.1), r"m must lie in \[0"),
        (lambda: heads.CosFace(8, 4, m=2.0), r"m must lie in \[0, 2\)"),
        (lambda: heads.CosFace(8, 4, s=-1.0), r"s must lie in \(0"),
        (lambda: heads.CurricularFace(8, 4, t_momentum=1.5), "t_momentum"),
        (lambda: heads.NPT(8, 4, r=0.0), r"r must lie in \(0"),
        (lambda: heads.NPT(8, 4, delta=-1.0), "delta"),
        (lambda: heads.ArcFace(8, 1), "num_classes"),
        (lambda: heads.ArcFace(0, 4), "in_features"),
        (lambda: heads.ArcFace(8, 4, s="64"), "s must be a number"),
        (lambda: heads.NPT(8, 4, k=1.0), "k must be an integer"),
        (lambda: heads.ArcFace(8, 4)(torch.randn(2, 8), torch.tensor([0, 1]), reduction="avg"), "reduction"),
    ],
)
def test_out_of_range_and_wrongly_typed_hyper_parameters_are_refused(make_head, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make_head()


def test_register_refuses_what_is_not_a_head():
    with pytest.raises(TypeError, match="Head subclasses"):
        heads.register(torch.nn.Linear)


@pytest.mark.parametrize(
    "name", ["normface", "cosface", "arcface", "curricular_t05", "npt", "npt_k3_r2", "custom_target"]
)
def test_the_loss_as_a_function_of_the_cosines_is_the_loss(name):
    head, x, y = make(name)
    head = head.double().eval()
    cos = head.logits(x.double()).detach().requires_grad_()
    via_cos = head.loss_from_cosines(cos, y)
    torch.testing.assert_close(via_cos, head(x.double(), y), rtol=1e-9, atol=1e-9)
    (grad,) = torch.autograd.grad(via_cos, cos)
    assert torch.isfinite(grad).all()
    if name.startswith(
        "npt"
    ):  # NPT's logit gradients: +2 r^2 on each active top-k proxy, -2 r^2 per active one on the target
        unit = 2 * head.r**2 / len(y)
        pushed = grad.clamp(min=0)
        assert torch.allclose(pushed[pushed > 0], torch.full_like(pushed[pushed > 0], unit))
        assert ((pushed > 0).sum(1) <= head.k).all()
        torch.testing.assert_close(grad.gather(1, y[:, None]).squeeze(1), -(pushed > 0).sum(1).double() * unit)
    with pytest.raises(NotImplementedError):
        heads.Softmax(8, 6).loss_from_cosines(cos, y)

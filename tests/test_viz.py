"""Figures and widgets as a user meets them: what they show, not how they look."""

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

from frlab import heads, viz  # noqa: E402
from frlab.data import SynthFaces  # noqa: E402


def test_the_face_explorer_shows_its_face_square_and_rerenders_when_a_slider_moves():
    faces = SynthFaces(range(3), images_per_identity=1, size=32)
    box = viz.face_explorer(faces, zoom=4)
    sliders, image = box.children
    assert image.layout.width == image.layout.height == "128px"  # never stretched to the sliders' column
    assert box.layout.align_items == "flex-start"
    before = image.value
    yaw = next(s for s in sliders.children if s.description == "yaw")
    yaw.value = yaw.max
    assert image.value != before


def test_the_margin_explorer_keeps_its_axis_so_that_s_moves_the_curves():
    lo = viz.target_logit_curves(s=16, s_axis=128).axes[0]
    hi = viz.target_logit_curves(s=100, s_axis=128).axes[0]
    assert lo.get_ylim() == hi.get_ylim()
    assert max(abs(y).max() for y in (line.get_ydata() for line in lo.lines[:3])) <= 16 * 1.5  # s (1 + m) at most
    assert max(abs(y).max() for y in (line.get_ydata() for line in hi.lines[:3])) > 90


def test_the_circle_has_a_key_when_asked():
    torch.manual_seed(0)
    head = heads.ArcFace(2, 4, s=8.0, m=0.3)
    fig = viz.embedding_circle(torch.randn(20, 2), torch.randint(0, 4, (20,)), head, key=True)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("inner ring" in t for t in texts) and any("proxy" in t for t in texts)
    assert viz.embedding_circle(torch.randn(20, 2), torch.randint(0, 4, (20,)), head).axes[0].get_legend() is None


def test_a_run_too_short_for_a_curve_says_so():
    fig = viz.training_curves([{"step": 0, "loss": 8.0}])
    assert any("too short" in t.get_text() for t in fig.axes[0].texts)

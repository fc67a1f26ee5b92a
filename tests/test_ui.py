"""The widgets as a user meets them: JupyterLab in a real headless browser (Playwright with the
system's chromium: `apt-get install chromium`; Playwright's own browser download needs the
internet). Notebooks 02 and 01 run at their smoke parameters; moving a slider must change what
the widget shows. Skips, with the reason, where chromium or Playwright is missing."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "frlab-ui-test"
PROMPTS = "[...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')]"


def smoke_copy(name: str, folder: Path) -> Path:
    """The notebook with its smoke parameters written into its parameters cell."""
    from frlab.runner import plan

    nb_path = ROOT / "notebooks" / f"{name}.ipynb"
    p = plan(nb_path, [], smoke=True)
    nb = json.loads(nb_path.read_text())
    values = {**p.values, "run_dir": str(folder / "runs" / name)}
    nb["cells"][p.params_cell]["source"] = "".join(f"{k} = {v!r}\n" for k, v in values.items())
    out = folder / nb_path.name
    out.write_text(json.dumps(nb))
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lab")
    for name in ("01_synthfaces", "02_margin_geometry"):
        smoke_copy(name, folder)
    settings = folder / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')  # every cell in the page
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(folder / "settings"), "FRLAB_HOME": str(folder)}
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(folder / "workspaces")  # no tabs restored from elsewhere
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", f"--port={port}",
         "--ip=127.0.0.1", f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={folder}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("JupyterLab did not start within a minute")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser, url
        browser.close()
    server.terminate()
    server.wait(timeout=30)


def run_all(browser, url: str, name: str):
    """Open a notebook, run every cell, wait until the kernel is idle with no cell left to run."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{url}/lab/tree/{name}.ipynb?reset&token={TOKEN}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=60_000)
    for _ in range(4):  # a click that lands before the kernel is connected runs nothing: click again
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()
        try:
            page.wait_for_function(
                f"() => {PROMPTS}.some(q => /\\[(\\*|\\d+)\\]/.test(q.textContent))",
                timeout=15_000,
            )
            break
        except sync_api.TimeoutError:
            continue
    try:
        page.wait_for_function(
            f"() => {{ const p = {PROMPTS}; return p.length > 0 && p.every(q => /\\[\\d+\\]/.test(q.textContent)); }}",
            timeout=240_000,
        )
    except sync_api.TimeoutError:
        shot = Path(os.environ.get("TMPDIR", "/tmp")) / f"frlab-ui-{name}.png"
        page.screenshot(path=str(shot), full_page=True)
        prompts = page.evaluate(f"() => {PROMPTS}.map(p => p.textContent)")
        pytest.fail(f"{name} did not finish running in JupyterLab: prompts {prompts}; screenshot {shot}")
    assert page.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']").count() == 0
    return page


def slider(page, description: str):
    return page.locator(".widget-slider", has=page.locator(".widget-label", has_text=description)).first


def move(page, description: str, presses: int = 20):
    """Move a slider as a user does from the keyboard: focus its handle, press the right arrow."""
    handle = slider(page, description).locator(".noUi-handle")
    handle.focus()
    for _ in range(presses):
        page.keyboard.press("ArrowRight")


def test_moving_s_in_02_redraws_the_target_logit_curves(lab):
    browser, url = lab
    page = run_all(browser, url, "02_margin_geometry")
    figure = page.locator(".widget-output img").first
    before = figure.get_attribute("src")
    move(page, "s")
    page.wait_for_function(
        "(before) => { const i = document.querySelector('.widget-output img'); return i && i.src !== before; }",
        arg=before,
        timeout=30_000,
    )
    page.close()


def test_moving_yaw_in_01_rerenders_the_face(lab):
    browser, url = lab
    page = run_all(browser, url, "01_synthfaces")
    face = page.locator(".widget-image").first
    box = face.bounding_box()
    assert abs(box["width"] - box["height"]) < 2, box  # square, not stretched
    before = face.get_attribute("src")
    move(page, "yaw")
    page.wait_for_function(
        "(before) => document.querySelector('.widget-image').src !== before", arg=before, timeout=30_000
    )
    page.close()

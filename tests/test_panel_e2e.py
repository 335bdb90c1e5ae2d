"""The sessions panel in a real browser: Debian's chromium, driven by Playwright, against a real
``jupyter lab`` that this module starts on 127.0.0.1 with a token (and stops).

Sessions are made with the Python API by a separate process started in a sub-folder of the
server's root, as a notebook kernel there would be: it must find the store the server shows.
Screenshots go to ``test-artifacts/panel/`` (gitignored).

Needs: the playwright Python package, /usr/bin/chromium (``apt-get install chromium``), and the
built labextension installed (``pip install -e .`` builds it). Outside CI a missing piece skips
these tests; with ``CI`` set it fails them, so CI cannot pass without running them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "panel"
CHROMIUM = os.environ.get("PROMPTSCOPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync",
                 "--disable-quic"]
XSS = "<img src=x onerror=alert(1)>"
TIMEOUT_MS = 60_000


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"browser test prerequisites missing in CI: {reason}")
    pytest.skip(reason)


def _labextension_installed() -> bool:
    from jupyter_core.paths import jupyter_path

    return any((Path(p) / "promptscope" / "package.json").is_file()
               for p in jupyter_path("labextensions"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MAKE_SESSIONS = r"""
import json, sys, time
import promptscope
from promptscope.models.hf import HFModel
from promptscope.store import Store

model_dir, xss = sys.argv[1], sys.argv[2]
a = HFModel.from_pretrained(model_dir, name="tiny-a")
b = HFModel.from_pretrained(model_dir, name="tiny-b")
ids = {}
ids["capitals"] = promptscope.run_prompt(
    "Is {city} in {{Europe|Asia}}? Answer:", a, vars=[{"city": "Paris"}, {"city": "Tokyo"}],
    choices=" yes| no", name="capitals sweep", progress=False).session_id
time.sleep(1.1)  # distinct creation seconds: a stable newest-first order
ids["greeting"] = promptscope.run_prompt(
    "{{Hi|Hello}} there", b, target=" friend", name="greeting target", progress=False).session_id
time.sleep(1.1)
ids["xss"] = promptscope.run_prompt(
    "Say " + xss + " {{yes|no}}:", a, choices=" ok| no", name="probe " + xss,
    progress=False).session_id
print(json.dumps({"ids": ids, "store": str(Store.default().path)}))
"""


# A widget with figures, on a tiny model made in the kernel (the test root has no model folder).
WIDGET_CELL = """
import tempfile
from promptscope.models.hf import HFModel
from promptscope.testing import make_tiny_model
from promptscope.widgets import SteeringWidget
folder = make_tiny_model(tempfile.mkdtemp())
model = HFModel.from_pretrained(folder, name="tiny")
SteeringWidget("<<Ann lives in Rome.>> Bob lives in Oslo. Ann lives in", model,
               choices=" Rome| Oslo", heads=["all"])
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A running JupyterLab: ``{"url", "token", "root", "port"}``."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        _missing(f"{CHROMIUM} not found (apt-get install chromium)")
    if shutil.which("jupyter-lab") is None and shutil.which("jupyter") is None:
        _missing("jupyterlab is not installed")
    if not _labextension_installed():
        _missing("the promptscope labextension is not installed (pip install -e . builds it)")

    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    settings = base / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # No news / update toasts over the UI: the machine is offline and screenshots stay clean.
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, root / "analysis.ipynb")
    nb.cells = [nbformat.v4.new_code_cell(WIDGET_CELL)]
    nbformat.write(nb, root / "widgets.ipynb")

    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "PROMPTSCOPE_HOME"}
    env.update({"JUPYTER_CONFIG_DIR": str(base / "config"),
                "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
                "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces")})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "jupyter-lab.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         f"--LabApp.user_settings_dir={base / 'settings'}", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.expose_app_in_browser=True", "--ServerApp.allow_root=True"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("jupyter lab did not start; see "
                                       f"{ARTIFACTS / 'jupyter-lab.log'}") from None
                time.sleep(0.5)
        yield {"url": url, "token": token, "root": root, "port": port, "env": env}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def sessions(lab: dict[str, Any], tiny_llama_dir: Path) -> dict[str, Any]:
    """Four sessions made by a process in a sub-folder of the server's root."""
    assert (lab["root"] / ".promptscope").is_dir()  # the server made the workspace at start
    folder = lab["root"] / "projects" / "week1"
    folder.mkdir(parents=True)
    out = subprocess.run([sys.executable, "-c", MAKE_SESSIONS, str(tiny_llama_dir), XSS],
                         cwd=folder, env=lab["env"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    made = json.loads(out.stdout.strip().splitlines()[-1])
    # A run still going: made by this (live) process; one left by an exited process would show
    # as interrupted (tests/test_store.py).
    time.sleep(1.1)
    from promptscope.store import Store

    made["ids"]["running"] = Store(made["store"]).create("prompt", name="still running",
                                                         model="tiny-a")
    assert Path(made["store"]).resolve() == (lab["root"] / ".promptscope" /
                                             "sessions.sqlite").resolve()
    return made


@pytest.fixture(scope="module")
def browser() -> Any:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def test_panel_end_to_end(lab: dict[str, Any], sessions: dict[str, Any], browser: Any) -> None:
    from playwright.sync_api import expect

    ids = sessions["ids"]
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    dialogs: list[str] = []
    stray: list[str] = []
    errors: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    # An <img src=x> made from prompt text would request ".../x".
    page.on("request", lambda r: stray.append(r.url) if r.url.rstrip("/").endswith("/x") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{lab['url']}/lab/tree/analysis.ipynb?token={lab['token']}")
        expect(page.locator(".jp-Notebook .jp-Cell")).to_have_count(1)

        # The promptscope icon in the left sidebar opens the panel.
        tab = page.locator('.jp-SideBar.jp-mod-left [data-id="promptscope-sessions"]')
        expect(tab).to_be_visible()
        tab.click()
        panel = page.locator("#promptscope-sessions")
        items = panel.locator(".jp-PromptscopeSession")
        expect(items).to_have_count(4)
        names = panel.locator(".jp-PromptscopeSession-name")
        expect(names).to_have_text(["still running", f"probe {XSS}", "greeting target",
                                    "capitals sweep"])
        expect(panel.locator(".jp-PromptscopeStatus")).to_have_text(
            ["running", "done", "done", "done"])
        expect(panel.locator(".jp-PromptscopeCount")).to_have_text("4 sessions")
        _shot(page, "01-list")

        # Search (prompt text) and filters.
        search = panel.get_by_label("Search sessions")
        search.fill("Europe")
        expect(names).to_have_text(["capitals sweep"])
        search.fill("")
        expect(items).to_have_count(4)
        panel.get_by_label("Model").select_option("tiny-b")
        expect(names).to_have_text(["greeting target"])
        _shot(page, "02-filtered")
        panel.get_by_label("Model").select_option("")
        panel.get_by_label("Status").select_option("running")
        expect(names).to_have_text(["still running"])
        # A run its kernel is still writing cannot be deleted from under it.
        panel.locator(f'[data-session-id="{ids["running"]}"]').click()
        running = panel.locator(".jp-PromptscopeDetail")
        expect(running.locator(".jp-PromptscopeTitle")).to_have_text("still running")
        expect(running.get_by_role("button", name="Delete")).to_be_disabled()
        running.get_by_role("button", name="Back to the session list").click()
        panel.get_by_label("Status").select_option("")
        expect(items).to_have_count(4)

        # A new session appears without a reload (the panel polls).
        from promptscope.store import Store

        Store(sessions["store"]).create("prompt", name="arrived later", model="tiny-a")
        expect(items).to_have_count(5, timeout=20_000)
        expect(names.first).to_have_text("arrived later")

        # Detail: figure drawn by the bundled plotly.js, summary table, source.
        panel.locator(f'[data-session-id="{ids["capitals"]}"]').click()
        detail = panel.locator(".jp-PromptscopeDetail")
        expect(detail.locator(".jp-PromptscopeTitle")).to_have_text("capitals sweep")
        plot = detail.locator(".jp-PromptscopeFigure-plot")
        expect(plot.locator(".main-svg").first).to_be_visible()
        assert plot.locator(".barlayer .point").count() == 8  # 4 variants x 2 choices
        expect(detail.locator(".jp-PromptscopeTable tbody tr")).to_have_count(4)
        expect(detail.get_by_label("Source")).to_contain_text("Is {city} in {{Europe|Asia}}?")
        _shot(page, "03-detail")

        # Exports download files: the table as CSV, a standalone HTML report.
        with page.expect_download() as csv_download:
            detail.get_by_role("button", name="CSV").click()
        assert csv_download.value.suggested_filename == f"{ids['capitals']}-rows.csv"
        csv_text = Path(csv_download.value.path()).read_text()
        assert csv_text.startswith("variant,") and "Tokyo" in csv_text
        with page.expect_download() as html_download:
            detail.get_by_role("button", name="HTML report").click()
        report = Path(html_download.value.path()).read_text()
        assert "<h1>capitals sweep</h1>" in report and "Plotly.newPlot" in report

        # Insert in notebook: a cell below the active one that loads this session.
        detail.get_by_role("button", name="Insert in notebook").click()
        cells = page.locator(".jp-Notebook .jp-Cell")
        expect(cells).to_have_count(2)
        expect(cells.nth(1).locator(".cm-content")).to_contain_text(
            f'promptscope.load("{ids["capitals"]}")')
        _shot(page, "04-inserted")

        # Keyboard: back, then open the XSS session with Enter. Its markup stays text.
        detail.get_by_role("button", name="Back to the session list").click()
        item = panel.locator(f'[data-session-id="{ids["xss"]}"]')
        item.focus()
        page.keyboard.press("Enter")
        expect(detail.locator(".jp-PromptscopeTitle")).to_have_text(f"probe {XSS}")
        expect(detail.get_by_label("Source")).to_contain_text(f"Say {XSS}")
        expect(detail.locator(".main-svg").first).to_be_visible()
        assert panel.locator("img").count() == 0
        _shot(page, "05-xss-as-text")

        # Delete, with confirmation.
        detail.get_by_role("button", name="Delete").click()
        dialog = page.locator(".jp-Dialog")
        expect(dialog).to_contain_text("will be deleted")
        _shot(page, "06-delete-confirm")
        dialog.get_by_role("button", name="Delete").click()
        expect(items).to_have_count(4)
        expect(panel.locator(f'[data-session-id="{ids["xss"]}"]')).to_have_count(0)
        assert ids["xss"] not in [r.id for r in Store(sessions["store"]).list()]

        # The dark theme: same panel, JupyterLab's dark variables.
        page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', "
                      "{theme: 'JupyterLab Dark'})")
        expect(page.locator("body[data-jp-theme-light='false']")).to_have_count(1)
        panel.locator(f'[data-session-id="{ids["greeting"]}"]').click()
        expect(detail.locator(".main-svg").first).to_be_visible()
        detail.get_by_role("button", name="Rename").click()
        page.locator(".jp-Dialog input").fill("greeting v2")
        page.locator(".jp-Dialog .jp-mod-accept").click()
        expect(detail.locator(".jp-PromptscopeTitle")).to_have_text("greeting v2")
        assert Store(sessions["store"]).get(ids["greeting"]).name == "greeting v2"
        page.wait_for_timeout(500)
        _shot(page, "07-dark-detail")

        assert dialogs == [], f"a script from session text ran: {dialogs}"
        assert stray == [], f"markup from session text made requests: {stray}"
        assert not errors, errors
    except Exception:
        _shot(page, "failure")
        raise
    finally:
        context.close()


def test_widget_figures_render_offline(lab: dict[str, Any], browser: Any) -> None:
    """A steering widget in a notebook draws its plotly figures with no request off this host
    (the figures are mime bundles in Output widgets, drawn by the bundled plotly renderer)."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    remote: list[str] = []
    page.on("request", lambda r: remote.append(r.url)
            if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
    try:
        # A workspace of its own, reset: only this notebook open, whatever ran before.
        page.goto(f"{lab['url']}/lab/workspaces/widgets/tree/widgets.ipynb?reset"
                  f"&token={lab['token']}")
        expect(page.locator(".jp-Notebook .jp-Cell")).to_have_count(1)
        page.wait_for_function("window.jupyterapp.shell.currentWidget?.sessionContext?.session"
                               "?.kernel?.status === 'idle'", timeout=120_000)
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        plots = page.locator(".widget-output .js-plotly-plot .main-svg")
        expect(plots.first).to_be_visible(timeout=180_000)
        expect(page.locator(".widget-output .js-plotly-plot")).to_have_count(2)
        expect(page.locator(".widget-slider")).to_have_count(1)
        _shot(page, "08-steering-widget")
        assert remote == [], f"requests off this host: {remote}"
    except Exception:
        _shot(page, "failure-widget")
        raise
    finally:
        context.close()


def test_typescript_unit_tests() -> None:
    """The panel's vitest suite (labextension/src/__tests__), when its npm packages are there."""
    ext = REPO / "labextension"
    vitest = ext / "node_modules" / ".bin" / "vitest"
    if not vitest.exists() or shutil.which("node") is None:
        _missing("labextension/node_modules is not installed (pip install -e . installs it)")
    out = subprocess.run([str(vitest), "run"], cwd=ext, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "CI": "true", "NO_COLOR": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

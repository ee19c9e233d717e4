"""The fleet page at /corral/ in a real browser (Debian's chromium, driven by playwright) against
`corral up` on the simulated rig; and its files inside the built wheel.

The page must load without console errors, name every backend and GPU, show a model loaded
through the gateway within 2 s and a killed backend as down within the health interval plus 2 s,
and, with admin keys, show nothing without the key and the fleet with it. Screenshots of the page
and of `corral top` are written under the test's tmp dir (and copied to $CORRAL_SCREENSHOTS_DIR
when set: that is how the README's pictures in docs/ are refreshed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from launcher.commands import top
from tests.launcher.test_supervisor import wait_gone
from tests.launcher.test_up import UpProcess, rig_config, start_up, stop_up

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
HEALTH_INTERVAL_S = 1.0
ADMIN_KEY = "page-test-admin-key"
PAGE_FILES = ("index.html", "page.css", "page.js")

try:
    from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright
    from playwright.async_api import TimeoutError as PlaywrightTimeout
except ImportError:  # pragma: no cover - the test extra installs it
    async_playwright = None  # type: ignore[assignment]

needs_browser = pytest.mark.skipif(
    async_playwright is None or not CHROMIUM.exists(),
    reason="needs Debian's chromium (apt-get install -y chromium) and playwright (pip install -e '.[test]'); "
    ".ci/run installs both",
)


def page_rig(tmp_path: Path) -> tuple[Path, str]:
    """The example rig, checked every second, and slow to restart a killed backend (so it stays
    down long enough to be seen)."""
    config, url = rig_config(tmp_path, extra_launcher="restart_backoff_s = 30\n")
    text = config.read_text().replace("[gateway]\n", f"[gateway]\nhealth_interval_s = {HEALTH_INTERVAL_S}\n", 1)
    config.write_text(text)
    return config, url


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert async_playwright is not None
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


class Console:
    """What the page said on its console, and any uncaught error."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._message)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def _message(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


async def fetch_status(url: str, key: str = "") -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http, http.get(url + "/api/corral/status", headers=headers) as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


def backend_pid(up: UpProcess, port: int) -> int:
    """The pid of the backend process listening on `port` (its OLLAMA_HOST says so)."""
    for pid in up.descendants():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"OLLAMA_HOST=127.0.0.1:{port}".encode() in environ:
            return pid
    raise AssertionError(f"no backend process on port {port}")


async def picture_ready(page: Page, uuid: str) -> None:
    """Give the launcher's GPU refresh (every 2 s) a moment to show the loaded models' memory, so
    the picture has it; the picture is taken either way (nothing is asserted here)."""
    # A selector, not a JavaScript predicate: the page's CSP forbids eval, which those use.
    with contextlib.suppress(PlaywrightTimeout):
        await page.wait_for_selector(f'[data-gpu="{uuid}"]:not([data-used-bytes="0"])', timeout=4000)


def keep_screenshot(path: Path) -> None:
    target = os.environ.get("CORRAL_SCREENSHOTS_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def save_top_screenshot(status: dict[str, Any], url: str, path: Path) -> None:
    console = top.Console(record=True, width=150, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(top.frame(status, url))  # type: ignore[arg-type]
    console.save_svg(str(path), title="corral top")
    console.file.close()


@needs_browser
async def test_page_shows_the_rig_live(tmp_path: Path, browser: Browser) -> None:
    config, url = page_rig(tmp_path)
    up = await start_up(config, "--no-preload")
    children: list[int] = []
    try:
        await up.wait_for_line("ready: ")
        assert f"watch: {url}/corral/  or  corral top --url {url}" in await up.wait_for_line("watch: ")
        children = up.descendants()
        status = await fetch_status(url)
        backends = {b["id"]: b for b in status["backends"]}
        gpus = [g for cards in status["gpus"].values() for g in cards]
        assert len(backends) == 3 and len(gpus) == 4

        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        console = Console(page)
        response = await page.goto(url + "/corral/")
        assert response is not None and response.status == 200
        await page.wait_for_selector("[data-backend]")
        for backend_id, backend in backends.items():
            card = page.locator(f'[data-backend="{backend_id}"]')
            assert backend_id in await card.locator("h3").inner_text()
            assert await card.get_attribute("data-status") == "ready"
            for name in backend["planned_models"]:  # planned, not loaded (--no-preload)
                row = card.locator(f'tr[data-model="{name}"]')
                assert await row.get_attribute("data-resident") == "false"
        for gpu in gpus:
            assert gpu["name"] in await page.locator(f'[data-gpu="{gpu["uuid"]}"]').inner_text()

        # A model loaded through the gateway shows as resident on its backend within 2 s.
        async with aiohttp.ClientSession() as http:
            for model in ("llama3.1:8b", "qwen2.5:7b"):  # --no-preload: nothing is pulled yet
                async with http.post(url + "/api/pull", json={"model": model, "stream": False}) as resp:
                    assert resp.status == 200, await resp.text()
            body = {"model": "llama3.1:8b", "prompt": "Why is the sky blue?", "stream": False}
            async with http.post(url + "/api/generate", json=body) as resp:
                assert resp.status == 200
                served_by = resp.headers["X-Corral-Backend"]
            resident = f'[data-backend="{served_by}"] tr[data-model="llama3.1:8b"][data-resident="true"]'
            await page.wait_for_selector(resident, timeout=2000)
            await page.wait_for_selector('#models tr[data-model="llama3.1:8b"]', timeout=2000)
            for model in ("qwen2.5:7b", "llama3.1:8b"):  # some traffic for the pictures
                chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
                async with http.post(url + "/api/chat", json=chat) as resp:
                    assert resp.status == 200
        await page.wait_for_selector('#decisions td:text-is("qwen2.5:7b")', timeout=5000)
        await picture_ready(page, next(g["uuid"] for g in gpus if g["backend"] == served_by))
        shot = tmp_path / "fleet-page.png"
        await page.screenshot(path=str(shot), full_page=True)
        keep_screenshot(shot)
        top_shot = tmp_path / "corral-top.svg"
        save_top_screenshot(await fetch_status(url), url, top_shot)
        keep_screenshot(top_shot)

        # The same page on a phone in dark mode.
        phone = await browser.new_page(viewport={"width": 390, "height": 844}, color_scheme="dark")
        phone_console = Console(phone)
        await phone.goto(url + "/corral/")
        # The backend's card, not the model's residency: the chats above may have made the router
        # move llama3.1:8b since (the desktop page already showed it resident within 2 s).
        await phone.wait_for_selector(f'[data-backend="{served_by}"] tr[data-model]')
        phone_shot = tmp_path / "fleet-page-phone-dark.png"
        await phone.screenshot(path=str(phone_shot), full_page=True)
        keep_screenshot(phone_shot)
        await phone.close()

        # A backend killed shows as down within the health interval plus 2 s, with a warning.
        victim = next(b for b in backends if b != served_by)
        port = int(backends[victim]["url"].rsplit(":", 1)[1])
        os.kill(backend_pid(up, port), signal.SIGKILL)
        down = f'[data-backend="{victim}"][data-status="down"]'
        await page.wait_for_selector(down, timeout=(HEALTH_INTERVAL_S + 2) * 1000)
        await page.wait_for_selector(f'[data-warning="backend_down"][data-subject="{victim}"]', timeout=2000)
        assert console.errors == [] and phone_console.errors == []
    finally:
        code = await stop_up(up)
    assert code == 0, up.stderr
    await wait_gone(children)


@needs_browser
async def test_with_admin_keys_the_page_asks_for_the_key(
    tmp_path: Path, browser: Browser, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_ADMIN_KEYS", ADMIN_KEY)
    config, url = page_rig(tmp_path)
    up = await start_up(config, "--no-preload")
    try:
        await up.wait_for_line("ready: ")
        backends = [b["id"] for b in (await fetch_status(url, ADMIN_KEY))["backends"]]
        page = await browser.new_page()
        response = await page.goto(url + "/corral/")
        assert response is not None and response.status == 200  # the page itself is open
        await page.wait_for_selector("#keyform", state="visible")
        assert await page.locator("[data-backend]").count() == 0
        assert await page.locator("#live").inner_text() == "key needed"
        refused = await page.evaluate("fetch('/api/corral/status').then(r => r.status)")
        assert refused == 401

        await page.fill("#key", "not-the-key")
        await page.click("#keyform button")
        await page.wait_for_selector("#keyform", state="visible")
        assert "refused" in await page.locator("#keymsg").inner_text()

        await page.fill("#key", ADMIN_KEY)
        await page.click("#keyform button")
        await page.wait_for_selector("[data-backend]")
        shown = await page.locator("[data-backend]").evaluate_all("cards => cards.map(c => c.dataset.backend)")
        assert sorted(shown) == sorted(backends)
        assert await page.locator("#keyform").is_hidden()
        # Kept for the tab (sessionStorage): a reload needs no new key.
        await page.reload()
        await page.wait_for_selector("[data-backend]")
    finally:
        code = await stop_up(up)
    assert code == 0, up.stderr


def test_the_wheel_carries_the_page(tmp_path: Path) -> None:
    # Built from a copy of the sources, so the build leaves nothing in the work tree.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".corral")
    for name in ("gateway", "launcher"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True)
    (wheel,) = wheels.glob("corral-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    # The installed copy serves the page: import it from there (not from the repo) and compare.
    probe = (
        "import sys, gateway.api.page.serve as p; "
        f"assert p.__file__.startswith({str(site)!r}), p.__file__; "
        "sys.stdout.write(' '.join(f'{n}={len(b)}' for n, b in sorted(p._FILES.items())))"
    )
    env = dict(os.environ) | {"PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path, env=env
    )
    static = REPO / "gateway" / "api" / "page" / "static"
    assert out.stdout == " ".join(f"{n}={(static / n).stat().st_size}" for n in sorted(PAGE_FILES))


async def test_page_files_are_served_open_and_nothing_else() -> None:
    from gateway.api.auth import ApiKeys
    from gateway.server import GatewayServer
    from gateway.state.memory import MemoryStore
    from tests.support.fakes import fast_settings

    keys = ApiKeys(api=("user-key",), admin=(ADMIN_KEY,))
    async with GatewayServer(fast_settings(), MemoryStore(), keys=keys) as gw, aiohttp.ClientSession() as http:
        for name, content_type in (("", "text/html"), ("page.css", "text/css"), ("page.js", "text/javascript")):
            async with http.get(f"{gw.url}/corral/{name}") as resp:
                assert resp.status == 200 and resp.content_type == content_type
                assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        async with http.get(gw.url + "/corral", allow_redirects=False) as resp:
            assert resp.status == 301 and resp.headers["Location"] == "/corral/"
        for path in ("/corral/index.htm", "/corral/../pyproject.toml", "/corral/static/page.js"):
            async with http.get(gw.url + path) as resp:
                assert resp.status in (401, 404), path  # unknown paths are not files
        async with http.get(gw.url + "/api/corral/status", headers={"Authorization": "Bearer user-key"}) as resp:
            assert resp.status == 403  # the data keeps its admin rule

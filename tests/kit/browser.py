"""Real headless Chromium (Debian ``chromium`` + ``chromium-driver``) driven by selenium, and a
page server: an aiohttp app on its own 127.0.0.1 port, so its pages are another origin.

Missing chromium, chromedriver or selenium: the test skips, or fails when ``CI`` is set
(.ci/run installs them). Selenium blocks, and the servers under test run on the test's own
event loop, so every browser call goes through a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver", "chromium-driver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")
SCRIPT_TIMEOUT = 30.0

PAGE = b"<!doctype html><html><head><title>proxyd CORS</title></head><body>page</body></html>"


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI is set: install chromium and chromium-driver, and selenium)")
    pytest.skip(why)


def _find(names: tuple[str, ...], env: str) -> str | None:
    configured = os.environ.get(env)  # CHROMIUM / CHROMEDRIVER: a path, overriding the search
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    def __init__(self, driver: Any) -> None:
        self._driver = driver

    async def run_async_script(self, page: str, script: str, *args: Any) -> Any:
        """Open ``page`` and run ``script`` in it (selenium's async script: the last argument
        is the callback that ends it)."""

        def run() -> Any:
            self._driver.get(page)
            return self._driver.execute_async_script(script, *args)

        return await asyncio.to_thread(run)

    async def close(self) -> None:
        await asyncio.to_thread(self._driver.quit)


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')")
        raise  # unreachable: skip and fail raise
    binary = _find(CHROMIUM_NAMES, "CHROMIUM")
    driver_path = _find(DRIVER_NAMES, "CHROMEDRIVER")
    if binary is None or driver_path is None:
        _unavailable(
            "chromium or chromedriver not found (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for flag in FLAGS:
        options.add_argument(flag)

    def start() -> Any:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
        driver.set_script_timeout(SCRIPT_TIMEOUT)
        return driver

    chrome = Browser(await asyncio.to_thread(start))
    try:
        yield chrome
    finally:
        await chrome.close()


class PageServer:
    """Serves one HTML page at ``/`` on 127.0.0.1:<own port>: an origin of its own."""

    def __init__(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._page)
        self._server = TestServer(app, host="127.0.0.1")

    @staticmethod
    async def _page(request: web.Request) -> web.Response:
        return web.Response(body=PAGE, content_type="text/html")

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self._server.port}"

    @property
    def url(self) -> str:
        return self.origin + "/"

    async def __aenter__(self) -> PageServer:
        await self._server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.close()

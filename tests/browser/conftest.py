"""A real `atelier serve` with auth on and its HTTP gateway, and a headless Chromium for it.

The server is the embedded default exactly as `tests/e2e` starts it (subprocess, local registry
folder, SQLite, one in-process worker, the random tiny base model imported as `tiny-sd`), plus
`ATELIER_AUTH_ENABLED=true` and an HTTP port. `http_port` 0 means "off", so the test picks a free
port itself (bind 0, close, pass it on); the server then announces its URL and the fixture waits
for that line. Chromium and chromedriver are Debian's (`make browser` installs them); Selenium
gets the driver path, so Selenium Manager never downloads anything.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import BASE_MODEL, atelier_executable, read_ports, server_env, stop, wait_serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
API_KEY = "console-secret-key"
TENANT = "studio"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"


@dataclass(frozen=True)
class ConsoleServer:
    """Where the console is served and how to reach the gRPC side for test setup."""

    url: str
    training_target: str
    inference_target: str
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None:
            pytest.fail(f"atelier serve exited {process.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"the console at {url} did not answer within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleServer]:
    state = tmp_path_factory.mktemp("console-state")
    port = free_port()
    env = {**server_env(state), "ATELIER_AUTH_ENABLED": "true", "ATELIER_API_KEYS": f"{API_KEY}={TENANT}",
           "ATELIER_HTTP_PORT": str(port), "ATELIER_PROGRESS_EVENT_INTERVAL_SECONDS": "0"}
    created = subprocess.run(
        [atelier_executable(), "base-model", "create-tiny", "--random", "--import", "--name", BASE_MODEL,
         "--out", str(state / "base-models" / BASE_MODEL)],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert created.returncode == 0, created.stdout + created.stderr
    stdout, log = state / "serve.out", state / "serve.log"
    with stdout.open("wb") as out, log.open("wb") as err:
        process = subprocess.Popen([atelier_executable(), "serve"], env=env, stdout=out, stderr=err)
    try:
        ports = read_ports(stdout, process, log)
        for target in ports.values():
            wait_serving(target)
        url = f"http://127.0.0.1:{port}/"
        wait_http(url, process, log)
        yield ConsoleServer(url, ports["training"], ports["inference"], log)
    finally:
        code = stop(process, log)
    assert code == 0, f"atelier serve exited {code} after SIGTERM:\n{log.read_text()[-4000:]}"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """Keep a screenshot of the page a browser test failed on (test-artifacts/console/FAILED-*.png)."""
    report: pytest.TestReport = yield
    driver = getattr(item, "funcargs", {}).get("browser") or getattr(item, "funcargs", {}).get("signed_in")
    if report.failed and call.when == "call" and driver is not None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / f"FAILED-{item.name}.png"))
    return report


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("Debian's chromium and chromium-driver are missing: run `make browser`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads  # type: ignore[attr-defined]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()

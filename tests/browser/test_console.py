"""The web console in headless Chromium against a real `atelier serve` with auth on.

A user's path: enter the API key (kept in sessionStorage only), upload images to a new dataset
and start a LoRA job, watch its loss curve grow and its validation previews arrive, download
the adapter in an export format, move an alias with compare-and-swap and see the conflict,
generate with two adapters and get a PNG of the requested size. Screenshots go to
test-artifacts/console/ (gitignored) for a human to look at.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from PIL import Image

from atelier import Client
from atelier.demo_images import concept_images
from atelier_api.v1 import training_pb2
from tests.browser.conftest import API_KEY, ARTIFACTS, ConsoleServer
from tests.e2e.conftest import BASE_MODEL

pytestmark = pytest.mark.slow

T = TypeVar("T")
SDK_ADAPTER = "sdk-lora"
CONSOLE_ADAPTER = "console-lora"
TRAIN_STEPS = 40


def wait_for(probe: Callable[[], T | None], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll `probe` until it returns something truthy (a busy 2-core machine gets time)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except Exception as error:  # element not there yet, stale after a re-render
            last_error = error
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error!r})")


def shot(driver: Any, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def css(driver: Any, selector: str) -> Any:
    return driver.find_element("css selector", selector)


def css_all(driver: Any, selector: str) -> list[Any]:
    return list(driver.find_elements("css selector", selector))


def visible_text(driver: Any, selector: str) -> str:
    elements = css_all(driver, selector)
    return " ".join(e.text for e in elements if e.is_displayed())


def goto(driver: Any, route: str) -> None:
    """Open a console route in the same tab (the key stays): the old page is cleared first, so a
    wait for an element can never be satisfied by the page being left."""
    driver.execute_script("""
      document.getElementById("main").replaceChildren();
      if (location.hash === arguments[0]) window.dispatchEvent(new HashChangeEvent("hashchange"));
      else location.hash = arguments[0];
    """, route)


def set_value(driver: Any, selector: str, value: str) -> None:
    element = css(driver, selector)
    element.clear()
    element.send_keys(value)


def select(driver: Any, element: Any, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(element).select_by_value(value)


@pytest.fixture(scope="module")
def sdk_adapter(console_server: ConsoleServer) -> Iterator[str]:
    """A second LoRA, trained through the gRPC SDK with the same key (the playground mixes two)."""
    with Client(console_server.training_target, inference_target=console_server.inference_target,
                api_key=API_KEY, timeout=120) as client:
        dataset = client.upload_dataset(concept_images(3, seed=2, pattern="stripes"), name="sdk-stripes")
        handle = client.train("lora", base_model=BASE_MODEL, dataset=dataset.id, name=SDK_ADAPTER,
                              instance_prompt="a photo of sks stripes", max_train_steps=4, rank=4,
                              resolution=32, seed=0)
        assert handle.wait(timeout=300).state == training_pb2.JOB_STATE_SUCCEEDED
        yield SDK_ADAPTER


@pytest.fixture(scope="module")
def signed_in(browser: Any, console_server: ConsoleServer) -> Any:
    """Open the console: the first API call is refused, the key dialog opens; a wrong key is
    refused in plain words, the right one goes in."""
    browser.get(console_server.url)
    dialog = wait_for(lambda: css(browser, "#key-dialog[open]"), 30, "the API key dialog")
    assert "This server needs an API key" in css(browser, "#key-reason").text
    assert "needs an API key" in visible_text(browser, "main .error")
    shot(browser, "01-api-key")
    set_value(browser, "#key-input", "not-the-key")
    css(browser, "#key-save").click()
    wait_for(lambda: "was not accepted" in css(browser, "#key-reason").text and dialog.get_attribute("open"), 30,
             "the wrong key to be refused")
    set_value(browser, "#key-input", API_KEY)
    css(browser, "#key-save").click()
    wait_for(lambda: not dialog.get_attribute("open"), 10, "the dialog to close")
    wait_for(lambda: css_all(browser, "main table.list") or "No jobs" in css(browser, "main").text, 30, "the jobs page")
    return browser


def test_the_key_lives_in_session_storage_only(signed_in: Any) -> None:
    assert signed_in.execute_script("return sessionStorage.getItem('atelier.apiKey')") == API_KEY
    assert signed_in.execute_script("return localStorage.length") == 0
    assert signed_in.get_cookies() == []
    assert "API key ✓" in css(signed_in, "#key-button").text


def write_images(directory: Path) -> list[Path]:
    paths = []
    for index, image in enumerate(concept_images(4, seed=11)):
        path = directory / f"toy-{index}.png"
        image.save(path)
        paths.append(path)
    return paths


def points(driver: Any, series: str) -> int:
    groups = css_all(driver, f'g.series[data-series="{series}"]')
    return int(groups[0].get_attribute("data-points")) if groups else 0


def test_upload_train_and_watch_the_curve_grow(signed_in: Any, tmp_path: Path, sdk_adapter: str) -> None:
    driver = signed_in
    goto(driver, "#/new")
    wait_for(lambda: css(driver, "#nj-files"), 30, "the new-job form")
    css(driver, "#nj-files").send_keys("\n".join(str(p) for p in write_images(tmp_path)))
    wait_for(lambda: len(css_all(driver, ".thumbs img")) == 4, 10, "4 thumbnails")
    set_value(driver, "#nj-dataset", "toy-photos")
    set_value(driver, "#nj-output", CONSOLE_ADAPTER)
    set_value(driver, "#nj-prompt", "a photo of sks toy")
    set_value(driver, "#nj-steps", str(TRAIN_STEPS))
    set_value(driver, "#nj-resolution", "32")
    set_value(driver, "#nj-validation", "a photo of sks toy")
    set_value(driver, "#nj-validation-steps", "20")
    shot(driver, "02-new-job")
    css(driver, "#nj-submit").click()
    wait_for(lambda: "#/jobs/" in driver.current_url, 60, "the job page")
    first = wait_for(lambda: points(driver, "loss"), 120, "the first loss points")
    grown = wait_for(lambda: points(driver, "loss") > first and points(driver, "loss"), 120, "the curve to grow")
    assert grown > first
    shot(driver, "03-job-running")
    wait_for(lambda: "succeeded" in css(driver, "h1 .badge").text, 300, "the job to succeed")
    wait_for(lambda: css_all(driver, ".previews img"), 30, "a validation preview")
    assert points(driver, "loss") >= grown and points(driver, "lr") >= 1
    assert points(driver, "val") >= 3  # before training (step 0), the validation at step 20, the end
    src = css(driver, ".previews img").get_attribute("src")
    assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).format == "PNG"
    assert css(driver, "#job-step").text == f"{TRAIN_STEPS} / {TRAIN_STEPS}"
    shot(driver, "04-job-done")
    job_id = driver.current_url.rsplit("/", 1)[1]
    goto(driver, "#/jobs?state=SUCCEEDED")
    wait_for(lambda: job_id in css(driver, "main table.list").text, 30, "the job under 'succeeded'")
    assert css(driver, 'nav.filters a[aria-current="page"]').text == "succeeded"
    shot(driver, "04b-jobs-succeeded")
    goto(driver, "#/jobs?state=FAILED")
    wait_for(lambda: "No failed jobs." in css(driver, "main").text, 30, "an empty 'failed' filter")


def test_adapter_page_downloads_and_alias_conflict(signed_in: Any, sdk_adapter: str) -> None:
    driver = signed_in
    goto(driver, "#/adapters")
    listed = wait_for(lambda: css(driver, "main table.list").text, 30, "the adapter list")
    assert sdk_adapter in listed
    goto(driver, f"#/adapters/{sdk_adapter}")
    wait_for(lambda: css(driver, "table.versions tbody tr"), 30, "the versions table")
    row = css(driver, "table.versions tbody tr").text
    assert "v1" in row and "atelier" in row and "KiB" in row
    kohya = next(b for b in css_all(driver, "td.downloads button") if b.text.startswith("kohya"))
    kohya.click()
    downloads: Path = driver.downloads
    def exported() -> list[Path]:
        errors = css_all(driver, "td.downloads .error")
        assert not errors, errors[0].text
        return [p for p in downloads.iterdir() if p.suffix == ".safetensors"]

    file = wait_for(exported, 60, "the kohya export")[0]
    assert file.stat().st_size > 0
    set_value(driver, "#alias-name", "stable")
    css(driver, "form.inline-form button[type=submit]").click()
    wait_for(lambda: "now points at v1" in css(driver, "#alias-status").text, 30, "the alias move")
    wait_for(lambda: css_all(driver, "table.aliases"), 10, "the alias table")
    set_value(driver, "#alias-name", "stable")
    set_value(driver, "#alias-expected", "7")  # a stale expectation: someone else's view
    css(driver, "form.inline-form button[type=submit]").click()
    status = wait_for(lambda: css(driver, "#alias-status .error"), 30, "the conflict error")
    assert "conflicts with the current state" in status.text
    assert "moved this alias" in css(driver, "#alias-status").text
    shot(driver, "05-adapter-conflict")


def test_generate_with_two_adapters_shows_the_png(signed_in: Any, sdk_adapter: str) -> None:
    driver = signed_in
    goto(driver, "#/playground")
    wait_for(lambda: css(driver, "#pg-prompt"), 30, "the playground")
    set_value(driver, "#pg-prompt", "a photo of sks toy")
    set_value(driver, "#pg-seed", "7")
    set_value(driver, "#pg-steps", "3")
    set_value(driver, "#pg-width", "32")
    set_value(driver, "#pg-height", "48")
    add = wait_for(lambda: css(driver, "fieldset button.small"), 10, "the add-adapter button")
    for _ in range(2):
        add.click()
    selects, sliders = css_all(driver, "select.pg-adapter"), css_all(driver, "input.pg-weight")
    assert len(selects) == 2
    select(driver, selects[0], CONSOLE_ADAPTER if _has(selects[0], CONSOLE_ADAPTER) else sdk_adapter)
    select(driver, selects[1], sdk_adapter)
    driver.execute_script("arguments[0].value = '0.6'; arguments[0].dispatchEvent(new Event('input'))", sliders[1])
    css(driver, "#pg-generate").click()
    image = wait_for(lambda: css(driver, "img.generated"), 120, "the generated image")
    src = image.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert decoded.format == "PNG" and decoded.size == (32, 48)
    caption = css(driver, "section.result p.hint").text
    assert f"{sdk_adapter} v1 at weight 0.60" in caption and caption.count(" v1 at weight ") == 2
    assert "Done in" in css(driver, "#pg-progress").text
    shot(driver, "06-playground")


def _has(element: Any, value: str) -> bool:
    return any(option.get_attribute("value") == value for option in element.find_elements("css selector", "option"))


def test_api_errors_read_as_plain_words(signed_in: Any) -> None:
    driver = signed_in
    goto(driver, "#/playground")
    wait_for(lambda: css(driver, "#pg-prompt"), 30, "the playground")
    set_value(driver, "#pg-prompt", "a photo")
    set_value(driver, "#pg-width", "8200")  # passes the form (a multiple of 8), over max_image_side
    css(driver, "#pg-generate").click()
    error = wait_for(lambda: css(driver, "#pg-progress .error"), 60, "the error").text
    assert "The request was not valid" in error and "Field spec.width: at most" in error
    goto(driver, "#/jobs/no-such-job")
    missing = wait_for(lambda: "Not found" in css(driver, "main").text and css(driver, "main .error").text, 30,
                       "the not-found error")
    assert missing.startswith("Error: Not found.") and missing.count("no-such-job") == 1  # ResourceInfo not repeated
    shot(driver, "07-errors")


def test_error_sentences_say_each_thing_once(signed_in: Any) -> None:
    """The console's Status -> words core, run in the page: a message repeated in details is said once."""
    script = """
      const done = arguments[arguments.length - 1];
      import("/js/api.js").then((api) => done([
        api.plainWords(400, {code: 9, message: "alias 'a' was not changed: expected 7",
          details: [{"@type": "type.googleapis.com/google.rpc.PreconditionFailure",
                     violations: [{subject: "expected_version", description: "alias 'a' was not changed: expected 7"}]},
                    {"@type": "type.googleapis.com/google.rpc.BadRequest",
                     fieldViolations: [{field: "expected_version",
                                        description: "alias 'a' was not changed: expected 7"}]}]}),
        api.plainWords(429, {code: 8, message: "queue full",
          details: [{"@type": "type.googleapis.com/google.rpc.RetryInfo", retryDelay: "2s"}]}),
        api.plainWords(0, {message: "could not reach the server (Failed to fetch)"}),
      ]));
    """
    conflict, busy, offline = signed_in.execute_async_script(script)
    assert conflict == ("The request conflicts with the current state. "
                        "Field expected_version: alias 'a' was not changed: expected 7.")
    assert busy == "The server is busy or a quota is used up. Queue full. Try again in 2 s."
    assert offline.startswith("The server is unavailable right now. Could not reach the server")


def test_cancel_a_running_job_from_its_page(signed_in: Any, console_server: ConsoleServer, sdk_adapter: str) -> None:
    with Client(console_server.training_target, api_key=API_KEY, timeout=60) as client:
        dataset = client.upload_dataset(concept_images(3, seed=4), name="cancel-me")
        handle = client.train("lora", base_model=BASE_MODEL, dataset=dataset.id, name="console-cancelled",
                              instance_prompt="a photo of sks stripes", max_train_steps=5000, resolution=32)
    driver = signed_in
    goto(driver, "#/jobs?state=RUNNING")  # may list nothing yet: it polls

    def listed_step() -> int:
        row = next(r for r in css_all(driver, "main tbody tr") if handle.id in r.text)
        return int(row.find_elements("css selector", "td")[4].text.split(" / ")[0])

    seen = wait_for(lambda: listed_step() >= 1 and listed_step(), 120, "the job listed as running")
    wait_for(lambda: listed_step() > seen, 60, "the list to refresh by itself")
    goto(driver, f"#/jobs/{handle.id}")
    wait_for(lambda: "running" in css(driver, "h1 .badge").text and points(driver, "loss") >= 1, 120, "it to run")
    css(driver, "button.danger").click()
    driver.switch_to.alert.accept()  # "Cancel job …?"
    wait_for(lambda: "cancelled" in css(driver, "h1 .badge").text, 120, "the job to be cancelled")
    assert not css(driver, "button.danger").is_displayed()
    assert "Job cancelled." in css(driver, "main").text


def test_a_bad_upload_is_refused_in_plain_words(signed_in: Any, tmp_path: Path) -> None:
    driver = signed_in
    goto(driver, "#/new")
    wait_for(lambda: css(driver, "#nj-files"), 30, "the new-job form")
    fake = tmp_path / "not-an-image.png"
    fake.write_bytes(b"this is text, not a PNG")
    css(driver, "#nj-files").send_keys(str(fake))
    set_value(driver, "#nj-output", "never-trained")
    css(driver, "#nj-submit").click()
    error = wait_for(lambda: css(driver, "#nj-status .error").text, 60, "the upload error")
    assert error.startswith("Error: The request was not valid.") and "Field images[0]: not a PNG" in error
    assert css(driver, "#nj-status .files-named").text == "images[0] is not-an-image.png."
    assert "#/new" in driver.current_url and css(driver, "#nj-submit").is_enabled()


def test_every_control_has_a_label_and_every_image_alt_text(signed_in: Any, sdk_adapter: str) -> None:
    driver = signed_in
    unlabeled_script = """
      return [...document.querySelectorAll("input, select, textarea")].filter((el) => el.type !== "hidden"
        && !el.getAttribute("aria-label") && !(el.id && document.querySelector(`label[for="${el.id}"]`)))
        .map((el) => el.outerHTML);
    """
    pages = {"#/new": "#nj-files", "#/playground": "#pg-prompt", f"#/adapters/{sdk_adapter}": "#alias-name"}
    for route, marker in pages.items():
        goto(driver, route)
        wait_for(lambda marker=marker: css_all(driver, marker), 30, f"the form of {route}")
        if route == "#/playground":
            css(driver, "fieldset button.small").click()
        assert driver.execute_script(unlabeled_script) == [], route
        assert driver.execute_script("return [...document.images].filter((i) => !i.alt).length") == 0

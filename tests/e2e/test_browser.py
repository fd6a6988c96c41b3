"""A real browser against a live server, a real Celery worker and a real llama-server on a simulated GPU:
log in, load the tiny model on GPU 0, watch it start, read its memory line, unload it, see GPU 0 idle.

The tiny model starts in about 50 ms, quicker than the page polls, so "watch it start" cannot rely on
timing. The worker starts only once the page shows the load pending: until then nothing consumes the
queued load, so the pending card is certain to be seen, and starting the worker releases it."""

import re
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
MEMORY_LINE = re.compile(r"Memory: (\d+) MiB / (\d+) MiB \((\d+\.\d)%\)")

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def browser_page(monkeypatch):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install it with `apt-get update && apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the ORM calls of the other fixtures'
    # teardown are still plain synchronous code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.on("dialog", lambda dialog: dialog.accept())  # hx-confirm on Unload
        try:
            yield page
        finally:
            browser.close()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_load_watch_and_unload_in_a_browser(
    live_server, users, tiny_model, start_worker, llama_server_path, settings, browser_page
):
    settings.LLAMA_SERVER = str(llama_server_path)
    page = browser_page
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("input[name=username]", "operator")
    page.fill("input[name=password]", "pw-operator-123")
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")
    assert page.locator("#gpu-1, .gpu-card").count() == 2
    assert "simulated" in page.locator(".gpu-card").first.inner_text()

    page.select_option("#load-model", "tiny")
    estimate = page.locator("#load-estimate")
    # The memory prediction answers the form as it appears (with the placement's suggestion, preselected)...
    wait_for(lambda: estimate.inner_text().strip(), 30, "the load form's first estimate")
    if not page.locator("input[data-index='0']").is_checked():
        page.click("label.toggle:has(input[data-index='0'])")
    for other in page.locator("input[name=gpu]:checked:not([data-index='0'])").all():
        page.click(f"label.toggle:has(input[value='{other.get_attribute('value')}'])")
    # ... and to every change: the estimate of the tiny model on GPU 0 (no worker has measured the GPUs yet).
    try:
        line = wait_for(lambda: re.search(r"≈ \d+ MiB on GPU 0: (fits, [\d.]+ GiB free|free memory unknown)", estimate.inner_text()), 30,
                        "the estimate for GPU 0")  # fmt: skip
    except AssertionError:
        raise AssertionError(estimate.inner_text()) from None
    assert "CUDA context 300 MiB" in estimate.inner_text(), line
    page.click("#load-button")

    card = page.locator(".instance-card")
    seen = []

    def status_is(wanted):
        if card.count() == 0:
            return False
        status = card.first.get_attribute("data-status")
        if not seen or seen[-1] != status:
            seen.append(status)
        assert status not in ("failed", "crashed"), page.locator("#dashboard-content").inner_text()
        return status == wanted

    # Held: no worker consumes the load yet, so the card shows it pending, and still after a few polls.
    wait_for(lambda: status_is("pending"), 30, "a pending card")
    time.sleep(2)
    assert not status_is("running") and seen == ["pending"], seen
    start_worker()  # the release
    wait_for(lambda: status_is("running"), 120, "the instance to run")
    assert seen[0] == "pending" and seen[-1] == "running", seen
    # The post-load memory query lands with (or just after) the running status.
    figure = wait_for(
        lambda: MEMORY_LINE.search(card.first.locator(".memory-figure").inner_text()), 30, "the memory line"
    )
    used, total, percent = int(figure[1]), int(figure[2]), figure[3]
    assert 0 < used < total
    assert f"{used * 100 / total:.1f}" == percent
    assert card.first.locator(".instance-gpus").inner_text() == "0"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
    page.set_viewport_size({"width": 1366, "height": 900})

    card.first.locator(".unload-button").click()

    def gpu0_idle():
        if (
            card.count() == 0
            and page.locator(".gpu-card[data-index='0']").get_attribute("data-state") == "idle"
        ):
            return True
        page.click("#refresh-button")  # once stopped, the auto refresh slows down to the default interval
        time.sleep(0.5)
        return False

    wait_for(gpu0_idle, 60, "GPU 0 to be idle again", interval=0.5)
    assert not page.locator("input[data-index='0']").is_disabled()

"""The live dashboard in a real browser (Playwright driving Debian's chromium) against a live server, with a real
process "on" a simulated GPU standing for a model instance (no llama-server needed): the GPU card's stacked bar
shows the model's own memory as the API reports it, a foreign process and free memory; when the simulated memory
changes the figures change on the page without a reload; at 390×844 nothing scrolls sideways."""

import json
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from gateway.models import UsageRecord
from models_app import folder_scan
from models_app.live import LiveRefresh
from models_app.memory import refresh_host_memory
from policy.models import Pin, Quota, Reservation
from tests.conftest import FAKE_GPU_UUIDS, HOST_NAME, password_for
from tests.e2e import test_browser
from tests.helpers import grow, running_instance

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
browser_page = test_browser.browser_page  # the same chromium fixture (skips when chromium is missing)
wait_for = test_browser.wait_for
SCREENSHOTS = test_browser.ARTIFACTS  # copied by hand into docs/screenshots


# The elements that reach past the viewport's right edge (outside boxes that scroll by themselves), for the message.
WIDE_ELEMENTS = """Array.from(document.querySelectorAll('body *')).filter(e => e.getBoundingClientRect().right > innerWidth
  && !e.closest('.table-wrap, pre, .history-chart')).slice(0, 8).map(e => e.tagName + '.' + e.className + ' ' +
  Math.round(e.getBoundingClientRect().right))"""


def log_in(page, base: str, name: str = "operator") -> None:
    page.goto(f"{base}/accounts/login/")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password_for(name))
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/")


def api_memory(page, base: str, pk: int) -> int:
    """The instance's memory as the REST API gives it, read with the browser's session."""
    return page.evaluate(
        f"fetch('{base}/api/v1/instances/{pk}/').then(r => r.json()).then(j => j.memory_used_mb)"
    )


def model_segment(page, pk: int) -> int:
    bar = page.locator(f".gpu-card[data-index='0'] .membar .seg-model[data-instance='{pk}']")
    return int(bar.get_attribute("data-mib"))


def test_live_stacked_bar_matches_the_api_and_updates_without_reload(
    live_server, users, fake_gpus, tiny_model, child_on_gpus, settings, browser_page
):
    settings.DASHBOARD_REFRESH_SECONDS = 1
    data = json.loads(fake_gpus.path.read_text())
    data["gpus"][0]["foreign_processes"] = [
        {"pid": 4242, "name": "someone-elses-training.py", "used_mib": 900}
    ]
    fake_gpus.path.write_text(json.dumps(data))
    child = child_on_gpus(FAKE_GPU_UUIDS[0])
    instance = running_instance(fake_gpus.host, tiny_model, fake_gpus.gpus[:1], pid=child.pid)
    refresh_host_memory(HOST_NAME)

    page, base = browser_page, live_server.url
    console = []
    page.on("console", lambda message: console.append(message.text))
    log_in(page, base)
    before = api_memory(page, base, instance.pk)
    assert before and model_segment(page, instance.pk) == before
    card = page.locator(".gpu-card[data-index='0']")
    others = int(card.locator(".membar .seg-others").get_attribute("data-mib"))
    assert others >= 900  # the foreign process (and the simulated baseline)
    free = int(card.locator(".membar .seg-free").get_attribute("data-mib"))
    assert before + others + free == 24564
    assert "Tiny test llama" in card.locator(".membar-legend").inner_text()

    page.evaluate("window.notReloaded = true")
    for _ in range(3):
        grow(child)  # +64 MiB each
    refresh_host_memory(HOST_NAME)
    after = api_memory(page, base, instance.pk)
    assert after >= before + 150
    wait_for(lambda: model_segment(page, instance.pk) == after, 15, "the bar to show the new figure")
    assert page.evaluate("window.notReloaded === true")

    # Without a refresh: the live figures a host's worker writes between refreshes (models_app/live.py; its
    # thread runs here, in the test's process). The bar follows within the live interval plus the poll's (1 s
    # each), with room for a loaded machine.
    settings.GPU_LIVE_SECONDS = 1
    live_thread = LiveRefresh(HOST_NAME)
    live_thread.start()
    try:
        grow(child)
        grown = time.monotonic()
        wait_for(
            lambda: model_segment(page, instance.pk) >= after + 60, 8, "the bar to follow the live figures"
        )
        print(f"the bar followed a growth in {time.monotonic() - grown:.1f} s")
    finally:
        live_thread.stop()
        live_thread.join(5)
    assert not [line for line in console if "returned no matches" in line], console  # hx-disabled-elt

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "dashboard-desktop.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)
    wide = page.evaluate(WIDE_ELEMENTS)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, wide
    page.screenshot(path=str(SCREENSHOTS / "dashboard-phone.png"), full_page=True)


def test_pages_fit_a_phone(live_server, users, fake_gpus, tiny_model, browser_page):
    """No page scrolls sideways at 390×844 (tables scroll inside their own box); each page's screenshot at
    1366×900 and 390×844 goes to test-artifacts/ (copied into docs/screenshots/ for the README)."""
    instance = running_instance(fake_gpus.host, tiny_model, fake_gpus.gpus[:1])
    # A usage page with the latest 50 requests, long errors among them (it was 27 712 px tall on a phone).
    UsageRecord.objects.bulk_create(
        UsageRecord(user=users["operator"], model_id="tiny", endpoint="/v1/chat/completions", status=502 if n % 3 else 200,
                    error="upstream said: " + "connection reset by peer; " * 20 if n % 3 else "", prompt_tokens=12,
                    completion_tokens=200, time_to_first_token_ms=180.0, duration_ms=37255.0)
        for n in range(60)
    )  # fmt: skip
    # The team policy on the dashboard (a pinned card, the quota panel) and a long reservation in the week view.
    Pin.objects.create(instance=instance, pinned_by=users["admin"])
    Quota.objects.create(user=users["admin"], gpu_memory_mib=65536, gpus=2, models_loaded=3)
    now = timezone.now()
    Reservation.objects.create(host=fake_gpus.host, gpu_indices=[0, 1], start=now, end=now + timedelta(days=2),
                               purpose="evaluation of the long-context checkpoints " * 3)  # fmt: skip
    folder_scan.scan_on_this_host(fake_gpus.host)  # the Add a model page lists what its worker found
    page, base = browser_page, live_server.url
    log_in(page, base, "admin")
    pages = {
        "dashboard-policy": "/",
        "reservations": "/reservations/",
        "add-model": "/models/add/",
        "usage": "/usage/",
        "tokens": "/accounts/tokens/",
        "alerts": "/alerts/",
        "events": "/events/",
        "history": f"/gpus/{fake_gpus.gpus[0].pk}/history/",
        "playground": f"/instances/{instance.pk}/playground/",
    }
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name, path in pages.items():
        page.set_viewport_size({"width": 1366, "height": 900})
        assert page.goto(f"{base}{path}").status == 200, path
        page.screenshot(path=str(SCREENSHOTS / f"{name}-desktop.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(200)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, (path, width, page.evaluate(WIDE_ELEMENTS))
        page.screenshot(path=str(SCREENSHOTS / f"{name}-phone.png"), full_page=True)
        if name == "usage":
            assert page.evaluate("document.documentElement.scrollHeight") < 5000
            speed = page.locator("table.usage-table th:has-text('Tokens/s')").first.bounding_box()
            assert speed["x"] + speed["width"] <= 390  # in sight without scrolling the table
            assert "37.3 s" in page.content() and "<th>Error</th>" in page.content()

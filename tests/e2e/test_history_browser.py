"""The memory history graph in a real browser (Playwright driving Debian's chromium) against a live server:
the vendored uPlot draws the chart from the page's data, events are listed, the alert banner shows on the
dashboard; with JavaScript off the page still gives its figures and table."""

from datetime import timedelta

import pytest
from django.utils import timezone

from gpus.models import Alert, AlertRule, Gpu, MemorySample
from models_app.events import record
from models_app.models import GpuInstance, InstanceEvent
from tests.e2e import test_browser
from tests.helpers import running_instance

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
ARTIFACTS = test_browser.ARTIFACTS
browser_page = test_browser.browser_page  # the same chromium fixture (skips when chromium is missing)


@pytest.fixture
def history(fake_gpus, tiny_model):
    gpu = fake_gpus.gpus[0]
    instance = running_instance(fake_gpus.host, tiny_model, [gpu])
    GpuInstance.objects.filter(pk=instance.pk).update(memory_estimated_mb=3100)  # predicted at load time
    Gpu.objects.filter(pk=gpu.pk).update(state="model_loaded", memory_used_mib=6000)
    now = timezone.now()
    MemorySample.objects.bulk_create(
        [
            MemorySample(gpu=gpu, taken_at=now - timedelta(seconds=15 * i), used_mib=4000 + 10 * (240 - i),
                         total_mib=24564)
            for i in range(240)
        ]
        + [MemorySample(instance_id=instance.pk, taken_at=now - timedelta(seconds=15 * i), used_mib=3000 + i)
           for i in range(240)]
    )  # fmt: skip
    record(InstanceEvent.Kind.HEALTHY, instance=instance, detail="Tiny loaded")
    rule = AlertRule.objects.get_or_create(name="GPU memory above 90 %", defaults={"kind": "gpu_used_pct"})[0]
    Alert.objects.create(
        rule=rule, subject=f"gpu:{gpu.pk}", gpu=gpu, host=gpu.host, status="open", started_at=now,
        fired_at=now - timedelta(minutes=5), message="testhost GPU 0: 95.0% of its memory used",
    )  # fmt: skip
    return {"gpu": gpu, "instance": instance}


def log_in(page, live_server, name="viewer"):
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", f"pw-{name}-123")
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")


def test_history_graph_in_a_browser(live_server, users, history, browser_page):
    page = browser_page
    log_in(page, live_server)
    banner = page.locator("#alerts-banner")
    assert "95.0% of its memory used" in banner.inner_text()

    page.click(f"#gpu-{history['gpu'].pk} .history-link")
    page.wait_for_url(f"**/gpus/{history['gpu'].pk}/history/")
    page.click("a.btn:has-text('1h')")
    page.wait_for_selector("#history-chart[data-ready='1'] canvas", timeout=10_000)
    box = page.locator("#history-chart canvas").bounding_box()
    assert box["width"] > 300 and box["height"] > 200
    legend = page.locator("#history-chart .u-legend").inner_text()
    assert "max" in legend and "mean" in legend
    # The y-axis fits the series (peak 6400 MiB), not the GPU's 24564 MiB, unless asked.
    chart = page.locator("#history-chart")
    assert 6400 <= int(chart.get_attribute("data-y-max")) < 8000
    page.check("#history-total")
    page.wait_for_function("Number(document.getElementById('history-chart').dataset.yMax) >= 24564")
    events = page.locator(".history-events").inner_text()
    assert "loaded" in events and "alert_fired" in events
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "history-gpu.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(400)  # the chart is rebuilt for the narrow screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(ARTIFACTS / "history-gpu-phone.png"), full_page=True)
    page.set_viewport_size({"width": 1366, "height": 900})

    page.goto(f"{live_server.url}/instances/{history['instance'].pk}/history/?window=1h")
    page.wait_for_selector("#history-chart[data-ready='1'] canvas", timeout=10_000)
    assert "Estimate:" in page.locator("#history-figures").inner_text()
    page.screenshot(path=str(ARTIFACTS / "history-instance.png"), full_page=True)


def test_history_page_without_javascript(live_server, users, history, browser_page):
    context = browser_page.context.browser.new_context(java_script_enabled=False)
    page = context.new_page()
    try:
        log_in(page, live_server)
        page.goto(f"{live_server.url}/gpus/{history['gpu'].pk}/history/?window=1h")
        figures = page.locator("#history-figures").inner_text()
        assert "peak 6.2 GiB" in figures and "of 24.0 GiB" in figures
        assert page.locator("#history-chart canvas").count() == 0
        page.click("#history-table summary")
        assert page.locator("#history-table tbody tr").count() >= 200
    finally:
        context.close()

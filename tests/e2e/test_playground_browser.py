"""From a file in the model folder to a streamed answer, in a real browser against the web server as `./lc.sh run`
serves it (gunicorn, uvicorn worker), a real Celery worker and a real llama-server with the tiny model: an admin
registers the file that its worker lists on the "Add a model" page (after a Rescan), loads it from the dashboard, and chats with it in the playground
through the gateway (streamed, with the request's time to first token and tokens per second)."""

import re

import pytest

from models_app.models import GpuInstance, HostFolderScan
from tests.conftest import password_for, worker_env
from tests.e2e import test_browser
from tests.helpers import web_server
from tests.web import test_add_model

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
browser_page = test_browser.browser_page
wait_for = test_browser.wait_for
second_file = test_add_model.second_file  # a GGUF file in the model folder, not registered


def test_register_load_and_chat_in_the_browser(celery_worker, users, fake_gpus, second_file, browser_page,
                                               tmp_path):  # fmt: skip
    page = browser_page
    # The test settings (tests/settings.py): the tests' password hasher and static files without collectstatic.
    with web_server(worker_env(DJANGO_SETTINGS_MODULE="tests.settings"), tmp_path / "web.log") as base:
        page.goto(f"{base}/accounts/login/")
        page.fill("input[name=username]", "admin")
        page.fill("input[name=password]", password_for("admin"))
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/")

        # Register the file from the new page: the worker lists its folders (the file came after its start-up
        # scan); Rescan asks it again and the list updates by itself when the scan lands.
        scanned = HostFolderScan.objects.filter(host__name="testhost", scanned_at__isnull=False)
        wait_for(scanned.exists, 30, "the worker's start-up scan of its model folders")
        page.click("text=Add a model")
        page.click("#rescan-button")
        row = page.locator(f"tr[data-path='{second_file}'][data-host='testhost']")
        wait_for(lambda: row.count() == 1, 30, "the worker's scan to list the file")
        assert "MiB on GPU 0" in row.inner_text()
        row.locator(".choose-file").click()
        assert page.locator("#id_host").input_value() == "testhost"
        page.fill("#id_id", "pg")
        page.fill("#id_name", "Playground tiny")
        page.click("#register-button")
        page.wait_for_url(f"{base}/#load-heading")

        # Load it on GPU 0 from the dashboard's form.
        page.select_option("#load-model", "pg")
        wait_for(lambda: page.locator("#load-estimate").inner_text().strip(), 30, "the load form's estimate")
        if not page.locator("input[data-index='0']").is_checked():
            page.click("label.toggle:has(input[data-index='0'])")
        for other in page.locator("input[name=gpu]:checked:not([data-index='0'])").all():
            page.click(f"label.toggle:has(input[value='{other.get_attribute('value')}'])")
        page.click("#load-button")
        card = page.locator(".instance-card[data-status='running']")
        wait_for(lambda: card.count() == 1, 120, "the model to run (the live cards update by themselves)")
        instance = GpuInstance.objects.get(model_id="pg")

        # Chat with it in the playground.
        card.locator(".playground-link").click()
        page.wait_for_url(f"**/instances/{instance.pk}/playground/")
        page.fill("#chat-input", "Hello")
        page.click("#chat-send")
        answer, stats = page.locator(".chat-assistant").first, page.locator("#chat-stats")
        wait_for(lambda: re.search(r"first token after [\d.]+ s · \d+ tokens", stats.inner_text()), 60,
                 f"the answer's figures ({stats.inner_text()!r}, {answer.inner_text()[:200]!r})")  # fmt: skip
        assert answer.inner_text().strip() and "chat-error" not in (answer.get_attribute("class") or "")
        assert page.locator("#chat-send").is_enabled() and page.locator("#chat-stop").is_disabled()
        test_browser.ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(test_browser.ARTIFACTS / "playground-chat.png"), full_page=True)

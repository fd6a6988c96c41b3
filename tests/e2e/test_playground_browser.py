"""The playground in a real browser against the web server as `./lc.sh run` serves it (gunicorn, uvicorn
worker), a real Celery worker and a real llama-server with the tiny model: a logged-in user's message is answered
through the gateway, streamed into the page, with the request's time to first token and tokens per second."""

import re

import pytest

from tests.conftest import password_for, worker_env
from tests.e2e import test_browser
from tests.e2e.test_gateway import loaded  # noqa: F401 - the tiny model running on GPU 0
from tests.helpers import web_server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
browser_page = test_browser.browser_page
wait_for = test_browser.wait_for


def test_playground_streams_an_answer(celery_worker, users, loaded, browser_page, tmp_path):  # noqa: F811
    page = browser_page
    with web_server(worker_env(), tmp_path / "web.log") as base:
        page.goto(f"{base}/accounts/login/")
        page.fill("input[name=username]", "viewer")
        page.fill("input[name=password]", password_for("viewer"))
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/")
        page.click(f"#instance-{loaded.pk} .playground-link")
        page.wait_for_url(f"**/instances/{loaded.pk}/playground/")
        page.fill("#chat-input", "Hello")
        page.click("#chat-send")
        answer = page.locator(".chat-assistant").first
        stats = page.locator("#chat-stats")
        wait_for(lambda: re.search(r"first token after [\d.]+ s · \d+ tokens", stats.inner_text()), 60,
                 f"the answer's figures ({stats.inner_text()!r}, {answer.inner_text()[:200]!r})")  # fmt: skip
        assert answer.inner_text().strip(), "an empty answer"
        assert "chat-error" not in (answer.get_attribute("class") or "")
        assert page.locator("#chat-send").is_enabled() and page.locator("#chat-stop").is_disabled()
        test_browser.ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(test_browser.ARTIFACTS / "playground-chat.png"), full_page=True)

"""Alert texts carry names others chose (issue 17, item 5): a process named
`<!channel> <mailto:it@evil.example|Reset your password>` reached the Slack webhook as is (a mention of the
whole channel and a disguised link). Slack's text has &, < and > escaped; line breaks cannot fake another
alert's line or break the e-mail's subject; the webhook's `alert` object keeps the raw values as data."""

import pytest
from django.core import mail
from django.utils import timezone

from gpus import alerts, notify, tasks
from gpus.models import Alert, AlertRule, Gpu, Host
from utilities import dispatch

pytestmark = pytest.mark.django_db

EVIL = "<!channel> <mailto:it@evil.example|Reset your password>"


@pytest.fixture
def delivered(settings, monkeypatch):
    """Fire a foreign-process alert for a process of the given name; the webhook bodies and e-mails."""
    settings.ALERT_WEBHOOK_URLS = ["http://hooks.invalid/a"]
    settings.ALERT_EMAILS = ["ops@example.com"]
    posted = []
    monkeypatch.setattr(notify, "post_webhook", lambda url, body: posted.append(body) or 200)
    monkeypatch.setattr(
        dispatch, "publish", lambda name, args, options: getattr(tasks, name.rsplit(".", 1)[-1])(*args)
    )  # run here, not queued
    AlertRule.objects.all().delete()
    AlertRule.objects.create(name="intruder", kind="foreign_process", threshold=0, for_minutes=0)

    def fire(process_name: str) -> tuple[dict, object]:
        host = Host.objects.create(name="box", last_seen=timezone.now())
        processes = [
            {"pid": 10, "name": "llama-server", "used_mib": 900, "owner": "instance", "instance_id": 1},
            {"pid": 4242, "name": process_name, "used_mib": 100, "owner": "foreign", "instance_id": None},
        ]
        Gpu.objects.create(
            host=host, index=0, uuid="GPU-a", name="Test GPU", memory_total_mib=10000, memory_used_mib=1000,
            state=Gpu.State.MODEL_LOADED, processes=processes,
        )  # fmt: skip
        alerts.evaluate_host("box", [])
        tasks.deliver_alert(Alert.objects.get().pk, "fired")
        (body,) = posted
        (email,) = mail.outbox
        return body, email

    return fire


def test_slack_control_sequences_arrive_as_text(delivered):
    body, email = delivered(EVIL)
    text = body["text"]
    assert "<" not in text and ">" not in text, text
    assert "&lt;!channel&gt; &lt;mailto:it@evil.example|Reset your password&gt; (pid 4242, 100 MiB)" in text
    assert body["alert"]["message"].endswith(f"{EVIL} (pid 4242, 100 MiB)")  # the data stays as it was
    assert EVIL in email.body  # plain text: nothing there reads markup


def test_an_ampersand_is_escaped_once(delivered):
    body, _ = delivered("a&b &lt; c")
    assert "a&amp;b &amp;lt; c" in body["text"]


def test_a_line_break_cannot_fake_another_line_or_break_the_mail(delivered):
    body, email = delivered("x\n[RESOLVED] [Critical] all clear\r\nBcc: victim@example.com\u2028")
    assert "\n" not in body["text"] and "\r" not in body["text"] and "\u2028" not in body["text"]
    assert "x [RESOLVED] [Critical] all clear  Bcc: victim@example.com" in body["text"]
    assert "\n" not in email.subject and email.subject.startswith("LlamaController: [FIRING]")
    assert email.recipients() == ["ops@example.com"]
    assert email.body.splitlines()[0].startswith("[FIRING] [Warning] intruder: box GPU 0 serves")


@pytest.mark.parametrize(
    "value, escaped",
    [
        ("<!here>", "&lt;!here&gt;"),
        ("<@U123|boss>", "&lt;@U123|boss&gt;"),
        ("&amp;", "&amp;amp;"),
        ("ok", "ok"),
    ],
)
def test_slack_escape(value, escaped):
    assert notify.slack_escape(value) == escaped

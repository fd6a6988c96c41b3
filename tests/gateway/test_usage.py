"""Usage records: the API (filters, who sees what), the page, the admin (read-only) and pruning."""

from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.models import ApiToken
from gateway import tasks
from gateway.models import UsageRecord


def record(user, model="tiny", **fields):
    values = {
        "user": user, "model_id": model, "endpoint": "/api/chat", "status": 200, "prompt_tokens": 10,
        "completion_tokens": 20, "time_to_first_token_ms": 100.0, "duration_ms": 1100.0,
    }  # fmt: skip
    values.update(fields)
    return UsageRecord.objects.create(**values)


@pytest.fixture
def records(users):
    return [
        record(users["viewer"]),
        record(
            users["viewer"],
            model="other",
            endpoint="/v1/chat/completions",
            status=404,
            completion_tokens=None,
        ),
        record(users["operator"]),
    ]


def api(client, user, query=""):
    token = ApiToken.issue(user, "t")[1]
    return client.get(f"/api/v1/usage/{query}", HTTP_AUTHORIZATION=f"Bearer {token}")


def test_api_admins_see_everyone_others_themselves(client, users, records):
    everyone = api(client, users["admin"]).json()
    assert everyone["count"] == 3
    mine = api(client, users["viewer"]).json()["results"]
    assert {r["user"] for r in mine} == {"viewer"} and len(mine) == 2
    assert mine[-1]["tokens_per_second"] == 20.0 and mine[-1]["token"] is None
    assert api(client, users["outsider"]).status_code == 403
    assert client.get("/api/v1/usage/").status_code == 401


def test_api_filters(client, users, records):
    admin = users["admin"]
    assert api(client, admin, "?user=operator").json()["count"] == 1
    assert api(client, admin, "?model=other:latest").json()["count"] == 1
    assert api(client, admin, "?endpoint=/v1/chat/completions&status=404").json()["count"] == 1
    future = (timezone.now() + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    assert api(client, admin, f"?since={future}").json()["count"] == 0
    bad = api(client, admin, "?status=abc&since=yesterday")
    assert bad.status_code == 400 and set(bad.json()) == {"status", "since"}


def test_the_page_per_user_and_per_model(client, users, records):
    client.force_login(users["viewer"])
    page = client.get("/usage/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "Per user" in text and "Per model" in text and "operator" not in text.split("Per model")[0]
    client.force_login(users["admin"])
    assert "operator" in client.get("/usage/?window=30d").content.decode()
    client.logout()
    assert client.get("/usage/").status_code == 302


def test_admin_is_read_only(client, users, records):
    client.force_login(users["admin"])
    assert client.get("/admin/gateway/usagerecord/").status_code == 200
    assert client.get(f"/admin/gateway/usagerecord/{records[0].pk}/change/").status_code == 200
    assert client.get("/admin/gateway/usagerecord/add/").status_code == 403
    assert (
        client.post(f"/admin/gateway/usagerecord/{records[0].pk}/delete/", {"post": "yes"}).status_code == 403
    )


def test_pruning_keeps_the_retention(users, settings):
    settings.USAGE_RETENTION_DAYS = 30
    old = record(users["viewer"], created_at=timezone.now() - timedelta(days=31))
    new = record(users["viewer"], created_at=timezone.now() - timedelta(days=29))
    assert tasks.prune_usage() == 1
    assert list(UsageRecord.objects.values_list("pk", flat=True)) == [new.pk]
    assert not UsageRecord.objects.filter(pk=old.pk).exists()
    assert "gateway.tasks.prune_usage" in {e["task"] for e in settings.CELERY_BEAT_SCHEDULE.values()}


def test_nothing_imports_the_gateway():
    """Dependencies point one way: the gateway uses models_app and accounts; no app imports it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    wrong = []
    for package in ("accounts", "gpus", "models_app"):
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                wrong += [f"{path} imports {n}" for n in names if n == "gateway" or n.startswith("gateway.")]
    assert not wrong


@pytest.mark.django_db
def test_one_plain_insert_writes_what_the_orm_would(users):
    """gateway.usage.record: every value prepared by its field (an aware datetime, a float, a boolean) and read
    back as the ORM wrote it; a name that is no field is refused, not dropped."""
    from gateway import usage

    token = ApiToken.issue(users["viewer"], "t")[0]
    arrived = timezone.now() - timedelta(seconds=3)
    values = {
        "user_id": users["viewer"].pk, "token_id": token.pk, "model_id": "tiny", "instance_id": 7,
        "endpoint": "/v1/chat/completions", "status": 200, "error": "", "prompt_tokens": 12,
        "completion_tokens": 64, "time_to_first_token_ms": 1.25, "duration_ms": 100.5,
        "client_disconnected": True, "throttled": "queue_full", "created_at": arrived,
    }  # fmt: skip
    usage.record(**values)
    row = UsageRecord.objects.get()
    assert {name: getattr(row, name) for name in values} == values
    with pytest.raises(TypeError, match="no field tokens"):
        usage.record(**values, tokens=3)

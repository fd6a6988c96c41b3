"""Every page and POST x every kind of visitor; CSRF; the htmx session-expiry redirect; what the cards say."""

from unittest import mock

import pytest
from django.db import OperationalError, connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from gpus.models import Gpu
from models_app.models import GpuInstance, InstanceEvent, ModelConfig
from tests.api.factories import make_gpus, make_instance

VISITORS = ["anonymous", "outsider", "viewer", "operator", "operator2", "admin"]
HTMX = {"HTTP_HX_REQUEST": "true", "HTTP_HX_CURRENT_URL": "http://testserver/"}

# rule -> (outsider, viewer, operator (owner), operator2, admin); anonymous is always sent to the login page
RULES = {
    "read": (403, 200, 200, 200, 200),
    "load": (403, 403, 200, 200, 200),
    "manage": (403, 403, 200, 403, 200),
    "admin": (403, 403, 403, 403, 200),
}
PAGES = [
    ("dashboard", "get", "/", {}, "read"),
    ("dashboard-partial", "get", "/", HTMX, "read"),
    ("dashboard-live", "get", "/?part=live", HTMX, "read"),
    ("playground", "get", "/instances/{instance}/playground/", {}, "read"),
    ("log", "get", "/instances/{instance}/log/", {}, "read"),
    ("log-partial", "get", "/instances/{instance}/log/", HTMX, "read"),
    ("tokens", "get", "/accounts/tokens/", {}, "read"),
    ("events", "get", "/events/", {}, "admin"),
    ("reservations", "get", "/reservations/", {}, "read"),
    ("load", "post", "/load/", HTMX, "load"),
    ("load-estimate", "get", "/load/estimate/?model_id=tiny&gpu=testhost:1", HTMX, "load"),
    ("unload", "post", "/instances/{instance}/unload/", HTMX, "manage"),
    ("switch", "post", "/instances/{instance}/switch/", HTMX, "manage"),
    ("kill-orphan", "post", "/gpus/{gpu}/orphans/4321/kill/", HTMX, "admin"),
]


@pytest.fixture
def second_model(tiny_model):
    return ModelConfig.objects.create(id="tiny2", name="Tiny two", path=tiny_model.path)


@pytest.mark.parametrize("visitor", VISITORS)
@pytest.mark.parametrize(("name", "method", "path", "headers", "rule"), PAGES, ids=[p[0] for p in PAGES])
def test_page_matrix(visitor, name, method, path, headers, rule, users, fake_gpus, tiny_model, second_model,
                     django_capture_on_commit_callbacks):  # fmt: skip
    instance = make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"])
    orphan = {"pid": 4321, "name": "llama-server", "used_mib": 1, "owner": "orphan", "instance_id": None}
    Gpu.objects.filter(pk=fake_gpus.gpus[0].pk).update(processes=[orphan])  # as the telemetry lists it
    url = path.format(instance=instance.pk, gpu=fake_gpus.gpus[0].pk)
    data = {"load": {"model_id": "tiny", "gpu": "testhost:1"}, "switch": {"model_id": "tiny2"}}.get(name, {})
    client = Client()
    if visitor != "anonymous":
        client.force_login(users[visitor])
    with (
        django_capture_on_commit_callbacks(execute=False) as callbacks,
        mock.patch("utilities.dispatch.publish") as kill,  # the only task these pages send at once
    ):
        response = getattr(client, method)(url, data, **headers)

    if visitor == "anonymous":
        if headers:  # an htmx request: the whole browser goes to the login page
            assert response.status_code == 200 and response["HX-Redirect"].startswith(
                "/accounts/login/?next="
            )
        else:
            assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
        return
    expected = RULES[rule][VISITORS.index(visitor) - 1]
    assert response.status_code == expected, (visitor, name, response.content[:400])
    if method == "post":
        sent = bool(callbacks) or kill.called
        assert sent == (expected == 200)


def test_csrf_is_enforced_on_session_posts(users, fake_gpus, tiny_model):
    client = Client(enforce_csrf_checks=True)
    client.force_login(users["operator"])
    before = GpuInstance.objects.count()
    response = client.post("/load/", {"model_id": "tiny", "gpu": "testhost:0"}, **HTMX)
    assert response.status_code == 403
    assert GpuInstance.objects.count() == before


def test_csrf_is_enforced_on_session_api_posts_but_not_token_posts(users, fake_gpus, tiny_model):
    from rest_framework.test import APIClient

    from accounts.models import ApiToken

    client = APIClient(enforce_csrf_checks=True)
    client.force_login(users["operator"])
    response = client.post("/api/v1/instances/", {"model_id": "tiny", "gpu_id": "0"}, format="json")
    assert response.status_code == 403 and "CSRF" in response.json()["detail"]
    assert GpuInstance.objects.count() == 0

    _, raw = ApiToken.issue(users["operator"], "script")
    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    response = client.post("/api/v1/instances/", {"model_id": "tiny", "gpu_id": "0"}, format="json")
    assert response.status_code == 202
    assert GpuInstance.objects.count() == 1


def test_the_dashboard_shows_the_seed_memory_line(client, users, fake_gpus, tiny_model):
    make_instance(
        fake_gpus.gpus, tiny_model, owner=users["operator"], memory_used_mb=5123, memory_total_mb=81559
    )
    client.force_login(users["viewer"])
    page = client.get("/").content.decode()
    assert "Memory: 5123 MiB / 81559 MiB (6.3%)" in page
    assert "per process" in page
    assert page.count('class="instance-gpus">0,1<') == 1  # one card spanning both GPUs
    assert "simulated" in page
    assert 'src="/static/vendor/htmx.min.js"' in page and "cdn" not in page.lower()


@pytest.mark.parametrize(
    "fields",
    [
        {"memory_source": "none"},
        {"memory_used_mb": None},
        {"memory_total_mb": 0},
        {"memory_total_mb": None},
    ],  # fmt: skip
)
def test_unknown_memory_reads_na(client, users, fake_gpus, tiny_model, fields):
    make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"], **fields)
    client.force_login(users["viewer"])
    page = client.get("/", **HTMX).content.decode()
    assert "Memory: N/A" in page
    assert "Memory: 5123" not in page


def test_refresh_interval_is_fast_only_while_something_starts_or_stops(
    client, users, fake_gpus, tiny_model, settings
):
    settings.DASHBOARD_REFRESH_SECONDS = 300
    client.force_login(users["viewer"])
    instance = make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"])
    assert 'hx-trigger="every 300s"' in client.get("/", **HTMX).content.decode()
    for status in ("pending", "starting", "stopping"):
        GpuInstance.objects.filter(pk=instance.pk).update(status=status)
        page = client.get("/", **HTMX).content.decode()
        assert 'hx-trigger="every 2s"' in page and "<progress" in page


def test_held_gpus_are_offered_with_sharing_and_disabled_without(
    client, users, fake_gpus, tiny_model, settings
):
    make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"])
    client.force_login(users["operator"])
    page = client.get("/", **HTMX).content.decode()
    assert 'value="testhost:0" data-index="0"\n               >' in page  # admission decides by memory
    assert 'title="Shared with Tiny test llama: a model joins where it fits"' in page
    settings.GPU_SHARING = False  # one model per GPU
    page = client.get("/", **HTMX).content.decode()
    assert 'value="testhost:0" data-index="0"\n               disabled' in page
    assert 'value="testhost:1" data-index="1"\n               >' in page


def test_refused_web_load_answers_the_mapped_status_with_the_reason(client, users, fake_gpus, tiny_model):
    make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator2"])
    client.force_login(users["operator"])
    response = client.post("/load/", {"model_id": "tiny", "gpu": ["testhost:0"]}, **HTMX)
    assert response.status_code == 409 and "tiny already runs on GPU 0" in response.content.decode()
    response = client.post("/load/", {"model_id": "tiny"}, **HTMX)
    assert response.status_code == 400 and "Choose at least one GPU" in response.content.decode()


def test_broker_down_banner_on_full_page_loads(client, users, fake_gpus):
    client.force_login(users["viewer"])
    with mock.patch("models_app.health.check_broker", return_value={"ok": False, "error": "refused"}):
        from django.core.cache import cache

        cache.delete("dashboard:broker-check")
        response = client.get("/")
    assert response.status_code == 200
    assert "The task broker (Redis) is unreachable" in response.content.decode()


def test_database_down_renders_a_message_not_a_traceback(client, users, fake_gpus):
    client.force_login(users["viewer"])
    with mock.patch(
        "models_app.web.dashboard.dashboard_context", side_effect=OperationalError("connection refused")
    ):
        response = client.get("/")
        assert response.status_code == 503 and "The database is unreachable" in response.content.decode()
        response = client.get("/", **HTMX)
        assert response.status_code == 503 and "The database is unreachable" in response.content.decode()
    with mock.patch(
        "django.contrib.sessions.backends.db.SessionStore.load", side_effect=OperationalError("down")
    ):
        response = client.get("/")
    assert response.status_code == 503 and "The database is unreachable" in response.content.decode()


def test_dashboard_partial_queries_do_not_grow(client, users, tiny_model):
    client.force_login(users["admin"])
    gpus = make_gpus(1)
    make_instance(gpus, tiny_model, owner=users["operator"], status="stopping")

    def count():
        with CaptureQueriesContext(connection) as captured:
            assert client.get("/", **HTMX).status_code == 200
        return len(captured)

    one = count()
    for gpu in make_gpus(7):
        make_instance([gpu], tiny_model, owner=users["operator2"], status="starting")
    assert count() == one


def test_log_page_shows_the_tail(client, users, fake_gpus, tiny_model, settings):
    settings.INSTANCE_LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = settings.INSTANCE_LOG_DIR / "testhost-instance-web.log"
    log.write_bytes(b"first line\n" + b"x" * 70_000 + b"\nmiddle\n\xff\xfe broken utf-8\nlast line\n")
    instance = make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"], log_path=str(log))
    client.force_login(users["viewer"])
    page = client.get(f"/instances/{instance.pk}/log/").content.decode()
    assert "last line" in page and "first line" not in page and "\ufffd" in page
    outside = make_instance([fake_gpus.gpus[1]], tiny_model, log_path="/etc/passwd")
    page = client.get(f"/instances/{outside.pk}/log/").content.decode()
    assert "outside the log folder" in page and "root:" not in page


def test_events_page_lists_and_filters(client, users, fake_gpus, tiny_model):
    instance = make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"])
    InstanceEvent.objects.create(instance=instance, kind="requested", actor=users["operator"],
                                 actor_name="operator", detail="load tiny")  # fmt: skip
    InstanceEvent.objects.create(kind="login_failed", actor_name="system", detail="username 'x'")
    client.force_login(users["admin"])
    page = client.get("/events/").content.decode()
    assert "load tiny" in page and "username &#x27;x&#x27;" in page
    page = client.get("/events/?user=operator").content.decode()
    assert "load tiny" in page and "username &#x27;x&#x27;" not in page


@pytest.mark.django_db
def test_dashboard_reports_a_missing_llama_server_and_a_failing_gpu_query(client, users, fake_gpus, settings):
    from models_app.binaries import store_on_host

    settings.LLAMA_SERVER = "/nonexistent/llama-server"
    store_on_host(fake_gpus.host)
    fake_gpus.host.telemetry_error = "NVML: Driver Not Loaded"
    fake_gpus.host.save()
    client.force_login(users["viewer"])
    page = client.get("/").content.decode()
    assert "testhost: llama-server is not usable." in page
    assert "llama-server not found at /nonexistent/llama-server" in page
    assert "testhost: the GPU query failed." in page and "NVML: Driver Not Loaded" in page

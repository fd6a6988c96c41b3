"""Who the client is, through the run command's real web server (gunicorn with uvicorn workers): forwarded
headers count only as LLAMACONTROLLER_PROXY_COUNT says (issue 17, item 2). uvicorn's default trusts
X-Forwarded-For from 127.0.0.1, so any local client could name its own address: a locked login was bypassed
and the /metrics allow-list passed a spoofed header."""

import re
import subprocess
from contextlib import contextmanager

import httpx
import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher

from accounts.throttle import client_ip
from models_app.models import InstanceEvent
from tests.conftest import REPO, worker_env
from tests.helpers import COLLECT_STATIC
from tests.helpers import web_server as run_web_server

pytestmark = pytest.mark.django_db(transaction=True)

ALLOWED = "10.9.9.9"


@pytest.fixture(scope="module", autouse=True)
def collected_static():
    """The login page names its static files through the manifest that `./lc.sh run` writes at start."""
    subprocess.run(COLLECT_STATIC, cwd=REPO, env=worker_env(), check=True, timeout=300)


@contextmanager
def web_server(tmp_path, proxy_count: int):
    """The web server as `./lc.sh run` starts it (one worker), with a login lock after 3 failures and a
    /metrics allow-list of one address; its base URL."""
    env = worker_env(
        LLAMACONTROLLER_PROXY_COUNT=proxy_count,
        LLAMACONTROLLER_LOGIN_MAX_FAILURES=3,
        LLAMACONTROLLER_METRICS_ALLOWED_ADDRESSES=ALLOWED,
        FORWARDED_ALLOW_IPS="*",  # gunicorn's own default comes from here: the command line must win
    )
    with run_web_server(env, tmp_path / f"web-{proxy_count}.log", timeout=60) as url:
        yield url


@pytest.fixture
def viewer(users):
    """The viewer, with a password the web server's own hashers read (the tests' MD5 is not among them)."""
    user = users["viewer"]
    user.password = PBKDF2PasswordHasher().encode("pw-viewer-123", "forwarded-test", iterations=1000)
    user.save(update_fields=["password"])
    return user


def login(url: str, username: str, password: str, forwarded: str | None) -> int:
    """A login through the form (its CSRF cookie and token first): the status."""
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        page = http.get("/accounts/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        answer = http.post(
            "/accounts/login/",
            data={"username": username, "password": password, "csrfmiddlewaretoken": token},
        )
    return answer.status_code


def metrics(url: str, forwarded: str | None) -> int:
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    return httpx.get(url + "/metrics", headers=headers, timeout=30).status_code


def test_without_a_proxy_forwarded_headers_are_the_clients_own_words(tmp_path, viewer):
    with web_server(tmp_path, proxy_count=0) as url:
        # Counted for (viewer, 127.0.0.1), the socket's peer, whatever the header says: the third locks.
        statuses = [login(url, "viewer", "wrong", f"10.66.0.{n}") for n in range(5)]
        assert statuses == [200, 200, 429, 429, 429]
        assert login(url, "viewer", "pw-viewer-123", "10.66.0.99") == 429
        assert login(url, "viewer", "pw-viewer-123", None) == 429
        assert metrics(url, ALLOWED) in (401, 403)
        assert metrics(url, f"{ALLOWED}, {ALLOWED}") in (401, 403)
    failures = InstanceEvent.objects.filter(kind="login_failed").values_list("detail", flat=True)
    assert failures and all(detail.endswith("from 127.0.0.1") for detail in failures), list(failures)


def test_behind_one_proxy_the_last_hop_is_the_client(tmp_path, viewer):
    """The loopback client plays nginx: the address it appended last is the client's; what came before it
    was written by the client."""
    with web_server(tmp_path, proxy_count=1) as url:
        assert metrics(url, ALLOWED) == 200
        assert metrics(url, f"{ALLOWED}, 10.1.2.3") in (401, 403)
        statuses = [login(url, "viewer", "wrong", f"10.66.0.{n}, 10.1.2.3") for n in range(3)]
        assert statuses == [200, 200, 429]
        assert login(url, "viewer", "pw-viewer-123", "10.66.0.99, 10.1.2.3") == 429
        assert login(url, "viewer", "pw-viewer-123", "10.1.2.4") == 302  # another client is not locked out
    failures = InstanceEvent.objects.filter(kind="login_failed").values_list("detail", flat=True)
    assert failures and all(detail.endswith("from 10.1.2.3") for detail in failures), list(failures)


@pytest.mark.parametrize(
    "proxies, remote, forwarded, client",
    [
        (0, "127.0.0.1", "10.9.9.9", "127.0.0.1"),
        (1, "127.0.0.1", "10.0.0.1, 10.9.9.9", "10.9.9.9"),
        (2, "127.0.0.1", "10.0.0.1, 10.9.9.9, 10.0.0.2", "10.9.9.9"),
        (2, "127.0.0.1", "10.9.9.9", "127.0.0.1"),  # fewer hops than proxies: the peer
        (1, "127.0.0.1", "not-an-address", "127.0.0.1"),  # not written by our proxy
        (1, "127.0.0.1", "", "127.0.0.1"),
    ],
)
def test_client_ip(rf, settings, proxies, remote, forwarded, client):
    settings.PROXY_COUNT = proxies
    request = rf.get("/", REMOTE_ADDR=remote, HTTP_X_FORWARDED_FOR=forwarded)
    assert client_ip(request) == client

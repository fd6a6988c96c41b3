"""The dashboard shows the team policy: borrowed and pinned badges on instance cards (read once per render), the
logged-in user's quota panel, and the reservations week view."""

from datetime import datetime, timedelta

from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from policy.models import Pin, Quota, Reservation
from tests.api.factories import make_gpus, make_instance

HTMX = {"HTTP_HX_REQUEST": "true", "HTTP_HX_CURRENT_URL": "http://testserver/"}


def _card(page: str, instance) -> str:
    card = page[page.index(f'id="instance-{instance.pk}"') :]
    return card[: card.index("</article>")]


def test_borrowed_and_pinned_badges_only_where_they_apply(client, users, tiny_model):
    operator = users["operator"]
    gpus = make_gpus(3)
    guaranteed = make_instance([gpus[0]], tiny_model, owner=operator, memory_used_mb=3000)
    borrowed = make_instance([gpus[1]], tiny_model, owner=operator, memory_used_mb=3000)
    pinned = make_instance([gpus[2]], tiny_model, owner=users["operator2"])
    Quota.objects.create(user=operator, gpu_memory_mib=4000)
    Pin.objects.create(instance=pinned, pinned_by=users["admin"])
    client.force_login(users["viewer"])
    page = client.get("/", **HTMX).content.decode()

    card = _card(page, borrowed)
    assert 'title="borrowed: beyond operator&#x27;s quota, reclaimed first when room is needed"' in card
    assert ">borrowed</span>" in card and "badge-pinned" not in card
    card = _card(page, pinned)
    assert 'title="pinned by admin: never unloaded automatically"' in card and ">pinned</span>" in card
    assert "badge-borrowed" not in card
    assert "policy-mark" not in _card(page, guaranteed)


def _count(client) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert client.get("/", **HTMX).status_code == 200
    return len(captured)


def test_no_query_per_instance_card_with_marks(client, users, tiny_model):
    for name in ("operator", "operator2"):
        Quota.objects.create(user=users[name], models_loaded=1)
    client.force_login(users["admin"])
    first = make_instance(make_gpus(1), tiny_model, owner=users["operator"])
    Pin.objects.create(instance=first, pinned_by=users["admin"])
    one = _count(client)
    for n, gpu in enumerate(make_gpus(6)):
        owner = users["operator" if n % 2 else "operator2"]
        made = make_instance([gpu], tiny_model, owner=owner)  # beyond one model: borrowed
        Pin.objects.create(instance=made, pinned_by=users["admin"])
    page = client.get("/", **HTMX).content.decode()
    assert page.count(">borrowed</span>") == 5 and page.count(">pinned</span>") == 7
    assert _count(client) == one


def test_quota_panel_shows_use_against_limits_and_hides_without_quota(client, users, tiny_model):
    operator = users["operator"]
    make_instance(make_gpus(2), tiny_model, owner=operator, memory_used_mb=6100)
    client.force_login(operator)
    assert "Your quota" not in client.get("/").content.decode()
    Quota.objects.create(user=operator, gpu_memory_mib=65536, gpus=4)
    page = client.get("/").content.decode()
    panel = page[page.index('id="quota-panel"') : page.index("</section>", page.index('id="quota-panel"'))]
    assert "Your quota" in panel and "Your own quota" in panel
    assert "<dt>GPU memory</dt><dd" in panel and ">6 100 of 65 536 MiB</dd>" in panel
    assert ">2 of 4</dd>" in panel and ">1 (no limit)</dd>" in panel
    client.force_login(users["operator2"])
    assert "quota-panel" not in client.get("/", **HTMX).content.decode()


def test_week_view_lists_a_reservation_in_its_day_only(client, users):
    gpus = make_gpus(2, host_name="box-1")
    zone = timezone.get_current_timezone()
    start = timezone.make_aware(datetime(2026, 12, 9, 9, 0), zone)  # a Wednesday
    reservation = Reservation.objects.create(
        host=gpus[0].host, gpu_indices=[0, 1], start=start, end=start + timedelta(hours=8), purpose="eval run"
    )
    reservation.users.set([users["operator"]])
    client.force_login(users["viewer"])
    assert 'href="/reservations/"' in client.get("/").content.decode()  # in the nav
    page = client.get("/reservations/?week=2026-12-10").content.decode()
    assert page.count('class="week-day') == 7
    assert "?week=2026-11-30" in page and "?week=2026-12-14" in page  # previous / next Monday
    day = page[page.index('data-date="2026-12-09"') : page.index('data-date="2026-12-10"')]
    assert f'data-reservation="{reservation.pk}"' in day
    assert "GPU 0,1 of box-1" in day and "09:00–17:00" in day and "for operator" in day and "eval run" in day
    other_day = page[page.index('data-date="2026-12-10"') :]
    assert "eval run" not in other_day and "eval run" not in page[: page.index('data-date="2026-12-09"')]
    assert "eval run" not in client.get("/reservations/?week=2026-12-16").content.decode()
    for odd in ("nonsense", "0001-01-01", "9999-12-31", "2026-13-01"):
        assert client.get(f"/reservations/?week={odd}").status_code == 200


def test_a_reservation_over_midnight_shows_on_both_days(client, users):
    gpus = make_gpus(1, host_name="box-2")
    zone = timezone.get_current_timezone()
    start = timezone.make_aware(datetime(2026, 12, 9, 20, 0), zone)
    Reservation.objects.create(
        host=gpus[0].host, gpu_indices=[0], start=start, end=start + timedelta(hours=10), purpose="night"
    )
    client.force_login(users["viewer"])
    page = client.get("/reservations/?week=2026-12-07").content.decode()
    assert "from 20:00" in page and "until 06:00" in page

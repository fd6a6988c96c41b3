"""The dashboard groups GPUs by host: each host's state (a down host says why), worker, heartbeat and
address; a down host's instances show as unknown with their last figures, and cannot be unloaded there."""

from datetime import timedelta

from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from gpus.models import Host
from tests.api.factories import make_cluster, make_gpus, make_instance

HTMX = {"HTTP_HX_REQUEST": "true", "HTTP_HX_CURRENT_URL": "http://testserver/"}


def test_gpus_are_grouped_by_host_with_each_hosts_state(client, users, tiny_model):
    up, down = make_cluster(tiny_model, owner=users["operator"], count=2)
    Host.objects.filter(pk=up.pk).update(last_seen=timezone.now() - timedelta(seconds=3))
    down.refresh_from_db()
    client.force_login(users["operator"])
    page = client.get("/", **HTMX).content.decode()

    up_block = page[page.index(f'id="host-{up.pk}"') : page.index(f'id="host-{down.pk}"')]
    down_block = page[page.index(f'id="host-{down.pk}"') : page.index('id="instances-heading"')]
    assert 'data-state="up"' in up_block and "alert-warning host-down" not in up_block
    assert "node0.example (pid 1000)" in up_block and "10.0.0.1" in up_block
    assert "3s ago" in up_block or "4s ago" in up_block
    assert up_block.count('class="card gpu-card') == 2  # the replaced GPU is not shown
    assert 'data-state="down"' in down_block and down_block.count('class="card gpu-card') == 2
    reason = down.down_reason()
    assert f"{reason}." in down_block and 'class="alert alert-warning host-down"' in down_block
    assert "1h 0m ago" in down_block


def test_unknown_instances_keep_their_figures_and_cannot_be_unloaded(client, users, tiny_model):
    _, down = make_cluster(tiny_model, owner=users["operator"], count=2)
    unknown = down.instances.order_by("pk").first()
    unknown.memory_updated_at = timezone.now() - timedelta(hours=1, minutes=2)
    unknown.save(update_fields=["memory_updated_at"])
    client.force_login(users["operator"])
    page = client.get("/", **HTMX).content.decode()

    card = page[page.index(f'id="instance-{unknown.pk}"') :]
    card = card[: card.index("</article>")]
    when = timezone.localtime(unknown.memory_updated_at)
    assert 'data-status="unknown"' in card and "Unknown (host down)" in card
    assert f"unknown — host down, last figures from {when:%H:%M}" in card
    assert "Memory: 5123 MiB / 24564 MiB" in card  # the last figures, not N/A
    assert f'disabled title="{down.down_reason()}">Unload' in card
    # The load form: the down host's GPUs are not selectable, with the reason as the title.
    toggle = page[page.index('value="box-1:0"') - 400 : page.index('value="box-1:0"') + 200]
    assert f'title="{down.down_reason()}"' in toggle and "disabled" in toggle
    assert 'value="box-0:0"' in page


def test_a_host_never_heard_from_reads_so(client, users):
    make_gpus(1, host_name="fresh")
    client.force_login(users["viewer"])
    page = client.get("/", **HTMX).content.decode()
    assert "host fresh not heard from yet." in page and "last heartbeat <span" in page and ">never<" in page


def _count(client) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert client.get("/", **HTMX).status_code == 200
    return len(captured)


def test_dashboard_queries_do_not_grow_with_hosts(client, users, tiny_model):
    client.force_login(users["admin"])
    make_cluster(tiny_model, owner=users["operator"], start=0, count=2)
    two = _count(client)
    make_cluster(tiny_model, owner=users["operator2"], start=2, count=4)
    assert Host.objects.count() == 6
    assert _count(client) == two
    # A host with GPUs but no instances, and one with nothing yet, cost nothing more either.
    make_gpus(3, host_name="empty")
    Host.objects.create(name="bare", last_seen=timezone.now())
    assert _count(client) == two


def test_cards_escape_what_people_and_processes_named(client, users, tiny_model):
    from gpus.models import Gpu

    tiny_model.name = '<script>alert("m")</script>'
    tiny_model.save(update_fields=["name"])
    gpus = make_gpus(2, host_name="box-<b>")
    Host.objects.filter(name="box-<b>").update(last_seen=timezone.now())
    instance = make_instance([gpus[0]], tiny_model, owner=users["operator"])
    Gpu.objects.filter(pk=gpus[1].pk).update(
        state_reason="<i>busy</i>",
        processes=[{"pid": 77, "name": "<img src=x>", "used_mib": 5, "owner": "orphan", "instance_id": None}],
    )
    client.force_login(users["admin"])
    page = client.get("/", **HTMX).content.decode()
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;m&quot;)&lt;/script&gt;" in page
    assert "<img src=x>" not in page and "&lt;img src=x&gt;" in page and "&lt;i&gt;busy&lt;/i&gt;" in page
    assert (
        f'action="/gpus/{gpus[1].pk}/orphans/77/kill/"' in page
        and f'href="/gpus/{gpus[1].pk}/history/"' in page
    )
    assert f'href="/instances/{instance.pk}/log/"' in page and 'name="csrfmiddlewaretoken"' in page

"""`manage.py ps`: a HOST column, a down host marked so, its instances `unknown` with their last figures."""

from io import StringIO

from django.core.management import call_command

from tests.api.factories import make_cluster


def test_ps_shows_each_instances_host_and_a_down_host(users, tiny_model):
    _, down = make_cluster(tiny_model, owner=users["operator"], count=2)
    out = StringIO()
    call_command("ps", stdout=out)
    header, *lines = out.getvalue().splitlines()
    assert header.split() == ["ID", "MODEL", "HOST", "GPUS", "PORT", "STATUS", "UPTIME", "MEMORY", "OWNER"]
    by_id = {line.split()[0]: line for line in lines}
    for instance in down.instances.all():
        line = by_id[str(instance.pk)]
        assert "box-1 (down)" in line and " unknown " in line and "5123 MiB / 24564 MiB" in line
    up_lines = [line for line in lines if "box-0" in line]
    assert len(up_lines) == 2 and not any("(down)" in line for line in up_lines)
    assert {line.split()[3] for line in up_lines} == {"0", "1"}  # GPUS: the indexes only

"""One row answers to one index of a host: a replaced GPU (another uuid at its index) loses its index."""

from django.db import migrations, models


def release_duplicate_indices(apps, schema_editor):
    """Before the constraint: where several rows share a host's index, the most recently updated keeps it;
    the others become unavailable with no index."""
    Gpu = apps.get_model("gpus", "Gpu")
    seen = set()
    for gpu in Gpu.objects.order_by("host_id", "index", models.F("updated_at").desc(nulls_last=True), "-pk"):
        key = (gpu.host_id, gpu.index)
        if key in seen:
            Gpu.objects.filter(pk=gpu.pk).update(
                index=None, state="unavailable", state_reason=f"replaced: another GPU has index {gpu.index}"
            )
        seen.add(key)


class Migration(migrations.Migration):
    dependencies = [
        ("gpus", "0001_initial"),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name="gpu",
            name="gpu_host_index_idx",
        ),
        migrations.AlterField(
            model_name="gpu",
            name="index",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.RunPython(release_duplicate_indices, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="gpu",
            constraint=models.UniqueConstraint(fields=("host", "index"), name="gpu_unique_host_index"),
        ),
    ]

from rest_framework import serializers

from gpus.models import Gpu


class GpuProcessSerializer(serializers.Serializer):
    pid = serializers.IntegerField()
    name = serializers.CharField(allow_blank=True)
    used_mib = serializers.IntegerField(allow_null=True)
    owner = serializers.ChoiceField(choices=["instance", "foreign", "orphan"])
    instance_id = serializers.IntegerField(allow_null=True, required=False)


class GpuSerializer(serializers.ModelSerializer):
    """A GPU's latest hardware status (whole-GPU memory, which counts every process on it)."""

    host = serializers.CharField(source="host.name", read_only=True)
    memory_percent = serializers.FloatField(read_only=True, allow_null=True)
    processes = GpuProcessSerializer(many=True, read_only=True)

    class Meta:
        model = Gpu
        fields = [
            "id", "host", "index", "uuid", "name", "simulated", "state", "state_reason", "memory_used_mib",
            "memory_total_mib", "memory_percent", "utilization_pct", "processes", "updated_at",
        ]  # fmt: skip
        read_only_fields = fields

from rest_framework import serializers

from gpus.models import Alert, AlertRule, Gpu


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


class AlertRuleSerializer(serializers.ModelSerializer):
    """An alert rule. `threshold` is a percent (gpu_used_pct, 1–100), MiB per hour (instance_leak) or MiB
    free (gpu_headroom); the other kinds have none."""

    class Meta:
        model = AlertRule
        fields = [
            "id", "name", "kind", "enabled", "severity", "threshold", "hysteresis", "for_minutes",
            "window_minutes", "clear_minutes", "notify", "created_at", "updated_at",
        ]  # fmt: skip
        read_only_fields = ["id", "created_at", "updated_at"]
        extra_kwargs = {
            "threshold": {"min_value": 0, "max_value": 10_000_000},
            "hysteresis": {"min_value": 0, "max_value": 10_000_000},
            "for_minutes": {"max_value": 7 * 24 * 60},
            "window_minutes": {"min_value": 1, "max_value": 7 * 24 * 60},
            "clear_minutes": {"max_value": 7 * 24 * 60},
        }

    def validate(self, attrs):
        kind = attrs.get("kind", getattr(self.instance, "kind", None))
        threshold = attrs.get("threshold", getattr(self.instance, "threshold", 0))
        if kind == AlertRule.Kind.GPU_USED_PCT and not 0 < threshold <= 100:
            raise serializers.ValidationError({"threshold": ["a percent: more than 0, at most 100"]})
        if kind in (AlertRule.Kind.INSTANCE_LEAK, AlertRule.Kind.GPU_HEADROOM) and threshold <= 0:
            raise serializers.ValidationError({"threshold": ["must be more than 0 (MiB per hour / MiB)"]})
        return attrs


class AlertSerializer(serializers.ModelSerializer):
    rule_name = serializers.CharField(source="rule.name", read_only=True)
    kind = serializers.CharField(source="rule.kind", read_only=True)
    severity = serializers.CharField(source="rule.severity", read_only=True)
    host = serializers.CharField(source="host.name", read_only=True, allow_null=True, default=None)

    class Meta:
        model = Alert
        fields = [
            "id", "rule", "rule_name", "kind", "severity", "subject", "host", "gpu", "instance_id", "status",
            "message", "value", "started_at", "fired_at", "resolved_at", "acknowledged_at", "acknowledged_by",
        ]  # fmt: skip
        read_only_fields = fields

from rest_framework import serializers

from gpus.models import Alert, AlertRule, Gpu, Host


class GpuProcessSerializer(serializers.Serializer):
    pid = serializers.IntegerField()
    name = serializers.CharField(allow_blank=True)
    used_mib = serializers.IntegerField(allow_null=True)
    owner = serializers.ChoiceField(choices=["instance", "foreign", "orphan"])
    instance_id = serializers.IntegerField(allow_null=True, required=False)


class HostStateFields(serializers.Serializer):
    """`host_state` and `host_down_reason` of a row whose `host` is loaded with it (select_related)."""

    host_state = serializers.ChoiceField(
        choices=["up", "down"], source="host.state", read_only=True,
        help_text="down: its worker was not heard from for LLAMACONTROLLER_HOST_TIMEOUT_SECONDS.",
    )  # fmt: skip
    host_down_reason = serializers.SerializerMethodField(
        help_text='e.g. "host gpu-box-2 not heard from since 10:42"; null while the host is up.'
    )

    def get_host_down_reason(self, row) -> str | None:
        return None if row.host.is_up else row.host.down_reason()


class HostSerializer(serializers.ModelSerializer):
    """A GPU host and the worker that holds its name. `state` is down when the worker was not heard from for
    LLAMACONTROLLER_HOST_TIMEOUT_SECONDS; `gpu_count` counts its current GPUs (not replaced ones)."""

    state = serializers.ChoiceField(choices=["up", "down"], read_only=True)
    down_reason = serializers.SerializerMethodField(
        help_text='e.g. "host gpu-box-2 not heard from since 10:42"; null while the host is up.'
    )
    gpu_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Host
        fields = [
            "id", "name", "state", "down_reason", "last_seen", "worker_hostname", "worker_pid",
            "worker_started_at", "address", "gpu_count", "telemetry_error", "llama_server_error",
        ]  # fmt: skip
        read_only_fields = fields

    def get_down_reason(self, host) -> str | None:
        return None if host.is_up else host.down_reason()


class GpuSerializer(HostStateFields, serializers.ModelSerializer):
    """A GPU's latest hardware status (whole-GPU memory, which counts every process on it), and its host's
    state."""

    host = serializers.CharField(source="host.name", read_only=True)
    memory_percent = serializers.FloatField(read_only=True, allow_null=True)
    processes = GpuProcessSerializer(many=True, read_only=True)

    class Meta:
        model = Gpu
        fields = [
            "id", "host", "index", "uuid", "name", "simulated", "state", "state_reason", "memory_used_mib",
            "memory_total_mib", "memory_percent", "utilization_pct", "temperature_c", "power_w", "processes", "updated_at", "host_state",
            "host_down_reason",
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

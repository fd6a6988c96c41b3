from datetime import datetime

from rest_framework import serializers
from rest_framework.utils import html

from gpus.api.serializers import HostStateFields
from models_app.keepalive import expires_at
from models_app.models import GpuInstance, HostModelFile, InstanceEvent, ModelConfig
from models_app.registry import RegistryError, check_cli_params, check_params_shape, model_file


class InstanceSerializer(HostStateFields, serializers.ModelSerializer):
    """The original LlamaController's GpuInstanceStatus fields, plus id, memory_percent, the memory figure's source and time,
    who owns the instance, and its host's state (an `unknown` instance's host is down: it keeps the figures
    it had then)."""

    gpu_id = serializers.CharField(source="gpu_ids", read_only=True, help_text='"0" or "0,1"')
    model_id = serializers.CharField(read_only=True)
    model_name = serializers.CharField(source="model.name", read_only=True)
    host = serializers.CharField(source="host.name", read_only=True)
    owner = serializers.SerializerMethodField()
    uptime_seconds = serializers.IntegerField(read_only=True, allow_null=True)
    memory_percent = serializers.FloatField(read_only=True, allow_null=True)
    expires_at = serializers.SerializerMethodField(
        help_text="When idle unload will take it if no request comes; null: it stays loaded."
    )

    class Meta:
        model = GpuInstance
        fields = [
            "id", "gpu_id", "port", "model_id", "model_name", "status", "loaded_at", "uptime_seconds", "pid",
            "memory_used_mb", "memory_total_mb", "memory_percent", "memory_source", "memory_updated_at",
            "owner", "host", "requested_at", "stopped_at", "exit_code", "error",
            "loaded_on_demand", "in_flight", "last_used_at", "expires_at",
            "memory_estimated_mb", "memory_measured_mb", "memory_estimate_error_pct", "memory_estimate",
            "host_state", "host_down_reason", "waiting_for",
        ]  # fmt: skip
        read_only_fields = fields

    def get_owner(self, instance) -> str | None:
        return instance.owner.get_username() if instance.owner else None

    def get_expires_at(self, instance) -> datetime | None:
        return expires_at(instance)


class FieldsAsSent:
    """A form's empty field is a value, refused as blank like JSON's "": DRF reads `gpu_id=` in form data as
    if it were left out, which for gpu_id would mean "choose for me". Only an omitted field is omitted."""

    def to_internal_value(self, data):
        if html.is_html_input(data):
            data = {key: data.get(key) for key in data}
        return super().to_internal_value(data)


class LoadSerializer(FieldsAsSent, serializers.Serializer):
    model_id = serializers.CharField(max_length=100)
    gpu_id = serializers.CharField(
        max_length=100,
        required=False,
        help_text='GPU indexes: "0" or "0,1". Omit gpu_id (or send "auto") to let the controller choose the '
        "host and GPUs: the placement that the load form suggests and the gateway uses, among the live hosts "
        "that have the model file (409 with the reasons when nothing fits).",
    )
    host = serializers.CharField(
        max_length=100,
        required=False,
        help_text="Host name; default: the only host with these GPU indexes. Without gpu_id: choose GPUs "
        "on this host only.",
    )
    force = serializers.BooleanField(default=False, help_text="Load even onto GPUs others occupy.")
    evict = serializers.BooleanField(
        default=False,
        help_text="Where the model does not fit, unload idle models (loaded on demand or with a keep-alive, "
        "no request in flight) to make room; you must be allowed to unload each (403 otherwise). Each "
        "eviction is an event (kind evicted, reason idle_lru).",
    )


class SwitchSerializer(serializers.Serializer):
    model_id = serializers.CharField(max_length=100)
    force = serializers.BooleanField(default=False, help_text="Load even onto GPUs others occupy.")


class UnloadGpusSerializer(FieldsAsSent, serializers.Serializer):
    gpu_id = serializers.CharField(max_length=100)
    host = serializers.CharField(max_length=100, required=False)


class HostModelFileSerializer(serializers.ModelSerializer):
    host = serializers.CharField(source="host.name", read_only=True)
    available = serializers.BooleanField(
        read_only=True,
        help_text="The file is there, inside the host's allowed folders, of the registered size.",
    )
    reason = serializers.CharField(
        read_only=True, help_text="Why the host cannot serve it (empty when it can)."
    )
    checked_at = serializers.DateTimeField(
        read_only=True, help_text="When the host's worker found this state (it checks often, writes changes)."
    )

    class Meta:
        model = HostModelFile
        fields = ["host", "available", "reason", "checked_at"]
        read_only_fields = fields


class ModelConfigSerializer(serializers.ModelSerializer):
    """The registry. The path must name a readable GGUF file inside the allowed folders; the header facts
    and file size are read from it when it is saved. `hosts`: what each host's worker reported about the
    file; loads and placement skip hosts that reported it unavailable (a host not listed has not checked)."""

    hosts = HostModelFileSerializer(source="host_files", many=True, read_only=True)

    class Meta:
        model = ModelConfig
        fields = [
            "id", "name", "path", "binary", "cli_params", "metadata", "gguf_metadata", "file_size_bytes",
            "restart_on_crash", "max_restarts", "on_demand", "keep_alive_seconds", "allow_anonymous",
            "exclusive",
            "created_at", "updated_at", "hosts",
        ]  # fmt: skip
        read_only_fields = ["gguf_metadata", "file_size_bytes", "created_at", "updated_at", "hosts"]

    def get_fields(self):
        fields = super().get_fields()
        if self.instance is not None:
            fields["id"].read_only = True  # the slug is referenced by instances and scripts
        return fields

    def validate_path(self, value):
        # The registry's one way to take a path (admin and import too): relative paths inside the model
        # folders, the facts read from the file and saved with it (create/update).
        try:
            self._file_values = model_file(value)
        except RegistryError as exc:
            raise serializers.ValidationError(str(exc)) from None
        return self._file_values["path"]

    def validate_cli_params(self, value):
        try:
            return check_params_shape(value)
        except RegistryError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def validate_binary(self, value):
        if value is not None and value.error:
            raise serializers.ValidationError(f"{value.name} is not usable: {value.error}")
        return value

    def validate(self, attrs):
        # The flags against the catalogue of the llama-server(s) the entry will run on.
        current = self.instance
        params = attrs.get("cli_params", current.cli_params if current else {})
        binary = attrs.get("binary", current.binary if current else None)
        path = attrs.get("path", current.path if current else None)
        try:
            check_cli_params(params, binary=binary, model_path=path)
        except RegistryError as exc:
            raise serializers.ValidationError({"cli_params": str(exc)}) from None
        return attrs

    def validate_metadata(self, value):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise serializers.ValidationError("metadata must be a JSON object")
        return value

    def _with_facts(self, validated_data):
        if "path" in validated_data:
            validated_data.update(self._file_values)
        return validated_data

    def create(self, validated_data):
        return super().create(self._with_facts(validated_data))

    def update(self, instance, validated_data):
        return super().update(instance, self._with_facts(validated_data))


class EventSerializer(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor_name", read_only=True)

    class Meta:
        model = InstanceEvent
        fields = ["id", "created_at", "kind", "reason", "actor", "actor_id", "instance", "detail"]
        read_only_fields = fields

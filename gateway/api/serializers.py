from rest_framework import serializers

from ..models import UsageRecord


class UsageRecordSerializer(serializers.ModelSerializer):
    user = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    token = serializers.CharField(source="token.hint", read_only=True, allow_null=True, default=None)
    tokens_per_second = serializers.FloatField(read_only=True, allow_null=True)

    class Meta:
        model = UsageRecord
        fields = [
            "id", "created_at", "user", "token", "model_id", "instance_id", "endpoint", "status", "error",
            "prompt_tokens", "completion_tokens", "time_to_first_token_ms", "duration_ms", "tokens_per_second",
            "client_disconnected", "throttled",
        ]  # fmt: skip
        read_only_fields = fields

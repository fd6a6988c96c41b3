from datetime import datetime, timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from rest_framework import serializers

from gpus.models import Host
from models_app.models import GpuInstance, ModelConfig
from utilities.query import unstorable

from ..models import Pin, Quota, Reservation
from ..reservations import holders_text

MAX_GPU_INDEX = 255
MAX_NOTICE_MINUTES = 7 * 24 * 60


class _StorableLookup:
    """A related field whose looked-up text the database can take: a NUL character or a lone surrogate is a 400
    here, where PostgreSQL's refusal of the lookup was a 500 (a multipart PATCH's fields pass no middleware)."""

    def to_internal_value(self, data):
        if isinstance(data, str) and (problem := unstorable(data)):
            raise serializers.ValidationError(problem)
        return super().to_internal_value(data)


class SlugLookupField(_StorableLookup, serializers.SlugRelatedField):
    pass


class KeyLookupField(_StorableLookup, serializers.PrimaryKeyRelatedField):
    pass


class PolicyRefusalSerializer(serializers.Serializer):
    """For the schema: a policy refusal or conflict (`reason`: which rule, e.g. quota_gpu_memory)."""

    detail = serializers.CharField()
    code = serializers.CharField()
    reason = serializers.CharField(required=False)


class QuotaSerializer(serializers.ModelSerializer):
    """A user's or a group's quota (exactly one of the two). Empty limits: no limit; empty allowed_models: any."""

    user = SlugLookupField(
        slug_field="username", queryset=get_user_model().objects.all(), required=False, allow_null=True
    )
    group = SlugLookupField(slug_field="name", queryset=Group.objects.all(), required=False, allow_null=True)
    allowed_models = KeyLookupField(many=True, queryset=ModelConfig.objects.all(), required=False)

    class Meta:
        model = Quota
        fields = ["id", "user", "group", "gpu_memory_mib", "gpus", "models_loaded", "allowed_models", "hard",
                  "note", "updated_at"]  # fmt: skip
        read_only_fields = ["id", "updated_at"]

    def validate(self, attrs):
        user = attrs.get("user", getattr(self.instance, "user", None))
        group = attrs.get("group", getattr(self.instance, "group", None))
        if (user is None) == (group is None):
            raise serializers.ValidationError("give either a user or a group, not both or neither")
        others = Quota.objects.exclude(pk=getattr(self.instance, "pk", None))
        if user is not None and others.filter(user=user).exists():
            raise serializers.ValidationError(
                {"user": [f"{user.get_username()} has a quota already: change it"]}
            )
        if group is not None and others.filter(group=group).exists():
            raise serializers.ValidationError(
                {"group": [f"group {group.name} has a quota already: change it"]}
            )
        return attrs


class QuotaUsageSerializer(serializers.Serializer):
    """`GET /api/v1/quota/`: the limits that apply (null: none), what is held, each instance's standing."""

    class Amounts(serializers.Serializer):
        gpu_memory_mib = serializers.IntegerField(allow_null=True)
        gpus = serializers.IntegerField(allow_null=True)
        models_loaded = serializers.IntegerField(allow_null=True)

    class Held(serializers.Serializer):
        id = serializers.IntegerField()
        model = serializers.CharField()
        gpus = serializers.ListField(child=serializers.IntegerField())
        claim_mib = serializers.IntegerField()
        standing = serializers.ChoiceField(choices=["guaranteed", "borrowed"])

    user = serializers.CharField()
    source = serializers.CharField(help_text='Whose quota applies: "your own quota", "group x\'s quota".')
    hard = serializers.BooleanField()
    limits = Amounts()
    allowed_models = serializers.ListField(child=serializers.CharField(), allow_null=True)
    used = Amounts()
    instances = Held(many=True)


class ReservationSerializer(serializers.ModelSerializer):
    """A window on GPUs of a host (`gpu_indices`) or an amount of its memory (`memory_mib`), for `users` and/or
    `groups`. Conflicts answer 409."""

    host = SlugLookupField(slug_field="name", queryset=Host.objects.all())
    gpu_indices = serializers.ListField(
        child=serializers.IntegerField(min_value=0, max_value=MAX_GPU_INDEX), required=False, max_length=64
    )
    memory_mib = serializers.IntegerField(min_value=1, max_value=2**31 - 1, required=False, allow_null=True)
    users = SlugLookupField(
        slug_field="username", queryset=get_user_model().objects.all(), many=True, required=False
    )
    groups = SlugLookupField(slug_field="name", queryset=Group.objects.all(), many=True, required=False)
    notice_minutes = serializers.IntegerField(min_value=0, max_value=MAX_NOTICE_MINUTES, default=30)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    holders = serializers.SerializerMethodField()
    fences_from = serializers.SerializerMethodField(help_text="From when others may not load there.")

    class Meta:
        model = Reservation
        fields = ["id", "host", "gpu_indices", "memory_mib", "start", "end", "users", "groups", "purpose",
                  "notice_minutes", "holders", "fences_from", "created_by", "created_at"]  # fmt: skip
        read_only_fields = ["id", "created_by", "created_at"]

    def get_holders(self, reservation) -> str:
        return holders_text(reservation)

    def get_fences_from(self, reservation) -> datetime:
        return reservation.start - timedelta(minutes=reservation.notice_minutes)

    def validate(self, attrs):
        if attrs["end"] <= attrs["start"]:
            raise serializers.ValidationError({"end": ["must come after start"]})
        if bool(attrs.get("gpu_indices")) == bool(attrs.get("memory_mib")):
            raise serializers.ValidationError("give either gpu_indices or memory_mib, not both or neither")
        if not attrs.get("users") and not attrs.get("groups"):
            raise serializers.ValidationError("name at least one holder: users or groups")
        return attrs


class PinSerializer(serializers.ModelSerializer):
    """A pinned instance: never unloaded automatically."""

    instance = KeyLookupField(queryset=GpuInstance.objects.all())
    model = serializers.CharField(source="instance.model_id", read_only=True)
    pinned_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    active = serializers.BooleanField(source="instance.is_active", read_only=True)

    class Meta:
        model = Pin
        fields = ["id", "instance", "model", "active", "reason", "pinned_by", "pinned_at"]
        read_only_fields = ["id", "pinned_at"]

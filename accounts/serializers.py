from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.db import transaction
from django.utils import timezone
from rest_framework import serializers
from rest_framework.exceptions import Throttled

from . import roles, throttle, users
from .models import ApiToken

User = get_user_model()


class ApiTokenSerializer(serializers.ModelSerializer):
    usable = serializers.BooleanField(source="is_usable", read_only=True)

    class Meta:
        model = ApiToken
        fields = ["id", "name", "hint", "created_at", "expires_at", "last_used_at", "revoked_at", "usable"]
        read_only_fields = ["hint", "created_at", "last_used_at", "revoked_at"]

    def validate_expires_at(self, value):
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("must be in the future")
        return value


class IssuedTokenSerializer(ApiTokenSerializer):
    """The answer to a create: the only time the token itself is shown."""

    token = serializers.CharField(read_only=True)

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "token"]


class UserSerializer(serializers.ModelSerializer):
    # Written here, read from the groups (see to_representation); null means no role at all. Not write-only:
    # the schema must show it in responses too (the schemathesis run checks responses against the schema).
    role = serializers.ChoiceField(choices=[*roles.ROLES], allow_null=True, required=False)
    password = serializers.CharField(write_only=True, required=False, style={"input_type": "password"})
    current_password = serializers.CharField(
        write_only=True,
        required=False,
        style={"input_type": "password"},
        help_text="Your current password: required to change your own password.",
    )

    class Meta:
        model = User
        fields = ["id", "username", "email", "first_name", "last_name", "is_active", "is_staff", "role",
                  "password", "current_password", "last_login", "date_joined"]  # fmt: skip
        read_only_fields = ["is_staff", "last_login", "date_joined"]

    def to_representation(self, instance):
        data = super().to_representation(instance)
        data["role"] = roles.role_of(instance) if instance.is_active else None
        return data

    def validate(self, attrs):
        request = self.context.get("request")
        if self.instance is not None and request is not None and self.instance.pk == request.user.pk:
            # An admin who locks themselves out may leave nobody able to administer the team.
            if attrs.get("is_active") is False:
                raise serializers.ValidationError({"is_active": ["you cannot deactivate yourself"]})
            if "role" in attrs and attrs["role"] != roles.role_of(self.instance):
                raise serializers.ValidationError({"role": ["you cannot change your own role"]})
        password = attrs.get("password")
        current = attrs.pop("current_password", None)
        own = self.instance is not None and request is not None and self.instance.pk == request.user.pk
        if password and own:
            # A stolen session (or an unattended screen) must not be enough to take the account over, nor a
            # way to guess the password: wrong ones are counted like logins (429 while locked).
            if not current:
                raise serializers.ValidationError(
                    {"current_password": ["required to change your own password"]}
                )
            try:
                right = throttle.check_current_password(self.instance, current, request, "API")
            except throttle.PasswordCheckLocked as exc:
                raise Throttled(wait=exc.seconds, detail=exc.message) from None
            if not right:
                raise serializers.ValidationError({"current_password": ["wrong password"]})
        if self.instance is None and not password:
            raise serializers.ValidationError({"password": ["required when creating a user"]})
        if password:
            candidate = self.instance or User(
                username=attrs.get("username", ""), email=attrs.get("email", "")
            )
            try:
                validate_password(password, candidate)
            except Exception as exc:  # django's ValidationError: hand its messages to DRF
                raise serializers.ValidationError(
                    {"password": list(getattr(exc, "messages", [str(exc)]))}
                ) from None
        return attrs

    def _actor(self):
        request = self.context.get("request")
        return request.user if request is not None else None

    @transaction.atomic
    def create(self, validated_data):
        role = validated_data.pop("role", roles.VIEWER)
        password = validated_data.pop("password")
        user = User(**validated_data)
        user.set_password(password)
        user.save()
        users.set_role(user, role)
        users.record_created(user, actor=self._actor())
        return user

    @transaction.atomic
    def update(self, instance, validated_data):
        before = users.snapshot(instance)
        role_given = "role" in validated_data
        role = validated_data.pop("role", None)
        password = validated_data.pop("password", None)
        for name, value in validated_data.items():
            setattr(instance, name, value)
        if password:
            instance.set_password(password)
        instance.save()
        if role_given:
            users.set_role(instance, role)
        users.record_change(instance, before, actor=self._actor())
        return instance

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.auth.password_validation import validate_password
from django.db import transaction
from django.utils import timezone
from rest_framework import serializers

from . import roles
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


def set_role(user, role: str | None) -> None:
    """Put `user` in exactly one role group. Admins are made staff and superuser: the admin role is
    "everything" (registry, users, other people's instances, the Django admin), which is what superuser
    means, and it cannot drift out of date as models gain permissions the way a copied permission list
    would. Leaving the admin role takes both away again."""
    groups = Group.objects.filter(name__in=roles.ROLES)
    user.groups.remove(*groups)
    if role:
        user.groups.add(Group.objects.get(name=role))
    is_admin = role == roles.ADMIN
    if user.is_staff != is_admin or user.is_superuser != is_admin:
        user.is_staff = user.is_superuser = is_admin
        user.save(update_fields=["is_staff", "is_superuser"])
    user.__dict__.pop("_llamacontroller_role", None)


class UserSerializer(serializers.ModelSerializer):
    # Written here, read from the groups (see to_representation); null means no role at all.
    role = serializers.ChoiceField(choices=[*roles.ROLES], allow_null=True, required=False, write_only=True)
    password = serializers.CharField(write_only=True, required=False, style={"input_type": "password"})

    class Meta:
        model = User
        fields = ["id", "username", "email", "first_name", "last_name", "is_active", "is_staff", "role",
                  "password", "last_login", "date_joined"]  # fmt: skip
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

    @transaction.atomic
    def create(self, validated_data):
        role = validated_data.pop("role", roles.VIEWER)
        password = validated_data.pop("password")
        user = User(**validated_data)
        user.set_password(password)
        user.save()
        set_role(user, role)
        return user

    @transaction.atomic
    def update(self, instance, validated_data):
        role_given = "role" in validated_data
        role = validated_data.pop("role", None)
        password = validated_data.pop("password", None)
        for name, value in validated_data.items():
            setattr(instance, name, value)
        if password:
            instance.set_password(password)
        instance.save()
        if role_given:
            set_role(instance, role)
        return instance

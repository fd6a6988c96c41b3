from django.contrib.auth import get_user_model, update_session_auth_hash
from django.db import transaction
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.response import Response

from . import tokens, users
from .models import ApiToken
from .permissions import IsAdminRole, IsViewer, PersonPresent
from .serializers import ApiTokenSerializer, IssuedTokenSerializer, UserSerializer


class ApiTokenViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Your own API tokens. Create answers the token once and needs a logged-in session (a token cannot
    mint tokens); DELETE revokes it (the row stays for the audit)."""

    serializer_class = ApiTokenSerializer
    permission_classes = [IsViewer]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return ApiToken.objects.none()
        return ApiToken.objects.filter(user=self.request.user)

    @extend_schema(responses={201: IssuedTokenSerializer})
    def create(self, request, *args, **kwargs):
        if request.auth is not None:
            # A token that mints tokens outlives its own revocation: issuing needs the person.
            raise PermissionDenied(
                "Creating API tokens needs a logged-in session; a token cannot create tokens."
            )
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        token, raw = tokens.issue(user=request.user, **serializer.validated_data)
        token.token = raw
        return Response(IssuedTokenSerializer(token).data, status=status.HTTP_201_CREATED)

    def destroy(self, request, *args, **kwargs):
        tokens.revoke(token=self.get_object(), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class UserViewSet(viewsets.ModelViewSet):
    """Users and their role (admins only). DELETE deactivates: events and instances keep their owner.
    Writes need a logged-in session (PersonPresent); changing your own password needs the current one."""

    serializer_class = UserSerializer
    permission_classes = [IsAdminRole, PersonPresent]
    queryset = get_user_model().objects.prefetch_related("groups").order_by("username")

    def perform_destroy(self, instance):
        if instance.pk == self.request.user.pk:
            raise ValidationError({"detail": "you cannot deactivate yourself"})
        if not instance.is_active:
            return
        with transaction.atomic():
            before = users.snapshot(instance)
            instance.is_active = False
            instance.save(update_fields=["is_active"])
            users.record_change(instance, before, actor=self.request.user)

    def perform_update(self, serializer):
        user = serializer.save()
        if user.pk == self.request.user.pk:
            # A new password of one's own would otherwise end this very session.
            update_session_auth_hash(self.request, user)

    @extend_schema(responses=UserSerializer)
    @action(detail=False, methods=["get"], permission_classes=[IsViewer])
    def me(self, request):
        """Who am I, and with which role (any role may ask)."""
        return Response(UserSerializer(request.user).data)

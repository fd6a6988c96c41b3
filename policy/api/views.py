from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Q
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts import roles
from accounts.permissions import IsViewer, ReadViewerWriteAdmin
from models_app.api.views import parse_moment

from .. import pins, quotas, reservations
from ..models import Pin, Quota, Reservation
from .serializers import (
    PinSerializer,
    PolicyRefusalSerializer,
    QuotaSerializer,
    QuotaUsageSerializer,
    ReservationSerializer,
)

MOMENT_HELP = "must be an ISO 8601 date and time within years 1 to 9999, e.g. 2025-01-31T12:00:00Z"


def conflict(description: str) -> dict:
    return {409: OpenApiResponse(PolicyRefusalSerializer, description=description)}


def refused(detail: str, code: str, answer: int) -> Response:
    return Response({"detail": detail, "code": code}, status=answer)


class QuotaViewSet(viewsets.ModelViewSet):
    """Quotas of users and groups (admins change them; others see the ones that apply to them). Changing a
    quota never unloads anything; each change is an audit event."""

    serializer_class = QuotaSerializer
    permission_classes = [ReadViewerWriteAdmin]

    def get_queryset(self):
        queryset = Quota.objects.select_related("user", "group").prefetch_related("allowed_models")
        user = self.request.user
        if getattr(self, "swagger_fake_view", False) or roles.can_administer(user):
            return queryset
        return queryset.filter(Q(user=user) | Q(group__user=user)).distinct()

    def perform_create(self, serializer):
        with transaction.atomic():
            quota = serializer.save()
            quotas.record_saved(quota, self.request.user, before=None)

    def perform_update(self, serializer):
        before = quotas.describe(serializer.instance)
        with transaction.atomic():
            quota = serializer.save()
            quotas.record_saved(quota, self.request.user, before=before)

    def perform_destroy(self, instance):
        quotas.delete(instance, self.request.user)


class QuotaUsageView(APIView):
    """Your use against your quota: the limits that apply, what you hold, and whether each of your instances is
    guaranteed or borrowed. Admins may ask about anyone with `?user=<username>`."""

    permission_classes = [IsViewer]

    @extend_schema(
        parameters=[OpenApiParameter("user", str, description="A username (admins only).")],
        responses=QuotaUsageSerializer,
    )
    def get(self, request):
        user = request.user
        name = request.query_params.get("user")
        if name and name != user.get_username():
            if not roles.can_administer(user):
                raise PermissionDenied("Only admins may see another user's quota.")
            user = get_user_model().objects.filter(username=name).first()
            if user is None:
                raise ValidationError({"user": [f"no user {name!r}"]})
        return Response(QuotaUsageSerializer(quotas.usage(user)).data)


@extend_schema(
    parameters=[
        OpenApiParameter("host", str, description="Host name."),
        OpenApiParameter("since", OpenApiTypes.DATETIME, description="Windows that end after this."),
        OpenApiParameter("until", OpenApiTypes.DATETIME, description="Windows that start before this."),
    ]
)
class ReservationViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Reservations: a window on GPUs of a host (or an amount of its memory) for users and groups, with a
    purpose. Everyone sees them (the week view: `?since=…&until=…` gives the windows overlapping that span);
    admins create (409 on a conflict: overlapping a shared GPU, or more memory than the host has) and delete."""

    serializer_class = ReservationSerializer
    permission_classes = [ReadViewerWriteAdmin]

    def get_queryset(self):
        queryset = (
            Reservation.objects.select_related("host", "created_by")
            .prefetch_related("users", "groups")
            .order_by("start", "pk")
        )
        params = self.request.query_params
        if params.get("host"):
            queryset = queryset.filter(host__name=params["host"])
        errors = {}
        for name, lookup in (("since", "end__gt"), ("until", "start__lt")):
            if params.get(name):
                moment = parse_moment(params[name])
                if moment is None:
                    errors[name] = [MOMENT_HELP]
                else:
                    queryset = queryset.filter(**{lookup: moment})
        if errors:
            raise ValidationError(errors)
        return queryset

    @extend_schema(responses={201: ReservationSerializer, **conflict("Refused: it conflicts with another.")})
    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            made = reservations.create(
                host=data["host"], start=data["start"], end=data["end"], purpose=data["purpose"],
                actor=request.user, gpu_indices=data.get("gpu_indices") or (), memory_mib=data.get("memory_mib"),
                users=data.get("users", []), groups=data.get("groups", []), notice_minutes=data["notice_minutes"],
            )  # fmt: skip
        except reservations.ReservationConflict as exc:
            return refused(f"reservation_conflict: {exc}", "reservation_conflict", status.HTTP_409_CONFLICT)
        except ValueError as exc:
            raise ValidationError({"detail": str(exc)}) from None
        return Response(self.get_serializer(made).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance):
        reservations.delete(instance, self.request.user)


class PinViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Pinned instances: never unloaded automatically (no idle unload, no eviction); a load that only their room
    would serve is refused (pinned_no_room). Everyone sees them; admins pin (POST `{"instance": id}`; 409 when
    already pinned, 400 when not loaded) and unpin (DELETE)."""

    serializer_class = PinSerializer
    permission_classes = [ReadViewerWriteAdmin]
    queryset = Pin.objects.select_related("instance", "pinned_by").order_by("-pinned_at", "-id")

    @extend_schema(responses={201: PinSerializer, **conflict("Refused: the instance is already pinned.")})
    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        instance = serializer.validated_data["instance"]
        try:
            made = pins.pin(instance, actor=request.user, reason=serializer.validated_data.get("reason", ""))
        except pins.PinRefused as exc:
            return refused(exc.message, exc.code, exc.status)
        return Response(self.get_serializer(made).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance):
        pins.unpin(instance, actor=self.request.user)

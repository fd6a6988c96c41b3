"""The usage page: requests, tokens and speed per user and per model over a time window."""

from datetime import timedelta

from django.contrib.auth.decorators import login_required
from django.shortcuts import render
from django.utils import timezone

from accounts.roles import can_administer

from .usage import summary, visible_to

WINDOWS = {"1d": timedelta(days=1), "7d": timedelta(days=7), "30d": timedelta(days=30)}


@login_required
def usage_page(request):
    window = request.GET.get("window") if request.GET.get("window") in WINDOWS else "7d"
    records = visible_to(request.user).filter(created_at__gte=timezone.now() - WINDOWS[window])
    context = {
        "window": window,
        "windows": list(WINDOWS),
        "everyone": can_administer(request.user),
        "by_user": summary(records, "user__username"),
        "by_model": summary(records, "model_id"),
        "recent": records.select_related("user")[:50],
    }
    return render(request, "gateway/usage.html", context)

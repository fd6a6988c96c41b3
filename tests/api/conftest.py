import pytest
from django.utils import timezone

from accounts.models import ApiToken
from models_app.models import ModelConfig


@pytest.fixture
def second_model(tiny_model):
    """Another registry entry on the same file, to switch to."""
    return ModelConfig.objects.create(
        id="tiny2", name="Tiny two", path=tiny_model.path, cli_params={"c": 128}
    )


@pytest.fixture
def bearer(users):
    """`bearer(user, **fields)` -> the Authorization header value of a new token."""

    def make(user, **fields):
        token, raw = ApiToken.issue(user, "test token")
        if fields:
            ApiToken.objects.filter(pk=token.pk).update(**fields)
        return f"Bearer {raw}"

    return make


@pytest.fixture
def past():
    return timezone.now() - timezone.timedelta(minutes=1)

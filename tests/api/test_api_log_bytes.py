"""The instance log's `bytes` parameter: ASCII whole numbers in range, anything else a 400 naming it."""

import pytest
from rest_framework.test import APIClient

from tests.api.factories import make_gpus, make_instance

pytestmark = pytest.mark.django_db


@pytest.fixture
def instance(tiny_model, users):
    return make_instance(make_gpus(1), tiny_model, owner=users["admin"])


@pytest.fixture
def admin_api(users):
    client = APIClient()
    client.force_authenticate(users["admin"])
    return client


@pytest.mark.parametrize("value", ["١٠٠", "１００", "²", "-5", "0", "1048577", "abc", "1e3", ""])
def test_a_bytes_value_that_is_not_an_ascii_whole_number_in_range_is_400(admin_api, instance, value):
    response = admin_api.get(f"/api/v1/instances/{instance.pk}/log/", {"bytes": value})
    assert response.status_code == 400, response.content
    assert "bytes" in response.json()


@pytest.mark.parametrize("value", ["1", "100", "1048576"])
def test_a_bytes_value_in_range_is_read(admin_api, instance, value):
    response = admin_api.get(f"/api/v1/instances/{instance.pk}/log/", {"bytes": value})
    assert response.status_code == 200, response.content

"""One refusal type (models_app.errors.Refused), answered once per edge: the REST API with the code's status
and `{"detail", "code", <field>}`, the gateway in its dialect (gateway/access.py), as they always were."""

import pytest
from rest_framework.test import APIClient

from gateway import access
from models_app.errors import STATUS, Refused


@pytest.mark.parametrize(
    "code, status",
    # The REST API's statuses before the refusal types were one (api/errors.py's STATUS_BY_CODE).
    [("invalid", 400), ("forbidden", 403), ("not_found", 404), ("busy", 409), ("unavailable", 503)],
)
def test_each_code_keeps_its_rest_status(code, status):
    assert Refused("no", code=code).status == STATUS[code] == status


def test_an_unknown_code_is_a_bug_not_a_400():
    with pytest.raises(ValueError, match="unknown refusal code 'bussy'"):
        Refused("no", code="bussy")


@pytest.mark.parametrize(
    "code, status, word",
    # What the gateway answered for NotAllowed (401/403), NoCapacity, LoadFailed and Timeout before.
    [
        ("unauthorized", 401, "unauthorized"),
        ("forbidden", 403, "forbidden"),
        ("busy", 503, "nocapacity"),
        ("load_failed", 503, "loadfailed"),
        ("unavailable", 503, "loadfailed"),
        ("timeout", 503, "timeout"),
    ],
)
def test_the_gateway_answers_each_code_as_before(code, status, word):
    error = access._refusal(Refused("the reason", code=code, retry_after=7))
    assert (error.status, error.code, error.message, error.retry_after) == (status, word, "the reason", 7)


def test_the_rest_api_answers_with_the_status_and_the_field(users, fake_gpus, tiny_model):
    client = APIClient()
    client.force_login(users["operator"])
    response = client.post("/api/v1/instances/", {"model_id": "tiny", "gpu_id": "0,0"}, format="json")
    assert response.status_code == 400
    assert response.json() == {
        "detail": "GPU 0 is listed twice in '0,0'",
        "code": "invalid",
        "gpu_id": ["GPU 0 is listed twice in '0,0'"],
    }

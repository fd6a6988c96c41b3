"""The statements of a load request (issue 22): `POST /api/v1/instances/` runs its checks, admission and policy
in a fixed number of SQL statements, whatever the GPUs already hold; a change that adds one shows here."""

from django.db import connection
from django.test.utils import CaptureQueriesContext

from models_app import binaries
from models_app.models import GpuInstance

# Session, user and groups (3); the model and every host's report on its file; the GPUs, then their host; the
# host's default binary and the model's past loads (the estimate); in the transaction
# (a savepoint here, BEGIN outside tests): the GPU rows locked, their claims (the active links: GPUs that
# hold something add their instances and models), the reservations, the quota;
# the instance, its GPU link and its event; the release; the instance answered. The binary's row comes without its
# flag catalogue, parsed once per process (binaries.parsed_catalogue): a process's first load reads it once more.
LOAD_STATEMENTS = 19


def _load(client, gpu: str):
    with CaptureQueriesContext(connection) as captured:
        response = client.post("/api/v1/instances/", {"model_id": "tiny", "gpu_id": gpu}, format="json")
    assert response.status_code == 202, response.content
    return [q["sql"] for q in captured.captured_queries]


def test_a_load_request_runs_a_fixed_number_of_statements(client_for, live, tiny_model, sent):
    client = client_for("operator")
    for binary in binaries.without_catalogue().filter(is_default=True):
        binaries.parsed_catalogue(binary)  # as after this process's first load
    first = _load(client, "1")
    second = _load(client, "0")  # the operator now holds an instance: still the same count
    assert len(first) == len(second) == LOAD_STATEMENTS, "\n".join(second)
    assert GpuInstance.objects.filter(status="pending").count() == 2

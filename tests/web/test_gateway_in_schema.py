"""The gateway's routes are in the API schema and its docs page, in their own tags, in both shapes (issue 21)."""

from gateway.openapi import OLLAMA, OPENAI


def test_gateway_routes_are_documented(client, users):
    client.force_login(users["viewer"])
    schema = client.get("/api/schema/", {"format": "json"}).json()
    paths = schema["paths"]
    for path in (
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/tags",
        "/api/ps",
        "/api/show",
        "/api/version",
    ):
        assert OLLAMA in next(iter(paths[path].values()))["tags"], path
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"):
        assert OPENAI in next(iter(paths[path].values()))["tags"], path
    chat = paths["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["required"] == ["model", "messages"]
    assert {"bearerAuth": []} in chat["security"] and "503" in chat["responses"]
    assert {t["name"] for t in schema["tags"]} >= {OLLAMA, OPENAI}
    operation_ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))


def test_schema_still_validates(client, users):
    """drf-spectacular's own check of the whole document (OpenAPI 3 JSON schema)."""
    from drf_spectacular.validation import validate_schema

    client.force_login(users["viewer"])
    validate_schema(client.get("/api/schema/", {"format": "json"}).json())

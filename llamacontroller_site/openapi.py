"""The API schema states the errors the API answers, not only its successes, so that a client (and the
schemathesis run in tests/api/test_schemathesis.py) can tell a documented refusal from a surprise."""

ERROR_SCHEMA = {
    "type": "object",
    "description": '`detail` says what went wrong; a refused input names its field: `{"gpu_id": ["..."]}`.',
    "properties": {
        "detail": {"type": "string"},
        "code": {"type": "string", "description": "invalid, forbidden, not_found, busy or unavailable"},
    },
    "additionalProperties": True,
}
ERROR_REF = {"$ref": "#/components/schemas/Error"}


def error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


def document_errors(result, generator, request, public):
    """drf-spectacular postprocessing hook: every operation may answer 401 and 403; one with a body or
    query parameters 400; one with path parameters 404. Views document their own 409 and 503."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            places = {parameter["in"] for parameter in operation.get("parameters", [])}
            errors = {"401": "Not logged in, or a bad API token.", "403": "Your role may not do this."}
            if "requestBody" in operation or "query" in places:
                errors["400"] = "Bad input; the body names each bad field."
            if "path" in places:
                errors["404"] = "No such object."
            responses = operation.setdefault("responses", {})
            for status, description in errors.items():
                responses.setdefault(status, error_response(description))
    return result

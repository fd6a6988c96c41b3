"""A DRF filter backend, the default for every API view: query parameters that the database cannot take
answer 400 naming the parameter. PostgreSQL refuses text with NUL characters (`?user=a%00b` was a 500 there,
while SQLite answered 200); request bodies are already covered by DRF's CharField validator."""

from rest_framework.exceptions import ValidationError


class RefuseNulCharacters:
    def filter_queryset(self, request, queryset, view):
        bad = sorted({name for name, value in request.query_params.items() if "\x00" in name + value})
        if bad:
            raise ValidationError({name: ["must not contain NUL characters"] for name in bad})
        return queryset

    def get_schema_operation_parameters(self, view):
        return []

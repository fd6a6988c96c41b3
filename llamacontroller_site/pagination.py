"""The API's one pagination: `?limit=` and `?offset=` as DRF's LimitOffsetPagination, but strict. DRF's own
ignores a bad `limit` and passes any size on to the database (a 23-digit limit was a 500); here a limit or
offset that is not a whole number in range answers 400 naming the parameter, and the schema states the
range."""

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination

from utilities.query import BadParameter, whole_number


class StrictLimitOffsetPagination(LimitOffsetPagination):
    max_limit = 1000
    max_offset = 2**31 - 1

    def get_limit(self, request):
        return self._whole_number(request, self.limit_query_param, 1, self.max_limit, self.default_limit)

    def get_offset(self, request):
        return self._whole_number(request, self.offset_query_param, 0, self.max_offset, 0)

    @staticmethod
    def _whole_number(request, name: str, low: int, high: int, default: int) -> int:
        text = request.query_params.get(name, "")
        if text == "":  # absent, or empty as an HTML form sends it
            return default
        try:
            return whole_number(text, name, low, high)
        except BadParameter as exc:
            raise ValidationError({name: [exc.message]}) from None

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        bounds = {self.limit_query_param: (1, self.max_limit), self.offset_query_param: (0, self.max_offset)}
        for parameter in parameters:
            low, high = bounds[parameter["name"]]
            parameter["schema"].update(minimum=low, maximum=high)
        return parameters

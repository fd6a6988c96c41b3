from django.core.paginator import Paginator
from django.db import connection
from django.utils.functional import cached_property


class EstimatedCountPaginator(Paginator):
    """Pages a huge table without COUNT(*): PostgreSQL's planner estimate for the unfiltered table,
    else a count capped at a bound that is cheap to reach."""

    CAP = 10_000

    @cached_property
    def count(self):
        query = self.object_list.query
        if connection.vendor == "postgresql" and not query.where:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT reltuples::bigint FROM pg_class WHERE relname = %s", [query.model._meta.db_table]
                )
                row = cursor.fetchone()
            if row and row[0] > self.CAP:
                return int(row[0])
        return self.object_list[: self.CAP + 1].count()

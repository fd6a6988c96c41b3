"""Plain SQL for the statements where the ORM's own work costs more than the database's, each built from the
model's fields (columns quoted, values prepared by the fields as the ORM prepares them).

- `update_rows`: Django's `bulk_update` builds a CASE WHEN expression per field and row; for a refresh of 64
  GPUs that cost far more Python time than the database work itself. The same UPDATE run once per row through
  `executemany` is one round of work for the driver (psycopg pipelines it, SQLite runs it in C).
- `insert` and `update`: one row written, or rows matching a few fields changed, by statements built once per
  database vendor and shape. They are for the hot paths: an instance's status transitions and their events
  (every load and unload goes through four), and a gateway request's usage record. Met cold, as a load or an
  unload meets them, the ORM took 1.6 ms to build and run a transition's UPDATE and INSERT that run in 0.6 ms
  as plain SQL (two-core VM, after a 0.25 s pause, medians of 30); building the SQL was most of it."""

from django.db import connection
from django.db.models import Expression, Model


def update_rows(objects: list, fields: list[str]) -> None:
    """UPDATE table SET field = … WHERE pk = … for each object, values prepared by the fields themselves."""
    if not objects:
        return
    meta = objects[0]._meta
    model_fields = [meta.get_field(name) for name in fields]
    quote = connection.ops.quote_name
    assignments = ", ".join(f"{quote(f.column)} = %s" for f in model_fields)
    sql = f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {quote(meta.pk.column)} = %s"
    rows = [
        [f.get_db_prep_save(getattr(obj, f.attname), connection) for f in model_fields] + [obj.pk]
        for obj in objects
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, rows)


def insert(model: type[Model], values: dict) -> None:
    """INSERT one row of `model`: `values` by field attname (`instance_id`, not `instance`), every field but
    an automatic primary key given (no defaults are filled in here)."""
    key = ("insert", connection.vendor, model, tuple(values))
    built = _statements.get(key)
    if built is None:
        fields = [field for field in model._meta.concrete_fields if field.attname in values]
        unknown = set(values) - {field.attname for field in fields}
        if unknown:
            raise TypeError(f"{model.__name__} has no field {', '.join(sorted(unknown))}")
        missing = [
            f.attname for f in model._meta.concrete_fields if f.attname not in values and not f.primary_key
        ]
        if missing:
            raise TypeError(f"{model.__name__}: no value for {', '.join(missing)}")
        quote = connection.ops.quote_name
        sql = "INSERT INTO {} ({}) VALUES ({})".format(
            quote(model._meta.db_table),
            ", ".join(quote(field.column) for field in fields),
            ", ".join(["%s"] * len(fields)),
        )
        built = _statements[key] = (sql, fields)
    sql, fields = built
    with connection.cursor() as cursor:
        cursor.execute(
            sql, [field.get_db_prep_save(_plain(values[field.attname]), connection) for field in fields]
        )


def update(model: type[Model], values: dict, where: dict) -> int:
    """UPDATE `model`'s rows matching `where` (field=value, or field__in=a non-empty list; `pk` for the
    primary key) with `values` (by field name or attname): the number of rows changed. Plain values only, no
    expressions (an F() or a model instance is refused: the ORM's `update` is for those)."""
    meta = model._meta
    lookups = [(name.removesuffix("__in"), name.endswith("__in"), value) for name, value in where.items()]
    key = (
        "update",
        connection.vendor,
        model,
        tuple(values),
        tuple((n, i, len(v) if i else 0) for n, i, v in lookups),
    )
    built = _statements.get(key)
    if built is None:
        quote = connection.ops.quote_name
        set_fields = [meta.get_field(name) for name in values]
        where_fields = [
            (meta.pk if name == "pk" else meta.get_field(name), many, value) for name, many, value in lookups
        ]
        conditions = []
        for field, many, value in where_fields:
            column = quote(field.column)
            if many:
                if not value:
                    raise ValueError(f"{field.name}__in: an empty list matches nothing")
                conditions.append(f"{column} IN ({', '.join(['%s'] * len(value))})")
            else:
                conditions.append(f"{column} = %s")
        sql = "UPDATE {} SET {} WHERE {}".format(
            quote(meta.db_table),
            ", ".join(f"{quote(field.column)} = %s" for field in set_fields),
            " AND ".join(conditions),
        )
        built = _statements[key] = (sql, set_fields, [field for field, _, _ in where_fields])
    sql, set_fields, where_fields = built
    params = [
        field.get_db_prep_save(_plain(values[name]), connection)
        for field, name in zip(set_fields, values, strict=True)
    ]
    for field, (_, many, value) in zip(where_fields, lookups, strict=True):
        for item in value if many else [value]:
            params.append(field.get_db_prep_value(_plain(item), connection))
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def _plain(value):
    if isinstance(value, Expression | Model):
        raise TypeError(f"a plain value is needed here, not {value!r}: use the ORM for it")
    return value


_statements: dict[tuple, tuple] = {}  # one per model, vendor and shape: a few dozen in all

"""Plain SQL for the statements where the ORM's own work costs more than the database's, each built from the
model's fields (columns quoted, values prepared by the fields as the ORM prepares them).

- `update_rows`: Django's `bulk_update` builds a CASE WHEN expression per field and row; for a refresh of 64
  GPUs that cost far more Python time than the database work itself. The same UPDATE run once per row through
  `executemany` is one round of work for the driver (psycopg pipelines it, SQLite runs it in C).
- `insert` and `update`: one row written, or rows matching a few fields changed, by statements built once per
  database vendor and shape. They are for the hot paths: an instance's status transitions and their events
  (every load and unload goes through four), and a gateway request's usage record. Met cold, as a load or an
  unload meets them, the ORM took 1.6 ms to build and run a transition's UPDATE and INSERT that run in 0.6 ms
  as plain SQL (two-core VM, after a 0.25 s pause, medians of 30); building the SQL was most of it.
- `select`, `select_one`, `read` and `create`: the reads and inserts on a load request's way (the model, its
  file reports, the GPUs and their holders, the binary, the calibration, the reservations; the pending
  instance and its GPU links) and the worker's before the launch. Each ORM statement there cost 0.5-1.8 ms
  met cold, most of it building the SQL; a load request made thirteen. `select` reads one table,
  `select_one` a row with its foreign keys' rows, `read` a join written as a template.
- `execute`: how the writes above (`insert`, `update`, `create`, and the gateway's in-flight counts) run: on
  the driver's own connection, not through Django's cursor (see there)."""

import re
import string
from datetime import UTC, datetime

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.models import Model
from django.db.models.expressions import Combinable
from django.db.transaction import TransactionManagementError
from django.utils import timezone


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


def now_value(db=None):
    """timezone.now() as a DateTimeField's value for the connection `db` (default: this thread's), what
    `connection.ops.adapt_datetimefield_value(timezone.now())` gives: on SQLite with USE_TZ and the database
    in UTC (Django's default there), the naive UTC time as text, written here without that method's general
    checks (55 us of CPU less a call, met cold: twice per gateway request)."""
    db = db or connections[DEFAULT_DB_ALIAS]
    if _utc_text(db):
        return str(datetime.now(UTC).replace(tzinfo=None))
    return db.ops.adapt_datetimefield_value(timezone.now())


def _utc_text(db) -> bool:
    """Whether `db` stores a DateTimeField's value as the naive UTC time in text (SQLite, USE_TZ, UTC)."""
    return db.vendor == "sqlite" and settings.USE_TZ and db.timezone_name == "UTC"


_SQLITE_PLACEHOLDER = re.compile(r"(?<!%)%s")  # as Django's SQLite cursor rewrites them
_native: dict[tuple[str, str], str] = {}  # (vendor, SQL with %s) -> the driver's SQL


def execute(sql: str, params: list, *, returning: bool = False, db=None):
    """One write, `sql` with %s placeholders as Django's cursor takes it, on this thread's connection: the
    number of rows it changed, or with `returning` the first column of its first row (INSERT … RETURNING).

    Through the driver's own `execute`, not Django's cursor: for a one-row statement that wrapper (the
    connection proxy, the cursor's setup and its wrappers, SQLite's placeholders rewritten on every call)
    cost three times the database's work — 119 against 31 us of CPU warm, 309 against 131 us after a 30 ms
    pause (an in-flight count's UPDATE on SQLite, two-core VM, medians of 180). What Django's cursor does that
    matters is kept: the connection opened if need be, the thread and broken-transaction checks, errors as
    Django's. Where Django records statements (DEBUG, or a
    test counting them), they go through its cursor, which does. `db`: this thread's connection, where the
    caller has it already."""
    db = db or connections[DEFAULT_DB_ALIAS]
    if db.queries_logged:
        with db.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()[0] if returning else cursor.rowcount
    db.ensure_connection()
    db.validate_thread_sharing()
    db.validate_no_broken_transaction()
    key = (db.vendor, sql)
    native = _native.get(key)
    if native is None:
        native = _native[key] = (
            _SQLITE_PLACEHOLDER.sub("?", sql).replace("%%", "%") if db.vendor == "sqlite" else sql
        )
    with db.wrap_database_errors:
        cursor = db.connection.execute(native, params)
        try:
            return cursor.fetchone()[0] if returning else cursor.rowcount
        finally:
            cursor.close()


def _insert_sql(meta, fields: list, returning: bool = False) -> str:
    quote = connection.ops.quote_name
    sql = "INSERT INTO {} ({}) VALUES ({})".format(
        quote(meta.db_table), ", ".join(quote(f.column) for f in fields), ", ".join(["%s"] * len(fields))
    )
    return sql + f" RETURNING {quote(meta.pk.column)}" if returning else sql


def insert(model: type[Model], values: dict) -> None:
    """INSERT one row of `model`: `values` by field attname (`instance_id`, not `instance`), every field but
    an automatic primary key given (no defaults are filled in here)."""
    db = connections[DEFAULT_DB_ALIAS]
    key = ("insert", db.vendor, model, tuple(values))
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
        preparers = [(f.attname, _preparer(f, db)) for f in fields]
        built = _statements[key] = (_insert_sql(model._meta, fields), preparers)
    sql, preparers = built
    execute(sql, [prepare(values[name]) for name, prepare in preparers], db=db)


_INTEGER_TYPES = frozenset(
    {
        "AutoField",
        "BigAutoField",
        "SmallAutoField",
        "IntegerField",
        "BigIntegerField",
        "SmallIntegerField",
        "PositiveIntegerField",
        "PositiveBigIntegerField",
        "PositiveSmallIntegerField",
    }
)
_TEXT_TYPES = frozenset({"CharField", "TextField", "SlugField"})


def _preparer(field, db):
    """`field.get_db_prep_save(value, connection)` for `db`, with a shortcut for the values whose preparation
    is known to leave them as they are (a str for a text field, a float for a float field, a bool, None; an
    int on SQLite, where Django adapts none), or to give the UTC text for an aware datetime on SQLite.
    Anything else (an int on PostgreSQL, which Django wraps in its driver's integer type; a string for an
    integer field; a naive datetime) goes to the field. Met cold, as a request's usage record meets them,
    the field's own way cost ~130 us for a record's 14 values; tests/foundation/test_dbutil.py checks that
    both give the same."""

    def by_field(value):
        return field.get_db_prep_save(_plain(value), connection)

    internal = field.target_field.get_internal_type() if field.is_relation else field.get_internal_type()
    if field.is_relation and internal not in _INTEGER_TYPES:
        return by_field
    exact = {"FloatField": float, "BooleanField": bool}.get(internal)
    if internal in _TEXT_TYPES:
        exact = str
    elif internal in _INTEGER_TYPES and db.vendor == "sqlite":
        exact = int
    if exact is not None:
        return lambda value: value if value is None or type(value) is exact else by_field(value)
    if internal == "DateTimeField" and _utc_text(db):
        return lambda value: (
            str(value.astimezone(UTC).replace(tzinfo=None))
            if type(value) is datetime and value.utcoffset() is not None
            else by_field(value)
        )
    return by_field


def update(model: type[Model], values: dict, where: dict) -> int:
    """UPDATE `model`'s rows matching `where` (its conditions as `select` takes them) with `values` (by field
    name or attname): the number of rows changed. Plain values only, no expressions (an F() or a model
    instance is refused: the ORM's `update` is for those)."""
    meta = model._meta
    db = connections[DEFAULT_DB_ALIAS]
    key = ("update", db.vendor, model, tuple(values), _where_key(where))
    built = _statements.get(key)
    if built is None:
        quote = connection.ops.quote_name
        set_fields = [meta.get_field(name) for name in values]
        conditions = [_condition(meta, name, value, quote) for name, value in where.items()]
        sql = "UPDATE {} SET {} WHERE {}".format(
            quote(meta.db_table),
            ", ".join(f"{quote(field.column)} = %s" for field in set_fields),
            " AND ".join(c[0] for c in conditions),
        )
        preparers = [_preparer(field, db) for field in set_fields]
        built = _statements[key] = (sql, preparers, [(c[1], c[2]) for c in conditions])
    sql, preparers, where_fields = built
    params = [prepare(value) for prepare, value in zip(preparers, values.values(), strict=True)]
    return execute(sql, params + _where_params(where_fields, where), db=db)


# A `where` key's suffix: its SQL operator (`__isnull` takes True or False and no parameter).
_OPERATORS = {"": "=", "__gt": ">", "__gte": ">=", "__lt": "<", "__lte": "<=", "__ne": "<>"}


def _condition(meta, name: str, value, quote) -> tuple[str, object, str]:
    """(the condition's SQL, its field, its kind: "one", "many" or "none") for a `where` key."""
    base, _, suffix = name.partition("__")
    field = meta.pk if base == "pk" else meta.get_field(base)
    column = quote(field.column)
    if suffix == "in":
        if not value:
            raise ValueError(f"{name}: an empty list matches nothing")
        return f"{column} IN ({', '.join(['%s'] * len(value))})", field, "many"
    if suffix == "isnull":
        if not isinstance(value, bool):
            raise TypeError(f"{name} takes True or False")
        return f"{column} IS {'' if value else 'NOT '}NULL", field, "none"
    operator = _OPERATORS.get(f"__{suffix}" if suffix else "")
    if operator is None:
        raise ValueError(f"{name}: unknown lookup {suffix!r}")
    return f"{column} {operator} %s", field, "one"


def _where_key(where: dict) -> tuple:
    return tuple(
        (name, len(value) if name.endswith("__in") else value if name.endswith("__isnull") else None)
        for name, value in where.items()
    )


def _where_params(fields: list, where: dict) -> list:
    params = []
    for (field, kind), value in zip(fields, where.values(), strict=True):
        if kind != "none":
            for item in value if kind == "many" else [value]:
                params.append(field.get_db_prep_value(_plain(item), connection))
    return params


def select(
    model: type[Model],
    where: dict,
    *,
    columns: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    order_by: tuple[str, ...] = (),
    limit: int | None = None,
    for_update: bool = False,
) -> list:
    """`model`'s rows matching every condition of `where` (field, field__in (a non-empty list),
    field__gt/__gte/__lt/__lte/__ne, field__isnull=True/False; `pk` for the primary key), as instances: the
    ORM's `filter(**where).only(*columns)` / `.defer(*exclude)` `.order_by(*order_by)[:limit]`, each column
    converted by its field as the ORM converts it (the fields not read are deferred). `for_update`: SELECT
    ... FOR UPDATE where the database has it (PostgreSQL; SQLite's write transactions lock the file), inside
    a transaction as the ORM requires."""
    meta = model._meta
    key = (
        "select",
        connection.vendor,
        model,
        _where_key(where),
        columns,
        exclude,
        order_by,
        limit,
        for_update,
    )
    built = _statements.get(key)
    if built is None:
        quote = connection.ops.quote_name
        wanted = set(columns) if columns is not None else None
        fields = [
            f
            for f in meta.concrete_fields
            if (f.primary_key or wanted is None or f.name in wanted or f.attname in wanted)
            and f.name not in exclude
        ]
        conditions = [_condition(meta, name, value, quote) for name, value in where.items()]
        sql = "SELECT {} FROM {}".format(", ".join(quote(f.column) for f in fields), quote(meta.db_table))
        if conditions:
            sql += " WHERE " + " AND ".join(c[0] for c in conditions)
        if order_by:
            sql += " ORDER BY " + ", ".join(
                quote(meta.pk.column if n.lstrip("-") == "pk" else meta.get_field(n.lstrip("-")).column)
                + (" DESC" if n.startswith("-") else " ASC")
                for n in order_by
            )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        if for_update and connection.features.has_select_for_update:
            sql += " FOR UPDATE"
        converters = [_converters(f, f.get_col(meta.db_table)) for f in fields]
        built = _statements[key] = (
            sql,
            [(c[1], c[2]) for c in conditions],
            [f.attname for f in fields],
            converters,
        )
    sql, where_fields, names, converters = built
    if for_update and connection.features.has_select_for_update and not connection.in_atomic_block:
        raise TransactionManagementError("select(for_update=True) runs inside a transaction")
    with connection.cursor() as cursor:
        cursor.execute(sql, _where_params(where_fields, where))
        rows = cursor.fetchall()
    return [model.from_db(connection.alias, names, _converted(row, converters)) for row in rows]


def _converters(field, col) -> tuple:
    """(the column expression, the converters the ORM applies to a value of this field read from it)."""
    return col, connection.ops.get_db_converters(col) + field.get_db_converters(connection)


def _converted(row, converters) -> list:
    values = []
    for value, (col, field_converters) in zip(row, converters, strict=True):
        for convert in field_converters:
            value = convert(value, col, connection)
        values.append(value)
    return values


def select_one(model: type[Model], pk, related: tuple[str, ...] = ()):
    """The row `pk` of `model` with the rows of its `related` foreign keys attached (None where the key is
    NULL), or None: `select_related(*related).filter(pk=pk).first()` in one plain statement built once per
    shape, each column converted by its field."""
    key = ("select_one", connection.vendor, model, related)
    built = _statements.get(key)
    if built is None:
        quote = connection.ops.quote_name
        parts = [(None, model, "t0")]  # (foreign key, model, alias)
        for n, name in enumerate(related, start=1):
            field = model._meta.get_field(name)
            parts.append((field, field.related_model, f"t{n}"))
        columns, joins, segments = [], [], []
        for fk, part_model, alias in parts:
            meta = part_model._meta
            fields = list(meta.concrete_fields)
            columns += [f"{alias}.{quote(f.column)}" for f in fields]
            segments.append(
                (
                    fk,
                    part_model,
                    [f.attname for f in fields],
                    [_converters(f, f.get_col(alias)) for f in fields],
                )
            )
            if fk is not None:
                joins.append(
                    f"LEFT OUTER JOIN {quote(meta.db_table)} {alias} "
                    f"ON {alias}.{quote(meta.pk.column)} = t0.{quote(fk.column)}"
                )
        sql = "SELECT {} FROM {} t0 {} WHERE t0.{} = %s".format(
            ", ".join(columns), quote(model._meta.db_table), " ".join(joins), quote(model._meta.pk.column)
        )
        built = _statements[key] = (sql, segments)
    sql, segments = built
    with connection.cursor() as cursor:
        cursor.execute(sql, [model._meta.pk.get_db_prep_value(_plain(pk), connection)])
        row = cursor.fetchone()
    if row is None:
        return None
    found, start = None, 0
    for fk, part_model, names, converters in segments:
        values = row[start : start + len(names)]
        start += len(names)
        if fk is None:
            found = part_model.from_db(connection.alias, names, _converted(values, converters))
        elif getattr(found, fk.attname) is None:  # a NULL key: nothing joined
            setattr(found, fk.name, None)
        else:
            setattr(
                found, fk.name, part_model.from_db(connection.alias, names, _converted(values, converters))
            )
    return found


class _Table:
    """A model in a `read` template under its alias `t`: `{t}` is its table named t, `{t.field}` a column of
    it (quoted): one table may appear twice under two aliases."""

    def __init__(self, model: type[Model], alias: str):
        self.meta = model._meta
        self.alias = alias

    def field(self, name: str):
        return self.meta.pk if name == "pk" else self.meta.get_field(name)

    def __getattr__(self, name: str) -> str:
        return f"{self.alias}.{connection.ops.quote_name(self.field(name).column)}"

    def __format__(self, spec: str) -> str:
        return f"{connection.ops.quote_name(self.meta.db_table)} {self.alias}"


def read(template: str, tables: dict[str, type[Model]], params: list, *, many: int = 0) -> list[tuple]:
    """Rows of a plain SELECT written as a template: `{t}` names a table of `tables` (under the alias t: write
    it once, in FROM or JOIN), `{t.field}` its column (a field's name or attname), `{many}` stands for `many`
    placeholders (an IN list). Each selected column (those before the first FROM) is converted by its field
    as the ORM converts it; `params` go to the driver as they are (ints, strings, booleans). Built once per
    template, vendor and `many`: for a join on a hot path that the ORM would rebuild each time."""
    key = ("read", connection.vendor, template, tuple(tables.items()), many)
    built = _statements.get(key)
    if built is None:
        wrapped = {alias: _Table(model, alias) for alias, model in tables.items()}
        sql = template.format(**wrapped, many=", ".join(["%s"] * many))
        selected = template.split(" FROM ", 1)[0]
        converters = []
        for _, name, _, _ in string.Formatter().parse(selected):
            if name and "." in name:
                alias, field_name = name.split(".", 1)
                field = wrapped[alias].field(field_name)
                converters.append(_converters(field, field.get_col(alias)))
        built = _statements[key] = (sql, converters)
    sql, converters = built
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return [tuple(_converted(row, converters)) for row in rows]


def create(instance: Model) -> Model:
    """INSERT a new `instance` (as `instance.save()` would: defaults and auto_now_add filled in by the fields,
    the automatic primary key read back) without the ORM's statement building; no model signals are sent
    (use it only for models that have no receivers). IntegrityError as the ORM raises it."""
    model = type(instance)
    meta = model._meta
    db = connections[DEFAULT_DB_ALIAS]
    key = ("create", db.vendor, model)
    built = _statements.get(key)
    if built is None:
        fields = [
            f
            for f in meta.concrete_fields
            if not (f.primary_key and f.get_internal_type().endswith("AutoField"))
        ]
        returning = db.features.can_return_columns_from_insert
        preparers = [(f, _preparer(f, db)) for f in fields]
        built = _statements[key] = (_insert_sql(meta, fields, returning), preparers, returning)
    sql, preparers, returning = built
    params = [prepare(f.pre_save(instance, True)) for f, prepare in preparers]
    if returning:
        pk = execute(sql, params, returning=True, db=db)
    else:  # a database without INSERT … RETURNING
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            pk = cursor.lastrowid
    instance.pk = pk
    instance._state.adding = False
    instance._state.db = connection.alias
    return instance


def _plain(value):
    if isinstance(value, Combinable | Model):  # F(), Value(), F() + 1, ...: expressions
        raise TypeError(f"a plain value is needed here, not {value!r}: use the ORM for it")
    return value


_statements: dict[tuple, tuple] = {}  # one per model, vendor and shape: a few dozen in all

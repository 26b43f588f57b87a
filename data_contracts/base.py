"""Row contracts: one pydantic model per artifact, mapped to an explicit Arrow schema.

Validation runs at the Arrow level (types, nulls, allowed values) so that it stays fast at MIMIC scale
(hundreds of thousands of rows); pydantic is only consulted row by row to explain a failure.
"""

from __future__ import annotations

import types
import typing
from typing import Any, ClassVar, Literal, get_args, get_origin

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, ValidationError

_SCALARS: dict[type, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    bytes: pa.binary(),
}

CONTRACTS: dict[str, type[Row]] = {}


class ContractError(ValueError):
    """A table or row does not match its contract; the message names the source, column, row and problem."""

    def __init__(self, source: str, column: str | None, problem: str, row: int | None = None):
        self.source, self.column, self.problem, self.row = source, column, problem, row
        where = f"column '{column}'" if column else "table"
        at = f" (first bad row {row})" if row is not None else ""
        super().__init__(f"{source}: {where}: {problem}{at}")


class ColumnSpec(typing.NamedTuple):
    name: str
    arrow_type: pa.DataType
    nullable: bool
    allowed: tuple[str, ...] | None  # Literal values, for the column or its list items


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(annotation)):
            return args[0], True
        raise TypeError(f"unsupported union {annotation!r}: only 'X | None' is allowed")
    return annotation, False


def _arrow_of(annotation: Any) -> tuple[pa.DataType, tuple[str, ...] | None]:
    if annotation in _SCALARS:
        return _SCALARS[annotation], None
    origin = get_origin(annotation)
    if origin is Literal:
        values = get_args(annotation)
        if not all(isinstance(v, str) for v in values):
            raise TypeError(f"only string Literals are supported, got {annotation!r}")
        return pa.string(), tuple(values)
    if origin is list:
        (item,) = get_args(annotation)
        item_type, allowed = _arrow_of(item)
        return pa.list_(item_type), allowed
    raise TypeError(f"unsupported contract field type {annotation!r}")


class Row(BaseModel):
    """Base of every artifact row model. Subclasses set `contract` (schema name) and `version`."""

    model_config = ConfigDict(extra="forbid")

    contract: ClassVar[str] = ""
    version: ClassVar[int] = 1
    arrow_overrides: ClassVar[dict[str, pa.DataType]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.contract:
            CONTRACTS[cls.contract] = cls

    @classmethod
    def columns(cls) -> list[ColumnSpec]:
        specs = []
        for name, field in cls.model_fields.items():
            annotation, nullable = _unwrap_optional(field.annotation)
            arrow_type, allowed = _arrow_of(annotation)
            arrow_type = cls.arrow_overrides.get(name, arrow_type)
            specs.append(ColumnSpec(name, arrow_type, nullable, allowed))
        return specs

    @classmethod
    def arrow_schema(cls) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.arrow_type, nullable=c.nullable) for c in cls.columns()])


def contract_by_name(name: str) -> type[Row]:
    if name not in CONTRACTS:
        raise KeyError(f"unknown contract '{name}' (known: {', '.join(sorted(CONTRACTS))})")
    return CONTRACTS[name]


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int:
    return pc.index(mask, True).as_py()


def _check_column(table: pa.Table, spec: ColumnSpec, source: str) -> pa.ChunkedArray:
    column = table.column(spec.name)
    if not column.type.equals(spec.arrow_type):
        try:
            column = column.cast(spec.arrow_type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
            raise ContractError(
                source, spec.name, f"expected {spec.arrow_type}, found {column.type} ({err})"
            ) from None
    if not spec.nullable and column.null_count:
        raise ContractError(source, spec.name, "null in a required column", _first_true(pc.is_null(column)))
    values = column
    if pa.types.is_list(spec.arrow_type):
        values = pc.list_flatten(column)
        if values.null_count:
            raise ContractError(source, spec.name, "null inside a list")
    if spec.allowed is not None and len(values):
        bad = pc.invert(pc.fill_null(pc.is_in(values, value_set=pa.array(spec.allowed)), True))
        if pc.any(bad).as_py():
            idx = _first_true(bad)
            value = values[idx].as_py()
            row = idx if values is column else None
            raise ContractError(source, spec.name, f"value {value!r} not in {list(spec.allowed)}", row)
    return column


def validate_table(table: pa.Table, contract: type[Row], source: str) -> pa.Table:
    """Check `table` against `contract` and return it with exactly the contract's schema (column order,
    types)."""
    expected = [c.name for c in contract.columns()]
    missing = [c for c in expected if c not in table.column_names]
    if missing:
        raise ContractError(source, missing[0], f"missing (contract {contract.contract} v{contract.version})")
    extra = [c for c in table.column_names if c not in expected]
    if extra:
        raise ContractError(source, extra[0], f"not in contract {contract.contract} v{contract.version}")
    columns = [_check_column(table, spec, source) for spec in contract.columns()]
    return pa.Table.from_arrays(columns, schema=contract.arrow_schema())


def _explain_bad_row(rows: list[dict[str, Any]], contract: type[Row], source: str) -> ContractError:
    for i, row in enumerate(rows):
        try:
            contract.model_validate(row, strict=False)
        except ValidationError as err:
            first = err.errors()[0]
            column = ".".join(str(p) for p in first["loc"]) or None
            return ContractError(source, column, first["msg"], i)
    return ContractError(source, None, "rows could not be converted to the contract's Arrow schema")


def to_table(data: pa.Table | list[Any], contract: type[Row], source: str) -> pa.Table:
    """Turn rows (Row instances or dicts) or an Arrow table into a validated table with the contract's
    schema."""
    if isinstance(data, pa.Table):
        return validate_table(data, contract, source)
    rows = [r.model_dump() if isinstance(r, BaseModel) else r for r in data]
    names = {c.name for c in contract.columns()}
    keys = set().union(*(r.keys() for r in rows)) if rows else set()
    if keys - names:
        raise ContractError(source, sorted(keys - names)[0], f"not in contract {contract.contract}")
    try:
        table = pa.Table.from_pylist(rows, schema=contract.arrow_schema())
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        raise _explain_bad_row(rows, contract, source) from None
    return validate_table(table, contract, source)

"""mypy plugin: the classes built at run time from engine.schema's groups.

- ``X = cluster.http.api.api_model("X", schema.API_...)``: a pydantic model; mypy learns it is
  a subclass of ``BaseModel`` (its fields matter only to the OpenAPI document, never to code).
- The record classes engine.schema.record builds, as NamedTuples:

``X = schema.record("X", schema.GROUP, __name__, doc, enums={...}, zero_default=(...))`` makes
a NamedTuple of ``GROUP``'s fields when the module runs; mypy cannot run it, so this plugin
builds the same class for it from the same arguments. It reads the group from engine.schema
itself (imported here), so a field added to the schema is a field of every record of that group
for mypy too, with no declaration to repeat. A field's type is engine.schema.value_type's, or
its ``enums`` entry's class; the ``zero_default`` fields are optional arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mypy.nodes import (
    GDEF,
    DictExpr,
    Expression,
    IntExpr,
    MemberExpr,
    NamedTupleExpr,
    NameExpr,
    RefExpr,
    StrExpr,
    SymbolTableNode,
    TupleExpr,
    TypeInfo,
)
from mypy.plugin import DynamicClassDefContext, Plugin
from mypy.semanal import SemanticAnalyzer
from mypy.types import Instance, NoneType, Type, UnionType

from engine import schema

RECORD = "engine.schema.record"
API_MODEL = "cluster.http.api.api_model"
BASE_MODEL = "pydantic.main.BaseModel"


class RecordsPlugin(Plugin):
    def get_dynamic_class_hook(self, fullname: str
                               ) -> Callable[[DynamicClassDefContext], None] | None:
        return {RECORD: _record, API_MODEL: _api_model}.get(fullname)


def _api_model(ctx: DynamicClassDefContext) -> None:
    api = ctx.api
    assert isinstance(api, SemanticAnalyzer)
    base = api.lookup_fully_qualified_or_none(BASE_MODEL)
    if base is None or not isinstance(base.node, TypeInfo):  # not analysed yet
        api.defer()
        return
    info = api.basic_new_typeinfo(ctx.name, Instance(base.node, []), ctx.call.line)
    info.mro = [info, *base.node.mro]
    api.add_symbol_table_node(ctx.name, SymbolTableNode(GDEF, info))


def _record(ctx: DynamicClassDefContext) -> None:
    api = ctx.api
    assert isinstance(api, SemanticAnalyzer)  # the plugin interface lacks the NamedTuple tools
    call = ctx.call
    positional = [a for a, n in zip(call.args, call.arg_names, strict=True) if n is None]
    named = {n: a for a, n in zip(call.args, call.arg_names, strict=True) if n is not None}
    if len(positional) < 2 or not isinstance(positional[1], MemberExpr | NameExpr):
        api.fail("schema.record needs the record's name and a group of engine.schema", call)
        return
    group = getattr(schema, positional[1].name, None)
    if not isinstance(group, tuple) or not all(isinstance(f, schema.Field) for f in group):
        api.fail(f"engine.schema has no group {positional[1].name!r}", call)
        return
    # the options must be written out (a dict display, a tuple of strings): this plugin reads
    # them from the source, where run time evaluates them
    enums: dict[str, Type] = {}
    enums_expr = named.get("enums")
    if enums_expr is not None:
        if not isinstance(enums_expr, DictExpr):
            api.fail("schema.record's enums must be a {field name: class} display", call)
            return
        for key, value in enums_expr.items:
            if not isinstance(key, StrExpr) or not isinstance(value, RefExpr):
                api.fail("schema.record's enums must map field names to classes", call)
                return
            if not isinstance(value.node, TypeInfo):  # not analysed yet: come back later
                api.defer()
                return
            enums[key.value] = Instance(value.node, [])
    defaults: dict[str, Expression] = {}
    zero_expr = named.get("zero_default")
    if zero_expr is not None:
        if not isinstance(zero_expr, TupleExpr) or not all(
                isinstance(item, StrExpr) for item in zero_expr.items):
            api.fail("schema.record's zero_default must be a tuple of field names", call)
            return
        defaults = {item.value: IntExpr(0) for item in zero_expr.items
                    if isinstance(item, StrExpr)}
    # each field's type as engine.schema.value_type gives it at run time, in mypy's terms
    integer, text = api.named_type("builtins.int"), api.named_type("builtins.str")
    as_mypy: dict[Any, Type] = {int: integer, str: text,
                                int | None: UnionType([integer, NoneType()])}
    types = [enums.get(f.name) or as_mypy[schema.value_type(f)] for f in group]
    existing = call.analyzed.info if isinstance(call.analyzed, NamedTupleExpr) else None
    # in a class frame of its own, as mypy builds a NamedTuple assigned at module level: the
    # self type of its methods must not come from the module's frame
    with api.tvar_scope_frame(api.tvar_scope.class_frame(api.qualified_name(ctx.name))):
        info = api.named_tuple_analyzer.build_namedtuple_typeinfo(
            ctx.name, list(schema.names(group)), types, defaults, call.line, existing)
    call.analyzed = NamedTupleExpr(info, is_typed=True)
    call.analyzed.set_line(call)
    # no context: the name's variable (bound before this hook runs) becomes the class
    api.add_symbol_table_node(ctx.name, SymbolTableNode(GDEF, info))


def plugin(version: str) -> type[Plugin]:
    return RecordsPlugin

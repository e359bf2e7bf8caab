"""_native.pyi describes the extension module as built: every public name of one is in the
other, and every function and method takes the parameters (names and order) the stub gives."""

from __future__ import annotations

import ast
import functools
import inspect
import os

import pytest

from diffulex_edge import _native

STUB = os.path.join(os.path.dirname(_native.__file__), "_native.pyi")
STUB_ONLY = {"Act"}  # type aliases that exist for annotations only


@functools.lru_cache(maxsize=None)  # parsed once, not once per test
def _stub():
    tree = ast.parse(open(STUB).read())
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            out.update({t.id: node for t in node.targets})
    return out


def _params(node: ast.FunctionDef, drop_self: bool = False) -> list:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return names[1:] if drop_self else names


def _signature(obj) -> list:
    return [p.name for p in inspect.signature(obj).parameters.values() if p.name != "self"]


def test_stub_and_module_have_the_same_names():
    stub = set(_stub()) - STUB_ONLY
    module = {k for k in dir(_native) if not k.startswith("_")} | {"__version__"}
    assert sorted(module - stub) == [], "in the extension module but not in _native.pyi"
    assert sorted(stub - module) == [], "in _native.pyi but not in the extension module"


@pytest.mark.parametrize("name", sorted(k for k, v in _stub().items() if isinstance(v, ast.FunctionDef)))
def test_function_parameters_match(name):
    assert _signature(getattr(_native, name)) == _params(_stub()[name])


@pytest.mark.parametrize("name", sorted(k for k, v in _stub().items() if isinstance(v, ast.ClassDef)))
def test_class_methods_match(name):
    cls, node = getattr(_native, name), _stub()[name]
    methods = {m.name: m for m in node.body if isinstance(m, ast.FunctionDef)}
    public = {k for k in dir(cls) if not k.startswith("_")}
    assert public == {k for k in methods if not k.startswith("_")}
    for k in public:
        assert _signature(getattr(cls, k)) == _params(methods[k], drop_self=True), k
    if "__init__" in methods and cls.__text_signature__:
        assert cls.__text_signature__ == "(" + ", ".join(_params(methods["__init__"], drop_self=True)) + ")"

"""One source for defaults, ranges and names: the Rust core (``_sketchx.defaults()`` etc.). The Python layer's
signatures take their values from it, the stubs restate them (checked here by parsing the ``.pyi``), the example
CLI uses them, and the names parse in any ASCII case."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

import sketchx
from sketchx import _sketchx

from conftest import HOUSE, REPO, small

PACKAGE = REPO / "sketchx-py" / "python" / "sketchx"


def _pipeline_methods(path: Path) -> Dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text(), filename=str(path))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Pipeline")
    return {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in ("__init__", "submit")}


def _defaults_of(fn: ast.FunctionDef) -> Dict[str, ast.expr]:
    """Parameter name -> default expression, positional and keyword-only."""
    args = fn.args
    positional = args.posonlyargs + args.args
    out = dict(zip([a.arg for a in positional[len(positional) - len(args.defaults):]], args.defaults))
    out.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
    return out


def test_the_stub_restates_every_default_of_the_core() -> None:
    core = _sketchx.defaults()
    methods = _pipeline_methods(PACKAGE / "__init__.pyi")
    seen = set()
    for name, fn in methods.items():
        runtime = inspect.signature(getattr(sketchx.Pipeline, name)).parameters
        stub_defaults = _defaults_of(fn)
        runtime_defaults = {p: v.default for p, v in runtime.items() if v.default is not inspect.Parameter.empty}
        assert set(stub_defaults) == set(runtime_defaults), name
        for param, expr in stub_defaults.items():
            value = ast.literal_eval(expr)
            assert value == core[param] and type(value) is type(core[param]), (name, param, value, core[param])
            seen.add(param)
    assert seen == set(core), set(core) ^ seen


def test_the_module_takes_every_default_from_the_core_not_from_literals() -> None:
    """``__init__.py`` spells no default value: each is ``_DEFAULTS[<the parameter's name>]``."""
    for name, fn in _pipeline_methods(PACKAGE / "__init__.py").items():
        for param, expr in _defaults_of(fn).items():
            assert (
                isinstance(expr, ast.Subscript)
                and isinstance(expr.value, ast.Name)
                and expr.value.id == "_DEFAULTS"
                and isinstance(expr.slice, ast.Constant)
                and expr.slice.value == param
            ), (name, param, ast.unparse(expr))


def test_signatures_equal_the_core_defaults() -> None:
    core = _sketchx.defaults()
    for method in (sketchx.Pipeline.__init__, sketchx.Pipeline.submit):
        for name, param in inspect.signature(method).parameters.items():
            if param.default is inspect.Parameter.empty:
                continue
            assert param.default == core[name], (method.__name__, name, param.default, core[name])


def test_public_views_are_the_cores() -> None:
    assert dict(sketchx.DEFAULTS) == _sketchx.defaults()
    assert dict(sketchx.RANGES) == _sketchx.ranges()
    assert {k: list(v) for k, v in sketchx.NAMES.items()} == _sketchx.names()
    with pytest.raises(TypeError):
        sketchx.DEFAULTS["steps"] = 1  # type: ignore[index]
    for field in ("scheduler", "preprocess", "device"):
        assert sketchx.NAMES[field][0] == sketchx.DEFAULTS[field], field
    assert sketchx.RANGES["steps"] == (1, 150)
    assert sketchx.NAMES["scheduler"] == ("euler_a", "euler", "ddim", "lcm", "tcd")
    assert sketchx.NAMES["dtype"] == ("f32", "bf16", "f16")


def test_the_example_cli_defaults_are_the_cores() -> None:
    spec = importlib.util.spec_from_file_location("sketchx_generate", REPO / "examples/python/generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sketchx_generate"] = module
    spec.loader.exec_module(module)
    args = vars(module.parse_args(["--sketch", "x.png"]))
    renamed = {"out": "output_dir"}
    checked = 0
    for flag, value in args.items():
        key = renamed.get(flag, flag)
        if key in sketchx.DEFAULTS:
            assert value == sketchx.DEFAULTS[key], (flag, value)
            checked += 1
    assert checked >= 15


@pytest.mark.parametrize(
    "params",
    [
        dict(scheduler="DDIM"),
        dict(scheduler=" Euler_A "),
        dict(preprocess="NONE"),
        dict(preprocess=" Scribble\t"),
    ],
)
def test_names_parse_in_any_case(pipe: sketchx.Pipeline, params: Dict[str, Any]) -> None:
    job_id = pipe.submit(str(HOUSE), **small(**params))
    pipe.cancel(job_id)


@pytest.mark.parametrize("field, bad", [("scheduler", "plms"), ("preprocess", "hed")])
def test_unknown_names_list_the_accepted_ones(pipe: sketchx.Pipeline, field: str, bad: str) -> None:
    with pytest.raises(sketchx.InvalidRequestError) as err:
        pipe.submit(str(HOUSE), **small(**{field: bad}))
    assert err.value.field == field
    for name in sketchx.NAMES[field]:
        assert f'"{name}"' in str(err.value)

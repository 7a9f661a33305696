"""The input schema `cog build` writes into the image (.cog/openapi_schema.json), made here from
predict.py without the cog CLI, so that the Cog server run outside an image validates requests as
the image does: a value outside predict.py's bounds or choices, a missing prompt or a wrong type is
answered 422 by coglet before run() sees it, and an input predict.py does not declare is dropped.

Like Cog's generator (pkg/schema: it parses the Python statically, nothing is imported) it reads
run()'s signature from the source: each input's type, and the literal default, bounds, choices
and description of its Input(...). The document has that generator's shape: the Input object with
its properties in declaration order (x-order), choices as enum components referenced by allOf,
bounds as minimum/maximum, optional inputs nullable, a required type without a default required.
Standard library only. tests/test_serve.py checks it against Cog's own reading of predict.py.

    .venv/bin/python -m fastsd_testing.cog_schema > .cog/openapi_schema.json
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = Path(".cog") / "openapi_schema.json"  # where coglet looks, from its working folder
_JSON_TYPES = {"str": {"type": "string"}, "int": {"type": "integer"}, "float": {"type": "number"},
               "bool": {"type": "boolean"}, "Path": {"type": "string", "format": "uri"}}  # fmt: skip
_NO_DEFAULT = object()


def _title(name: str) -> str:
    return " ".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _annotation(node: ast.expr) -> tuple[str, bool, bool]:
    """(the primitive's name, whether None is allowed, whether it is a list) of `T`, `list[T]`, and
    either `| None` or in `Optional[...]`."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        sides = [
            side for side in (node.left, node.right) if not (isinstance(side, ast.Constant) and side.value is None)
        ]
        name, _, repeated = _annotation(sides[0])
        return name, True, repeated
    if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("Optional"):
        name, _, repeated = _annotation(node.slice)
        return name, True, repeated
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("list", "List", "typing.List"):
        return _annotation(node.slice)[0], False, True
    name = ast.unparse(node).rsplit(".", 1)[-1]
    if name not in _JSON_TYPES:
        raise ValueError(f"predict.py: an input of type {ast.unparse(node)} is not described here")
    return name, False, False


def _input_arguments(default: ast.expr | None) -> dict[str, Any]:
    """The literal keywords of Input(...), or {"default": value} for a plain default."""
    if default is None:
        return {}
    if isinstance(default, ast.Call) and ast.unparse(default.func).rsplit(".", 1)[-1] == "Input":
        return {keyword.arg: ast.literal_eval(keyword.value) for keyword in default.keywords if keyword.arg}
    return {"default": ast.literal_eval(default)}


def read_inputs(predict_py: Path, class_name: str = "Predictor") -> list[dict[str, Any]]:
    """run()'s inputs as Cog reads them: name, primitive, nullable, and Input's literal keywords."""
    module = ast.parse(predict_py.read_text())
    (cls,) = [node for node in module.body if isinstance(node, ast.ClassDef) and node.name == class_name]
    (run,) = [node for node in cls.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and
              node.name in ("run", "predict")]  # fmt: skip
    arguments = run.args.args[1:]  # not self
    defaults: list[ast.expr | None] = [None] * (len(arguments) - len(run.args.defaults)) + list(run.args.defaults)
    found = []
    for argument, default in zip(arguments, defaults, strict=True):
        if argument.annotation is None:
            raise ValueError(f"predict.py: input {argument.arg} has no type")
        primitive, nullable, repeated = _annotation(argument.annotation)
        found.append({"name": argument.arg, "type": primitive, "nullable": nullable, "repeated": repeated,
                      **_input_arguments(default)})  # fmt: skip
    return found


def _input_schema(inputs: list[dict[str, Any]]) -> tuple[dict, dict]:
    properties: dict[str, dict] = {}
    required: list[str] = []
    enums: dict[str, dict] = {}
    for order, field in enumerate(inputs):
        name, json_type = field["name"], _JSON_TYPES[field["type"]]
        if field["repeated"]:
            json_type = {"type": "array", "items": json_type}
        prop: dict[str, Any] = {"x-order": order}
        if field.get("choices"):
            enums[name] = {"title": name, "description": "An enumeration.", "enum": list(field["choices"]),
                           "type": json_type["type"]}  # fmt: skip
            prop["allOf"] = [{"$ref": _ref(name)}]
        else:
            prop["title"] = _title(name)
            prop.update(json_type)
        default = field.get("default", _NO_DEFAULT)
        # A None default on a type that takes no None is no default (Cog: "generate one at run time").
        has_default = default is not _NO_DEFAULT and not (default is None and not field["nullable"])
        if not has_default:
            required.append(name)
        else:
            prop["default"] = default
        if field["nullable"]:
            prop["nullable"] = True
        for keyword, key in (("description", "description"), ("ge", "minimum"), ("le", "maximum")):
            if field.get(keyword) is not None:
                prop[key] = field[keyword]
        properties[name] = prop
    schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def openapi_schema(predictor: str = "predict.py:Predictor") -> dict:
    """The OpenAPI document of a predictor ("path/to/module.py:Class", relative to the project)."""
    module_path, class_name = predictor.split(":")
    inputs, enums = _input_schema(read_inputs(PROJECT_ROOT / module_path, class_name))
    output = {"title": "Output", "type": "array", "items": {"type": "string", "format": "uri"}}  # list[Path]
    reference = {"$ref": "#/components/schemas/Input"}
    validation_error = {"description": "Validation Error", "content": _json({"$ref": _ref("HTTPValidationError")})}
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": _cog_version()},
        "paths": {
            "/predictions": {
                "post": {
                    "summary": "Predict",
                    "description": "Run a single prediction on the model",
                    "operationId": "predict_predictions_post",
                    "requestBody": {"content": _json({"$ref": _ref("PredictionRequest")})},
                    "responses": {
                        "200": {
                            "description": "Successful Response",
                            "content": _json({"$ref": _ref("PredictionResponse")}),
                        },
                        "422": validation_error,
                    },
                }
            }
        },
        "components": {
            "schemas": {
                "Input": inputs,
                "Output": output,
                **enums,
                "PredictionRequest": {
                    "title": "PredictionRequest",
                    "type": "object",
                    "properties": {"id": {"title": "Id", "type": "string"}, "input": reference},
                },
                "PredictionResponse": {
                    "title": "PredictionResponse",
                    "type": "object",
                    "properties": {
                        "input": reference,
                        "output": {"$ref": _ref("Output")},
                        "id": {"title": "Id", "type": "string"},
                        "status": {"title": "Status", "type": "string"},
                        "error": {"title": "Error", "type": "string"},
                        "logs": {"title": "Logs", "type": "string"},
                        "metrics": {"title": "Metrics", "type": "object"},
                    },
                },
                "HTTPValidationError": {
                    "title": "HTTPValidationError",
                    "type": "object",
                    "properties": {
                        "detail": {"title": "Detail", "type": "array", "items": {"$ref": _ref("ValidationError")}}
                    },
                },
                "ValidationError": {
                    "title": "ValidationError",
                    "required": ["loc", "msg", "type"],
                    "type": "object",
                    "properties": {
                        "loc": {
                            "title": "Location",
                            "type": "array",
                            "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                        },
                        "msg": {"title": "Message", "type": "string"},
                        "type": {"title": "Error Type", "type": "string"},
                    },
                },
            }
        },
    }


def _ref(name: str) -> str:
    return f"#/components/schemas/{name}"


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _cog_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cog")
    except PackageNotFoundError:
        return "unknown"


def _as_go_writes_it(value: Any) -> Any:
    """Numbers as Cog's Go generator encodes them: a whole float64 without its .0 (le=2.0 -> 2)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _as_go_writes_it(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_go_writes_it(item) for item in value]
    return value


def write(folder: Path, predictor: str = "predict.py:Predictor") -> Path:
    """Write the schema where coglet reads it when it runs in folder."""
    path = folder / SCHEMA_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_as_go_writes_it(openapi_schema(predictor)), indent=1) + "\n")
    return path


if __name__ == "__main__":
    json.dump(_as_go_writes_it(openapi_schema()), sys.stdout, indent=1)
    print()

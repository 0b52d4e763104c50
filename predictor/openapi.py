"""OpenAPI 3.1 document of the predictor's routes, served at ``/openapi.json``.

The request schemas carry the limits of the running process (body size,
rows per request), so a client or a schema-driven test gets the bounds that
are enforced.
"""

from __future__ import annotations

from typing import Any

from modelstore.names import MAX_ALIAS_LENGTH, MAX_NAME_LENGTH

from predictor.settings import PredictorSettings

NAME = {
    "name": "name", "in": "path", "required": True,
    "description": "Model name: ASCII letters, digits, '.', '_' or '-', starting with a letter or digit.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$", "maxLength": MAX_NAME_LENGTH},
}
VERSION = {
    "name": "version", "in": "path", "required": True,
    "description": "A version number (such as 3) or an alias of the model's head (such as "
                   "production); aliases start with a letter.",
    "schema": {
        "type": "string",
        "pattern": "^([0-9]{1,9}|[A-Za-z][A-Za-z0-9._-]*)$",
        "maxLength": max(9, MAX_ALIAS_LENGTH),
    },
}
ERROR_CODES = ("400", "404", "413", "422", "503")


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _model_operation(summary: str, ok_schema: str, body_schema: str | None, versioned: bool) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": _json(_ref(ok_schema), "Answered by the version named in the body.")}
    for code in ERROR_CODES:
        responses[code] = _json(_ref("Error"), "The error names the model, the field and the fix.")
    operation: dict[str, Any] = {
        "summary": summary,
        "parameters": [NAME, VERSION] if versioned else [NAME],
        "responses": responses,
    }
    if body_schema is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body_schema)}}}
    return operation


def openapi_document(settings: PredictorSettings, version: str) -> dict[str, Any]:
    """Build the document; ``version`` is the streamfit package version."""
    paths: dict[str, Any] = {
        "/v2": {"get": {
            "summary": "Server metadata (Open Inference Protocol V2).",
            "responses": {"200": _json(_ref("ServerMetadata"), "Name, version and extensions.")},
        }},
        "/v2/health/live": {"get": {
            "summary": "Liveness: the process serves HTTP.",
            "responses": {"200": _json({"type": "object"}, "Live.")},
        }},
        "/v2/health/ready": {"get": {
            "summary": "Readiness: the model store responded (and the stream consumer runs, when configured).",
            "responses": {
                "200": _json({"type": "object"}, "Ready."),
                "503": _json({"type": "object"}, "Not ready yet."),
            },
        }},
        "/openapi.json": {"get": {
            "summary": "This document.",
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document.")},
        }},
        "/metrics": {"get": {
            "summary": "Prometheus metrics of this process.",
            "responses": {"200": {"description": "Prometheus text format.", "content": {"text/plain": {}}}},
        }},
    }
    for versioned in (False, True):
        prefix = "/versions/{version}" if versioned else ""
        which = "the version or alias in the path" if versioned else "the latest version"
        paths[f"/v2/models/{{name}}{prefix}"] = {"get": _model_operation(
            f"Model metadata of {which}: inputs, outputs, versions, aliases.", "ModelMetadata", None, versioned)}
        paths[f"/v2/models/{{name}}{prefix}/ready"] = {"get": _model_operation(
            f"Readiness of {which}; loads it on first use.", "ModelReady", None, versioned)}
        paths[f"/v2/models/{{name}}{prefix}/infer"] = {"post": _model_operation(
            f"Open Inference Protocol V2 inference on {which}.", "InferenceResponse", "InferenceRequest", versioned)}
        paths[f"/v1/models/{{name}}{prefix}/predict"] = {"post": _model_operation(
            f"Predict named features with {which}.", "PredictResponse", "PredictRequest", versioned)}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "streamfit predictor",
            "version": version,
            "description": (
                "Open Inference Protocol V2 (REST) and a simple JSON route over onnxruntime. "
                f"Request bodies are limited to {settings.max_body_bytes} bytes and "
                f"{settings.max_batch_rows} rows (413 above)."
            ),
        },
        "paths": paths,
        "components": {"schemas": _schemas(settings)},
    }


def _schemas(settings: PredictorSettings) -> dict[str, Any]:
    rows = settings.max_batch_rows
    scalar = {"type": ["number", "string", "null"]}
    row = {
        "oneOf": [
            {"type": "object", "additionalProperties": scalar,
             "description": "Features by name; names the schema does not know are ignored and listed."},
            {"type": "array", "items": scalar, "description": "Features in the schema's order."},
        ]
    }
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string", "description": "A feature of the model's schema."},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": 2,
                      "description": "[n] or [n, 1]."},
            "datatype": {"type": "string", "enum": [
                "BYTES", "FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64",
                "UINT8", "UINT16", "UINT32", "UINT64"]},
            "data": {"type": "array", "maxItems": rows},
            "parameters": {"type": "object"},
        },
    }
    output_tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {"name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                       "datatype": {"type": "string"}, "data": {"type": "array"}},
    }
    version_parameters = {
        "type": "object",
        "properties": {
            "version": {"type": "integer"},
            "version_age_seconds": {"type": ["number", "null"], "description": "Seconds since the version was published."},
            "alias": {"type": "string"},
        },
    }
    return {
        "ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}}}},
        "ModelMetadata": {"type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
                          "properties": {
                              "name": {"type": "string"},
                              "versions": {"type": "array", "items": {"type": "string"},
                                           "description": "The served version and the versions that aliases name."},
                              "platform": {"type": "string"},
                              "inputs": {"type": "array", "items": {"type": "object"}},
                              "outputs": {"type": "array", "items": {"type": "object"}},
                              "parameters": version_parameters}},
        "ModelReady": {"type": "object", "required": ["name", "version", "ready"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"}, "ready": {"type": "boolean"},
            "version_age_seconds": {"type": ["number", "null"]}}},
        "InferenceRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"},
            "inputs": {"type": "array", "items": tensor, "minItems": 1,
                       "description": "One tensor per feature of the model's schema."},
            "outputs": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
            "parameters": {"type": "object"}}},
        "InferenceResponse": {"type": "object", "required": ["model_name", "model_version", "outputs"],
                              "properties": {
                                  "model_name": {"type": "string"}, "model_version": {"type": "string"},
                                  "id": {"type": "string"},
                                  "outputs": {"type": "array", "items": output_tensor},
                                  "parameters": version_parameters}},
        "PredictRequest": {
            "type": "object",
            "description": "Exactly one of features (one row) and instances (a list of rows).",
            "properties": {"features": row, "instances": {"type": "array", "items": row, "minItems": 1, "maxItems": rows}},
            "additionalProperties": False,
        },
        "PredictResponse": {"type": "object", "required": ["model", "version", "predictions"], "properties": {
            "model": {"type": "string"}, "version": {"type": "integer"},
            "version_age_seconds": {"type": ["number", "null"]}, "alias": {"type": "string"},
            "predictions": {"type": "array"}, "labels": {"type": "array"},
            "probabilities": {"type": "array"}, "scores": {"type": "array"},
            "ignored_features": {"type": "array", "items": {"type": "string"}}}},
        "Error": {"type": "object", "required": ["error"], "properties": {
            "error": {"type": "string"}, "model": {"type": "string"}, "version": {"type": ["integer", "string"]},
            "field": {"type": "string"}, "reason": {"type": "string"}}},
    }

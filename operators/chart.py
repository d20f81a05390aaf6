"""values.schema.json of the Helm chart: the operator settings and the nightly regression suite are
checked at install time with the same schemas the operator, the CRD and `wam regress` use (generated from
the types).

`python -m wam.operators.chart` prints it; `make generate` writes the chart's copy, a test checks it."""

from __future__ import annotations

import json

from wam.operators.settings import OperatorSettings
from wam.platform.apischema import SchemaStyle, openapi
from wam.platform.crd import spec_schema
from wam.platform.suite import Suite


def json_schema(schema: dict) -> dict:
    """An OpenAPI v3 (Kubernetes structural) schema as JSON Schema: nullable becomes a null type, the
    Kubernetes extensions go, and declared objects refuse unknown keys (a typo fails the install)."""
    out = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "default"):
            continue
        if key == "properties":
            value = {name: json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            value = json_schema(value)
        out[key] = value
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not schema.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _object(description: str, **properties: dict) -> dict:
    return {"type": "object", "description": description, "properties": properties}


_STRING, _BOOL, _OBJECT, _LIST = {"type": "string"}, {"type": "boolean"}, {"type": "object"}, {"type": "array"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}


def suite_schema() -> dict:
    """A regression suite (configs/regress/*.yaml): its TrainJob spec checked as the CRD checks one."""
    schema = openapi(Suite, SchemaStyle(defaults=False))
    schema["properties"]["trainJob"] = {**spec_schema(), "description": "The TrainJob spec trained."}
    return schema


def values_schema() -> dict:
    image = _object("A container image.", repository=_STRING, tag=_STRING,
                    pullPolicy={"type": "string", "enum": ["Always", "IfNotPresent", "Never"]})
    schema = _object(
        "Values of the wam-platform chart.",
        image=image,
        imagePullSecrets=_LIST,
        operator=_object("The operator Deployment.", logFormat={"type": "string", "enum": ["json", "plain"]},
                         verbose=_BOOL, metricsPort=_PORT, healthPort=_PORT, resources=_OBJECT,
                         nodeSelector=_OBJECT, tolerations=_LIST, affinity=_OBJECT, podAnnotations=_OBJECT),
        settings=openapi(OperatorSettings, SchemaStyle(defaults=False, partial=True)),
        mlflow=_object("In-cluster MLflow server, or an external one.", enabled=_BOOL,
                       image=_object("", repository=_STRING, tag=_STRING), port=_PORT,
                       persistence=_object("", size=_STRING, storageClass=_STRING),
                       artifactsDestination=_STRING, secretRefs={"type": "array", "items": _STRING},
                       trackingUri=_STRING, externalUrl=_STRING, resources=_OBJECT),
        monitoring=_object("Prometheus Operator objects: policy servers, the operator, a fleet's alerts, a Grafana "
                           "dashboard.", enabled=_BOOL, labels=_OBJECT, rules=_BOOL, dashboard=_BOOL,
                           interval={"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}),
        nightly=_object("Nightly regression suite, run by `wam regress`.", enabled=_BOOL, schedule=_STRING,
                        updateBaseline=_BOOL, pollSeconds={"type": "number", "exclusiveMinimum": 0},
                        resources=_OBJECT, suite=suite_schema()),
    )
    schema["properties"]["settings"]["properties"].pop("mlflow")  # the chart fills it from mlflow.*
    return {"$schema": "https://json-schema.org/draft-07/schema#", **json_schema(schema)}


def render() -> str:
    return json.dumps(values_schema(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    print(render(), end="")

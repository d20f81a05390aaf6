"""The TrainJob CustomResourceDefinition, generated from the API types (wam.platform.trainjob).

`python -m wam.platform.crd` prints it; the Helm chart's copy is written by `make crds` and a test
checks that the two are equal.
"""

from __future__ import annotations

import yaml

from wam.platform import trainjob
from wam.platform.apischema import SchemaStyle, openapi
from wam.platform.config import WamConfig

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Accelerator", "type": "string", "jsonPath": ".spec.resources.accelerator"},
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.resources.nodes"},
    {"name": "Step", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "Loss", "type": "number", "format": "float", "jsonPath": ".status.progress.loss"},
    {"name": "Checkpoint", "type": "integer", "jsonPath": ".status.checkpoint.step", "priority": 1},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def spec_schema() -> dict:
    schema = openapi(trainjob.TrainJobSpec)
    config = schema["properties"]["config"]
    # The overrides follow the training YAML's own schema (snake_case keys, every field optional, no
    # defaults: an override holds only what it changes).
    schema["properties"]["config"] = {**openapi(WamConfig, SchemaStyle(defaults=False, partial=True, camel_case=False)),
                                      **{k: v for k, v in config.items() if k not in ("type", "x-kubernetes-preserve-unknown-fields")}}
    return schema


def trainjob_crd() -> dict:
    root = {
        "type": "object",
        "description": "A training run of a World Action Model: gang-scheduled pods, checkpoints, handoff to "
                       "quantization and serving.",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": openapi(trainjob.TrainJobStatus, SchemaStyle(defaults=False)),
        },
        "required": ["spec"],
        "x-kubernetes-validations": [{
            "rule": f"self.metadata.name.size() <= {trainjob.MAX_NAME_LENGTH}",
            "message": f"metadata.name must be at most {trainjob.MAX_NAME_LENGTH} characters (pod hostnames derived "
                       "from it must stay within 63)",
        }, {
            "rule": f"self.metadata.name.matches('{trainjob.DNS_LABEL}')",
            "message": "metadata.name must be a DNS label (lowercase letters, digits and '-'): it names the job's pods",
        }],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{trainjob.PLURAL}.{trainjob.GROUP}"},
        "spec": {
            "group": trainjob.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": trainjob.KIND,
                "listKind": f"{trainjob.KIND}List",
                "plural": trainjob.PLURAL,
                "singular": trainjob.KIND.lower(),
                "shortNames": list(trainjob.SHORT_NAMES),
                "categories": list(trainjob.CATEGORIES),
            },
            "versions": [{
                "name": trainjob.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


def render() -> str:
    header = "# Generated from wam.platform.trainjob by `make crds`; do not edit.\n"
    return header + yaml.safe_dump(trainjob_crd(), sort_keys=False, width=120)


if __name__ == "__main__":
    print(render(), end="")

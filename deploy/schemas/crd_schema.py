"""Turn an operator's CustomResourceDefinition into the bare JSON schema the manifest tests validate against.

Keeps only the data: the served storage version's `openAPIV3Schema`, without `description` texts
(the upstream prose stays upstream), without the CEL rules of `x-kubernetes-validations` (only an
API server evaluates them) and without `status` (written by the operator, never by us).

    git show v1.30.0:config/crd/bases/postgresql.cnpg.io_clusters.yaml \
        | python deploy/schemas/crd_schema.py > deploy/schemas/postgresql.cnpg.io_v1_cluster.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

DROPPED = ("description", "x-kubernetes-validations")


def strip(node: Any) -> Any:
    """`node` without descriptions and CEL rules, at every depth (a property named so is kept)."""
    if isinstance(node, dict):
        return {
            key: strip(value)
            for key, value in node.items()
            if not (key in DROPPED and isinstance(value, str | list))
        }
    if isinstance(node, list):
        return [strip(item) for item in node]
    return node


def crd_schema(crd: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of the CRD's storage version, keyed by its apiVersion and kind."""
    spec = crd["spec"]
    (version,) = [v for v in spec["versions"] if v.get("storage") and v.get("served")]
    schema = strip(version["schema"]["openAPIV3Schema"])
    schema.get("properties", {}).pop("status", None)
    return {
        "apiVersion": f"{spec['group']}/{version['name']}",
        "kind": spec["names"]["kind"],
        "schema": schema,
    }


def main() -> int:
    crd = yaml.safe_load(sys.stdin)
    json.dump(crd_schema(crd), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

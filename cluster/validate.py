"""Validate a Ray cluster-launcher config (ray_cluster.yaml) offline, the way `ray up` does before it calls the cloud.

    python -m cluster.validate ray_cluster.yaml      # from the repo root; exit 0 and "ok" when valid

Two checks, no cloud credentials or network needed:
1. Ray's own JSON schema shipped with the ray package (ray/autoscaler/ray-schema.json): only `cluster_name` and
   `provider.type` are required; unknown top-level keys are rejected.
2. Ray's own preparation and validation, the first steps of `ray up` (ray.autoscaler._private.commands.
   _bootstrap_config): `prepare_config` merges the provider's defaults.yaml and the setup commands, then
   `validate_config` checks the merged result (head_node_type among available_node_types, the sum of min_workers
   within max_workers, ...). `validate_config` on the raw YAML fails on purpose ("Missing 'cluster_synced_files'"):
   it expects a prepared config. Skipped: the provider's bootstrap (IAM roles, subnets, key pairs, AMI look-ups)
   and the filling of node resources from instance types, which call AWS; hence `resources` is set for every
   node type in ray_cluster.yaml.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def validate_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """Raise (jsonschema.ValidationError, ValueError, KeyError, ...) if invalid; return the prepared config."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, schema())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def main(argv: list[str] | None = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:]) or ["ray_cluster.yaml"]
    for path in paths:
        validate_cluster_config(yaml.safe_load(Path(path).read_text()))
        print(f"{path}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

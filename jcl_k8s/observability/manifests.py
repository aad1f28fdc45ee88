"""The observability manifests committed under manifests/, rendered with default settings.

`default_manifests()` gives each file's path (relative to the repository root)
and text; `python -m jcl_k8s.observability.manifests [ROOT]` rewrites them, and
a unit test checks that the committed files are what it gives. Deployments
with other settings render through `rules.prometheus_rule` and
`dashboard.grafana_configmap` instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from jcl_k8s.observability.dashboard import dashboard_json, grafana_configmap
from jcl_k8s.observability.rules import DEFAULTS, prometheus_rule

HEADER = "# Rendered by `python -m jcl_k8s.observability.manifests` with default settings.\n"


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (PromQL, the dashboard JSON) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockDumper.add_representer(str, _represent_str)


def to_yaml(document: dict[str, Any]) -> str:
    """A manifest as YAML, multi-line strings as blocks, keys in the given order."""
    return yaml.dump(document, Dumper=_BlockDumper, sort_keys=False, width=100)


def default_manifests() -> dict[str, str]:
    """Repository-relative path -> text of each observability manifest."""
    configmap = grafana_configmap(DEFAULTS["namespace"])
    return {
        "manifests/prometheusrule.yaml": HEADER + to_yaml(prometheus_rule()),
        "manifests/grafana/jcl-dashboard.json": dashboard_json(),
        "manifests/grafana/dashboard-configmap.yaml": HEADER + to_yaml(configmap),
    }


def write_default_manifests(root: Path) -> list[Path]:
    """Writes the default manifests under root; returns the paths written."""
    written = []
    for relative, text in default_manifests().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_default_manifests(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(written_path)

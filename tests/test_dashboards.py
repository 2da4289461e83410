"""The Grafana dashboard and the Prometheus alert rules in `deploy/` against the service.

Every metric they name must be one a live server exports, every query must be PromQL that
Prometheus accepts, and every alert must fire on the series that should raise it and stay
quiet on a healthy deployment (promtool's rule unit tests, `alerts.test.yml`)."""

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import live_api, local_settings
from tests.support.data import random_bytes
from tests.support.http import create_key, encrypt
from tests.support.metrics import scrape
from tests.support.project import REPO

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "sealstream.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
# Prometheus's own series about each scrape target.
SCRAPE_SERIES = {"up"}
# A metric's name is the identifier right before a label matcher or a range.
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]")
# Grafana's variables, replaced by values Prometheus itself accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$job": ".*"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: apt-get install prometheus (or run `make system`)")
    return path


def dashboard_queries() -> list[str]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_queries() -> list[str]:
    text = ALERTS.read_text()
    return [
        " ".join(expr.split())
        for expr in re.findall(r"expr: (?:>-\n)?((?:.|\n)*?)\n\s+(?:for|labels):", text)
    ]


def metric_names(query: str) -> set[str]:
    return set(SELECTOR.findall(query)) - {"by", "without"}


def exported_names(exposition: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{part}" for part in ("bucket", "count", "sum"))
    return names


def test_the_dashboard_is_a_grafana_dashboard_of_distinct_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["targets"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}


def test_every_query_names_only_metrics_the_service_exports(tmp_path: Path) -> None:
    with live_api(local_settings(tmp_path)) as api, api.client() as client:
        create_key(client)
        assert encrypt(client, random_bytes(4096, seed=1)).status_code == 200
        response, _ = scrape(api.url)
    exported = exported_names(response.text) | SCRAPE_SERIES

    queries = dashboard_queries() + alert_queries()
    assert len(alert_queries()) == ALERTS.read_text().count("- alert:")
    for query in queries:
        named = metric_names(query)
        assert named, query
        assert named <= exported, f"{sorted(named - exported)} in {query}"


def test_every_dashboard_query_is_promql_that_prometheus_accepts(tmp_path: Path) -> None:
    rules = []
    for number, query in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        rules.append({"record": f"dashboard:panel_{number}", "expr": query})
    rule_file = tmp_path / "dashboard-rules.yml"
    rule_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run(
        [promtool(), "check", "rules", str(rule_file)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    check = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr

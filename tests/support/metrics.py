"""Reading a live server's `GET /metrics` in tests."""

import ssl

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(
    url: str, accept: str = "text/plain", verify: ssl.SSLContext | bool = True
) -> tuple[httpx.Response, Samples]:
    response = httpx.get(  # with no token
        f"{url}/metrics", headers={"Accept": accept}, timeout=30, verify=verify
    )
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)

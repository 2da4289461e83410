"""The production topology as a cluster on this machine, in network namespaces
(`tests/support/cluster.py`): HAProxy in front of two API hosts, two Celery worker hosts
and beat, Redis under Sentinel (a primary, a replica, three sentinels), and the moto S3
server, reached by a client namespace that sees only the load balancer. Run by
`make cluster-test`, not by `make test`.

The chaos run drives a seeded mix of streams, key operations and jobs while it kills an
API host mid-stream and a worker host mid-job, fails the Redis primary over, restarts the
replica, takes S3 off the network, partitions an API host, and slows and drops the
traffic between an API host and S3; then proves that nothing the clients were told
succeeded was lost or changed, that nothing is half-stored, that every job ended once,
and that every key still works. `CLUSTER_SEED` and `CLUSTER_SECONDS` change its seed
and length.
"""

import os
import socket
from pathlib import Path

import pytest

from tests.support import chaos
from tests.support.cluster import API_PORT, cluster
from tests.support.data import MiB
from tests.support.netns import PREFIX, call_in, namespaces

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

SEED = int(os.environ.get("CLUSTER_SEED", "20261207"))
SECONDS = float(os.environ.get("CLUSTER_SECONDS", "180"))


def test_a_stream_crosses_the_cluster_and_nothing_is_left_behind(tmp_path: Path) -> None:
    with cluster(tmp_path) as the:
        made = [host.namespace for host in the.network.hosts.values()]
        client = the.network.client.namespace
        driver = chaos.Driver(the, seed=1)

        def round_trip() -> chaos.Operation:
            driver.create_key("smoke")
            return driver.stream_back("smoke", 3 * MiB + 5, seed=2)

        operation = call_in(client, round_trip)
        assert (operation.error, operation.lost) == (None, None)

        def reach_api_directly() -> None:
            socket.create_connection((the.network.hosts["api1"].address, API_PORT), timeout=2)

        with pytest.raises(OSError):  # the client reaches the load balancer and nothing else
            call_in(client, reach_api_directly)
    assert not set(made) & set(namespaces())
    assert not [name for name in namespaces() if the.network.suffix in name]


def test_chaos_loses_nothing_a_client_was_told_succeeded(tmp_path: Path) -> None:
    print(f"\ncluster chaos run: seed {SEED} (CLUSTER_SEED), {SECONDS:.0f} s (CLUSTER_SECONDS)")
    with cluster(tmp_path) as the:
        report = chaos.run(the, SEED, SECONDS)
    print(report.table())
    assert not report.ledger.violations
    assert not report.lost()
    assert not [
        name for name in namespaces() if name.startswith(PREFIX) and the.network.suffix in name
    ]

"""Hosts for the cluster test: Linux network namespaces on a bridge of their own, each
with one address, like machines on a LAN, plus a client namespace wired to the load
balancer's namespace alone.

Nothing touches the machine's own network: every link is created inside the namespaces
(the bridge lives in a namespace too), addresses come from a 10.x.y.0/24 range that no
interface or route of this machine's namespaces uses, and deleting the namespaces deletes
everything. Namespace names start with `PREFIX` and the creating process's id, so a run
killed before it could clean up is swept by the next one, and nothing else ever is.
Needs root (`ip netns`).
"""

import atexit
import ctypes
import ipaddress
import os
import random
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

PREFIX = "sealstream-cluster"
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")

T = TypeVar("T")


class NetworkError(RuntimeError):
    """The namespaces or links could not be set up."""


def ip(*args: str) -> str:
    """Run `ip` with `args`; its output, or NetworkError with what it said."""
    run = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {run.stderr.strip()}")
    return run.stdout


def run_in(namespace: str, *command: str) -> str:
    """Run `command` inside `namespace`; its output, or NetworkError."""
    run = subprocess.run(
        ["ip", "netns", "exec", namespace, *command], capture_output=True, text=True, check=False
    )
    if run.returncode != 0:
        raise NetworkError(f"{' '.join(command)} in {namespace}: {run.stderr.strip()}")
    return run.stdout


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def delete_namespace(name: str) -> None:
    """Kill every process left in the namespace, then delete it and its links."""
    with suppress(NetworkError):
        for pid in ip("netns", "pids", name).split():
            with suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    with suppress(NetworkError):
        ip("netns", "delete", name)


def sweep_leftovers() -> list[str]:
    """Delete the namespaces a previous run of this test left behind when it was killed:
    those named with `PREFIX` whose creating process is gone. Returns their names."""
    swept = []
    for name in namespaces():
        owner = name.removeprefix(f"{PREFIX}-").split("-", 1)[0]
        if name.startswith(f"{PREFIX}-") and owner.isdigit() and not _alive(int(owner)):
            delete_namespace(name)
            swept.append(name)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def networks_in_use() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Every IPv4 network an interface or a route of this machine's namespaces uses."""
    found = []
    for namespace in [None, *namespaces()]:
        where = ["-n", namespace] if namespace else []
        with suppress(NetworkError):
            for line in ip(*where, "-4", "-o", "addr", "show").splitlines():
                found.append(ipaddress.ip_interface(line.split()[3]).network)
            for line in ip(*where, "-4", "route", "show").splitlines():
                target = line.split()[0]
                if target != "default":
                    found.append(ipaddress.ip_network(target, strict=False))
    return found


def unused_range(rng: random.Random) -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that overlaps no network in use here."""
    used = networks_in_use()
    for _ in range(200):
        candidate = ipaddress.IPv4Network(f"10.{rng.randrange(64, 250)}.{rng.randrange(256)}.0/24")
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise NetworkError("no unused 10.x.y.0/24 range found")


@dataclass(frozen=True)
class Host:
    """One namespace: its role in the cluster, its name, its link and its address."""

    role: str
    namespace: str
    link: str
    address: str


class Network:
    """Namespaces for `roles` on one bridge, a client namespace wired only to the
    `front` host, and what changes their links (down, up, shaped, lossy).

    The backend hosts share the range's lower half (a /25); the client and the front
    host share a /30 of the upper half, and no namespace forwards packets, so the client
    reaches the front host's front address and nothing else.
    """

    def __init__(self, roles: Sequence[str], front: str) -> None:
        self.suffix = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.range = unused_range(random.Random(secrets.randbits(32)))
        self._link_tag = secrets.token_hex(3)
        self._created: list[str] = []
        self.hosts: dict[str, Host] = {}
        atexit.register(self.delete)
        try:
            self._build(roles, front)
        except BaseException:
            self.delete()
            raise

    def _namespace(self, role: str) -> str:
        name = f"{PREFIX}-{self.suffix}-{role}"
        ip("netns", "add", name)
        self._created.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def _build(self, roles: Sequence[str], front: str) -> None:
        hub = self._namespace("hub")
        ip("-n", hub, "link", "add", "bridge0", "type", "bridge")
        ip("-n", hub, "link", "set", "bridge0", "up")
        addresses = list(self.range.hosts())
        for index, role in enumerate(roles):
            namespace = self._namespace(role)
            link, peer = f"ss{self._link_tag}{index}", f"ss{self._link_tag}{index}h"
            ip("link", "add", link, "netns", namespace, "type", "veth", "peer", peer, "netns", hub)
            ip("-n", hub, "link", "set", peer, "master", "bridge0", "up")
            address = str(addresses[index])
            ip("-n", namespace, "addr", "add", f"{address}/25", "dev", link)
            ip("-n", namespace, "link", "set", link, "up")
            self.hosts[role] = Host(role, namespace, link, address)
        client = self._namespace("client")
        outer, inner = f"ss{self._link_tag}c", f"ss{self._link_tag}f"
        front_host = self.hosts[front]
        ip("link", "add", outer, "netns", client, "type", "veth", "peer", inner, "netns",
           front_host.namespace)  # fmt: skip
        front_address, client_address = str(addresses[128]), str(addresses[129])
        ip("-n", front_host.namespace, "addr", "add", f"{front_address}/30", "dev", inner)
        ip("-n", front_host.namespace, "link", "set", inner, "up")
        ip("-n", client, "addr", "add", f"{client_address}/30", "dev", outer)
        ip("-n", client, "link", "set", outer, "up")
        self.front_address = front_address
        self.client = Host("client", client, outer, client_address)

    def delete(self) -> None:
        """Kill what runs in the namespaces and delete them (their links go with them)."""
        while self._created:
            delete_namespace(self._created.pop())

    # Faults

    def set_link(self, role: str, up: bool) -> None:
        host = self.hosts[role]
        ip("-n", host.namespace, "link", "set", host.link, "up" if up else "down")

    def shape(self, role: str, towards: str, rate: str) -> None:
        """Hold what `role` sends to `towards` to `rate` (a tc rate, `16mbit`); the rest
        of its traffic is left alone. An htb class with a tbf under it, selected by a u32
        filter on the destination address."""
        host, target = self.hosts[role], self.hosts[towards]
        commands = [
            ["qdisc", "add", "dev", host.link, "root", "handle", "1:", "htb", "default", "20"],
            ["class", "add", "dev", host.link, "parent", "1:", "classid", "1:10", "htb",
             "rate", rate],
            ["class", "add", "dev", host.link, "parent", "1:", "classid", "1:20", "htb",
             "rate", "10gbit"],
            ["qdisc", "add", "dev", host.link, "parent", "1:10", "handle", "10:", "tbf",
             "rate", rate, "burst", "64kbit", "latency", "400ms"],
            ["filter", "add", "dev", host.link, "protocol", "ip", "parent", "1:", "prio", "1",
             "u32", "match", "ip", "dst", f"{target.address}/32", "flowid", "1:10"],
        ]  # fmt: skip
        for command in commands:
            run_in(host.namespace, "tc", *command)

    def unshape(self, role: str) -> None:
        host = self.hosts[role]
        run_in(host.namespace, "tc", "qdisc", "del", "dev", host.link, "root")

    def drop(self, role: str, source: str, percent: int) -> None:
        """Drop `percent` % of the packets `role` receives from `source` (nftables)."""
        host, origin = self.hosts[role], self.hosts[source]
        rules = (
            "table inet sealstream_chaos {\n"
            "  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            f"    ip saddr {origin.address} numgen random mod 100 < {percent} drop\n"
            "  }\n"
            "}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", host.namespace, "nft", "-f", "-"],
            input=rules,
            text=True,
            check=True,
            capture_output=True,
        )

    def undrop(self, role: str) -> None:
        run_in(self.hosts[role].namespace, "nft", "delete", "table", "inet", "sealstream_chaos")


# Code of this process that runs in a namespace


def enter(namespace: str) -> None:
    """Move the calling thread (only it: network namespaces are per thread) into
    `namespace`; sockets it opens from then on belong there, whichever thread uses them."""
    libc = ctypes.CDLL(None, use_errno=True)
    descriptor = os.open(NETNS_DIR / namespace, os.O_RDONLY)
    try:
        if libc.setns(descriptor, CLONE_NEWNET) != 0:
            raise NetworkError(f"setns {namespace}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(descriptor)


@contextmanager
def threads_in(namespace: str, count: int) -> Iterator[ThreadPoolExecutor]:
    """A pool of `count` threads, each inside `namespace`."""
    with ThreadPoolExecutor(count, thread_name_prefix=namespace, initializer=enter,
                            initargs=(namespace,)) as pool:  # fmt: skip
        yield pool


def call_in(namespace: str, function: Callable[[], T]) -> T:
    """`function()`, called on a thread inside `namespace`."""
    with threads_in(namespace, 1) as pool:
        return pool.submit(function).result()

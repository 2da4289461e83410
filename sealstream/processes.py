"""How `sealstream serve` runs the API: in one process, or as a supervisor and
`SEALSTREAM_WORKERS` server processes answering on one listening socket.

With several, the supervisor (uvicorn's) binds the socket, starts the processes, pings
them, and starts a new one in place of one that dies or stops answering. Each builds the
app from the same settings. What there must be one of for the whole server is settled
before any starts:

- the admin token: generated, if none is supplied, by the command, and handed to all;
- the KEK and the store's record key: the parts are built once here, which creates
  them on a first start, so the processes find them rather than race to create them;
- the directory the processes share their metrics in (prometheus_client's multiprocess
  mode): made here, private to the server's user, and removed at exit;
- the server-wide limits: `max_streams` and `keygen_threads` are split evenly among the
  processes.

Jobs run in-process live in one process's memory (their queue, their records), so more
than one process needs Redis; the default is then 1.
"""

import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import multiprocess
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from api.serving import server_options
from sealstream.capacity import usable_cpus
from sealstream.memory import keep_freed_buffers
from sealstream.server import create_app
from sealstream.settings import Settings
from sealstream.wiring import ConfigurationError, build_parts

logger = logging.getLogger(__name__)

# prometheus_client reads it when a process first imports it: the supervisor sets it
# before starting any server process.
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_PR_SET_PDEATHSIG = 1
# Seconds a server process may leave the supervisor's ping unanswered before it is taken
# for hung, killed and replaced. uvicorn's 5 is shorter than a process can take to
# import the service on a loaded machine, which it must do before it can answer.
HEALTHCHECK_TIMEOUT = 30


def server_processes(settings: Settings) -> int:
    """How many processes serve: `workers` if set, else the usable CPUs with Redis, or 1
    with in-process jobs. `ConfigurationError` for more than 1 without Redis."""
    if settings.workers is None:
        return usable_cpus() if settings.redis_url else 1
    if settings.workers > 1 and not settings.redis_url:
        raise ConfigurationError(
            f"SEALSTREAM_WORKERS: {settings.workers} processes need SEALSTREAM_REDIS_URL "
            "(jobs run in-process live in one process's memory); set it, or serve with 1"
        )
    return settings.workers


class Launch:
    """A server ready to start, once `settings` are checked, and what a first start needs
    (the KEK, the record key) created: the app itself when one process serves.
    `ConfigurationError` if they cannot make a working server."""

    def __init__(self, settings: Settings) -> None:
        keep_freed_buffers()
        self.settings = settings
        self.processes = server_processes(settings)
        self._options = server_options(settings)  # the TLS certificate and key load
        self._app = create_app(settings) if self.processes == 1 else None
        if self._app is None:
            build_parts(settings)

    def run(self) -> None:
        """Serve until stopped."""
        if self._app is not None:
            uvicorn.run(self._app, log_level="info", **self._options)
            return
        metrics_dir = Path(tempfile.mkdtemp(prefix="sealstream-metrics-"))  # mode 0700
        os.environ[METRICS_DIR_VARIABLE] = str(metrics_dir)
        try:
            share = share_of(self.settings, self.processes)
            config = ServerProcessConfig(share, metrics_dir, self.processes)
            listener = config.bind_socket()
            # Listening from now, not from when a process first starts to accept: a
            # connection made meanwhile waits in the backlog rather than being refused.
            listener.listen(config.backlog)
            Supervisor(config, sockets=[listener], metrics_dir=metrics_dir).run()
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def share_of(settings: Settings, processes: int) -> Settings:
    """The settings each of `processes` processes serves with: the server's, with its
    share of the server-wide limits. A plain `Settings`, which pickles."""
    values = {name: getattr(settings, name) for name in Settings.model_fields}
    for limit in ("max_streams", "max_streams_per_tenant", "keygen_threads"):
        if values[limit] is not None:
            values[limit] = max(1, values[limit] // processes)
    return Settings.model_construct(**values)


class ServerProcessConfig(uvicorn.Config):
    """uvicorn's configuration of one of several server processes. It is pickled to each
    (uvicorn starts them with `spawn`), so it holds the settings rather than an app, and
    the app is built in the process that loads it."""

    def __init__(self, settings: Settings, metrics_dir: Path, processes: int) -> None:
        super().__init__(
            "sealstream.server:create_app",  # for show: `load_app` builds it
            log_level="info",
            workers=processes,
            timeout_worker_healthcheck=HEALTHCHECK_TIMEOUT,
            **server_options(settings),
        )
        self.settings = settings
        self.metrics_dir = metrics_dir
        self.supervisor = os.getpid()  # built there, pickled to each server process

    def load_app(self) -> Any:
        _stop_with_the_supervisor(self.supervisor)
        keep_freed_buffers()
        try:
            return create_app(self.settings, self.metrics_dir)
        except ConfigurationError as error:  # checked before: changed since
            logger.error("cannot start: %s", error)
            sys.exit(STARTUP_FAILURE)  # tells the supervisor not to start it again


class Supervisor(Multiprocess):
    """uvicorn's supervisor, which also retires a dead process's metrics: its counts stay
    in the totals, its requests in progress leave them."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], metrics_dir: Path):
        super().__init__(config, sockets)
        self.metrics_dir = metrics_dir
        self._started: set[int] = set()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        running = {process.pid for process in self.processes if process.pid is not None}
        for pid in self._started - running:
            logger.info("server process %d is gone", pid)
            multiprocess.mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
        self._started = running


def _stop_with_the_supervisor(supervisor: int) -> None:
    """Have the kernel send this process SIGTERM when the supervisor dies, however it
    dies (killed, it cannot stop its processes itself): no process serves on unsupervised.
    A supervisor that died before this was asked, while the process was still starting,
    has left it to another parent: it stops at once."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:
        logger.error("the supervisor is gone; not starting")
        sys.exit(STARTUP_FAILURE)

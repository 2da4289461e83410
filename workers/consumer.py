"""The worker's consumer of the broker, patient with a Redis that refuses it.

A Redis under `min-replicas-to-write` with its replica away answers every write with
NOREPLICAS, and the consumer's first steps (taking the lock that restores unacknowledged
tasks, popping the queue) are writes. Celery retries such an error as it retries a lost
connection (`broker_channel_error_retry`), but the connection itself succeeds at once, so
it would retry several times a second for as long as the replica is away. This consumer
waits longer after each refusal in a row, up to `MAX_BACKOFF` seconds, and starts over
once a minute has passed without one.
"""

import logging
import time

from celery.worker.consumer import Consumer

logger = logging.getLogger(__name__)

FIRST_BACKOFF = 0.5  # seconds
MAX_BACKOFF = 10.0
CALM = 60.0  # seconds without a refusal after which the backoff starts over


class PatientConsumer(Consumer):
    """Celery's consumer, backing off exponentially while the broker keeps failing."""

    _refusals = 0
    _last_refusal = 0.0

    def on_connection_error_before_connected(self, exc: Exception) -> None:
        super().on_connection_error_before_connected(exc)
        self._back_off()

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        super().on_connection_error_after_connected(exc)
        self._back_off()

    def _back_off(self) -> None:
        now = time.monotonic()
        if now - self._last_refusal > CALM:
            self._refusals = 0
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2**self._refusals)
        self._refusals += 1
        logger.warning(
            "the broker failed %d times in a row; next try in %.1f s", self._refusals, delay
        )
        time.sleep(delay)
        self._last_refusal = time.monotonic()

"""Thread pools shared by a whole process that a fork does not break: a forked child gets
a pool of its own, since the parent's threads do not exist there, and a copied pool would
count them as idle and never run what it is given (`sealstream serve --workers N` forks
its server processes)."""

import os
from concurrent.futures import ThreadPoolExecutor


class ForkSafePool:
    """A `ThreadPoolExecutor` (as large as the default: the CPUs, and a few), renewed in a
    forked child; its threads are named `name`-N."""

    executor: ThreadPoolExecutor

    def __init__(self, name: str) -> None:
        self._name = name
        self._renew()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self.executor = ThreadPoolExecutor(thread_name_prefix=self._name)

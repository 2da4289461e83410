"""The pool an upload into storage hashes its plaintext on (services.seal_to_storage)."""

import os

from services.seal_to_storage import HASHING


def test_a_forked_child_hashes_on_a_pool_of_its_own() -> None:
    # Threads started here, idle by the time of the fork: a pool copied into the child
    # would count them as idle there too, and never run what it is given.
    for future in [HASHING.executor.submit(sum, range(n)) for n in range(8)]:
        future.result()
    child = os.fork()
    if child == 0:
        try:
            done = HASHING.executor.submit(sum, range(4)).result(timeout=10) == 6
        except BaseException:
            done = False
        os._exit(0 if done else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0

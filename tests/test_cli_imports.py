"""The client imports none of the server: `cli.client`, `cli.transport` and `cli.main`
load in a fresh interpreter without the web framework, the job queue, the AWS SDK or any
of the service's own packages (the client may use `envelope`, and nothing else of ours)."""

import json
import subprocess
import sys

CLIENT_MODULES = ("cli.client", "cli.transport", "cli.main")
SERVER_STACK = ("fastapi", "starlette", "celery", "boto3", "botocore", "uvicorn")
SERVICE_PACKAGES = ("api", "workers", "services", "sealstream", "keystore", "storage")


def test_importing_the_client_loads_nothing_of_the_server() -> None:
    unwanted = SERVER_STACK + SERVICE_PACKAGES
    probe = "\n".join(
        [
            "import importlib, json, sys",
            *(f"importlib.import_module({module!r})" for module in CLIENT_MODULES),
            f"print(json.dumps([name for name in {unwanted!r} if name in sys.modules]))",
        ]
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(run.stdout) == []

"""The `sealstream` commands for the whole API (keys, tokens, jobs), their output, exit
statuses, profiles, completion and interruption, against a live API server."""

import io
import json
import os
import pty
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from cli.config import Profile, resolve
from cli.main import command_line
from envelope import key_names, parse_header
from tests.conftest import ADMIN_TOKEN, Api
from tests.support.http import DOCUMENTED_KEY

SEALSTREAM = str(Path(sys.executable).with_name("sealstream"))
KID = DOCUMENTED_KEY["kid"]

# The commands reach storage only through the API: one backend is enough.
local = pytest.mark.parametrize("api", ["local"], indirect=True)


def run(
    api: Api | None,
    *args: str,
    token: str | None = ADMIN_TOKEN,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    cwd: Path | None = None,
) -> "subprocess.CompletedProcess[str]":
    """`sealstream ARGS` against `api`, with no configuration file of the user's."""
    environ = {
        name: value for name, value in os.environ.items() if not name.startswith("SEALSTREAM_")
    }
    environ["SEALSTREAM_CONFIG"] = "/nonexistent/config.toml"
    if api is not None:
        environ["SEALSTREAM_URL"] = api.url
    if token is not None:
        environ["SEALSTREAM_TOKEN"] = token
    environ |= env or {}
    result = subprocess.run(
        [SEALSTREAM, *args], input=stdin, env=environ, capture_output=True, timeout=120, cwd=cwd
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode("latin-1"), result.stderr.decode()
    )


def run_json(api: Api, *args: str, **options: Any) -> dict[str, Any]:
    result = run(api, *args, "--json", **options)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert isinstance(document, dict)
    return document


@local
def test_keys_through_their_whole_life(api: Api, tmp_path: Path) -> None:
    created = run_json(api, "keys", "create", KID)
    assert (created["kid"], created["alg"], created["status"]) == (KID, "AES-256", "enabled")
    listed = run(api, "keys", "list")
    assert listed.returncode == 0 and KID in listed.stdout and "kty" in listed.stdout

    assert run_json(api, "keys", "rotate", KID)["primaryVersion"] == 2
    assert run_json(api, "keys", "disable", KID)["status"] == "disabled"
    refused = run(api, "encrypt", "--kid", KID, stdin=b"x")
    assert refused.returncode == 6 and "key-disabled" in refused.stderr  # conflict
    assert run_json(api, "keys", "enable", KID)["status"] == "enabled"

    not_exportable = run(api, "keys", "export", KID)
    assert not_exportable.returncode == 4 and "key-not-exportable" in not_exportable.stderr

    run_json(api, "keys", "create", "portable", "--exportable")
    exported = tmp_path / "portable.jwk"
    assert run(api, "keys", "export", "portable", "-o", str(exported)).returncode == 0
    assert exported.stat().st_mode & 0o077 == 0
    assert json.loads(exported.read_text())["kid"] == "portable#1"
    imported = run_json(api, "keys", "import", "copy", str(exported))
    assert (imported["kid"], imported["origin"]) == ("copy", "imported")
    assert (
        run_json(api, "keys", "patch", "portable", "--exportable", "false")["exportable"] is False
    )

    pending = run_json(api, "keys", "delete", "copy", "--pending-window-days", "1")
    assert pending["status"] == "pending-deletion"
    assert run_json(api, "keys", "cancel-deletion", "copy")["status"] == "disabled"

    missing = run(api, "keys", "get", "no-such-key")
    assert missing.returncode == 5
    assert missing.stderr.strip() == ("sealstream: key-not-found: no key 'no-such-key' (HTTP 404)")


@local
def test_tokens_and_what_they_allow(api: Api) -> None:
    issued = run_json(
        api, "tokens", "create", "--tenant", "acme", "--scope", "keys:read", "--name", "reader"
    )
    token = str(issued["token"])
    listed = run_json(api, "tokens", "list", "--tenant", "acme")
    assert [entry["id"] for entry in listed["tokens"]] == [issued["id"]]

    # --token=VALUE, and a token that looks like an option, are taken as tokens.
    assert run(api, "keys", "list", f"--token={token}", token=None).returncode == 0
    assert run(api, "keys", "create", "k", "--token", token, token=None).returncode == 4
    dashed = run(api, "keys", "list", "--token", "-not-a-token", token=None)
    assert dashed.returncode == 4 and "invalid-token" in dashed.stderr

    assert run_json(api, "tokens", "revoke", str(issued["id"]))["revokedAt"]
    revoked = run(api, "keys", "list", token=token)
    assert revoked.returncode == 4 and "token-revoked" in revoked.stderr


@local
def test_a_token_written_to_a_file_is_never_shown(api: Api, tmp_path: Path) -> None:
    kept = tmp_path / "acme.token"
    scope = ("--tenant", "acme", "--scope", "keys:read")
    issued = run(api, "tokens", "create", *scope, "-o", str(kept), "--json")
    assert issued.returncode == 0, issued.stderr
    token = kept.read_text().strip()
    assert kept.stat().st_mode & 0o077 == 0
    assert token not in issued.stdout + issued.stderr and "token" not in json.loads(issued.stdout)
    assert run(api, "keys", "list", "--token-file", str(kept), token=None).returncode == 0

    # A file already there is left alone, and no token is issued for it.
    refused = run(api, "tokens", "create", *scope, "-o", str(kept))
    assert refused.returncode == 2 and kept.read_text().strip() == token
    listed = run_json(api, "tokens", "list", "--tenant", "acme")["tokens"]
    assert [entry["id"] for entry in listed] == [json.loads(issued.stdout)["id"]]
    # A refused request leaves no file.
    unheld = run(api, "tokens", "create", *scope, "-o", str(tmp_path / "no.token"), token=token)
    assert unheld.returncode == 4 and not (tmp_path / "no.token").exists()


@local
def test_jobs_start_watch_and_end(api: Api, tmp_path: Path) -> None:
    run_json(api, "keys", "create", KID)
    for name in ("a", "b"):
        stored = run(api, "encrypt", "--kid", KID, "--to-storage", f"in/{name}", stdin=b"x" * 5000)
        assert stored.returncode == 0, stored.stderr

    verified = run_json(api, "jobs", "verify", "in/a", "--wait")
    assert (verified["kind"], verified["status"]) == ("verify", "succeeded")
    assert run(api, "jobs", "get", str(verified["id"])).stdout.count("succeeded") == 1
    finished = run(api, "jobs", "cancel", str(verified["id"]))
    assert finished.returncode == 6 and "job-finished" in finished.stderr

    batch = run_json(
        api, "jobs", "batch-encrypt", "--kid", KID, "--source-prefix", "in/", "--to-prefix",
        "out/", "--wait",
    )  # fmt: skip
    assert batch["status"] == "succeeded"
    assert batch["progress"]["itemsDone"] == 2

    run_json(api, "keys", "rotate", KID)
    moved = run_json(api, "jobs", "reencrypt", "--kid", KID, "--prefix", "in/", "--wait")
    assert moved["result"]["reencrypted"] == 2

    page = run_json(api, "jobs", "list", "--kind", "verify")
    assert all(job["kind"] == "verify" for job in page["jobs"])
    assert run(api, "jobs", "watch", "job_nosuchjob").returncode == 5


@local
def test_profiles_pick_the_server_and_the_token(api: Api, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    config = tmp_path / "config.toml"
    config.write_text(
        f'[default]\nurl = "http://127.0.0.1:1"\n\n'
        f'[here]\nurl = "{api.url}"\ntoken_file = "{token_file}"\nkid = "{KID}"\n\n'
        f'[by-command]\nurl = "{api.url}"\ntoken_command = "cat {token_file}"\n'
    )
    env = {"SEALSTREAM_CONFIG": str(config)}
    assert (
        run(None, "keys", "create", KID, "--profile", "here", token=None, env=env).returncode == 0
    )
    # The profile's kid is the default key; SEALSTREAM_PROFILE picks the profile.
    sealed = run(None, "encrypt", token=None, env=env | {"SEALSTREAM_PROFILE": "here"}, stdin=b"hi")
    assert sealed.returncode == 0, sealed.stderr
    by_command = run(None, "keys", "list", "--profile", "by-command", token=None, env=env)
    assert by_command.returncode == 0 and KID in by_command.stdout
    # The environment overrides the profile; the default profile points nowhere.
    assert run(api, "keys", "list", env=env).returncode == 0
    unreachable = run(None, "keys", "list", env=env)
    assert unreachable.returncode == 1 and "cannot connect" in unreachable.stderr
    unknown = run(None, "keys", "list", "--profile", "nope", env=env)
    assert unknown.returncode == 2 and "no profile 'nope'" in unknown.stderr


def test_the_dev_token_serves_the_local_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".sealstream").mkdir()
    (tmp_path / ".sealstream" / "dev-token").write_text("ssa_dev\n")
    monkeypatch.chdir(tmp_path)
    nowhere = {"SEALSTREAM_CONFIG": str(tmp_path / "none.toml")}
    assert resolve(Profile(), None, nowhere).token == "ssa_dev"
    elsewhere = resolve(Profile(url="https://example.test"), None, nowhere)
    assert elsewhere.token is None
    given = resolve(Profile(), None, nowhere | {"SEALSTREAM_TOKEN": "mine"})
    assert given.token == "mine"


# Ctrl-C as a shell delivers it to a command in the foreground: a child inherits an ignored
# SIGINT (the test runner's workers may ignore it), and Python then leaves it ignored.
DEFAULT_SIGINT_THEN_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


@local
def test_an_interrupted_transfer_leaves_no_output_that_looks_whole(
    api: Api, tmp_path: Path
) -> None:
    run_json(api, "keys", "create", KID)
    output = tmp_path / "out.enc"
    output.write_bytes(b"the previous contents")
    partial = tmp_path / "out.enc.partial"
    # PYTHONFAULTHANDLER: a command that does not stop dumps its threads on SIGABRT.
    env = {
        **os.environ,
        "SEALSTREAM_URL": api.url,
        "SEALSTREAM_TOKEN": ADMIN_TOKEN,
        "PYTHONFAULTHANDLER": "1",
    }
    command = [SEALSTREAM, "encrypt", "--kid", KID, "--frame-length", "4096", "-o", str(output)]
    process = subprocess.Popen(
        [sys.executable, "-c", DEFAULT_SIGINT_THEN_EXEC, *command],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdin is not None and process.stderr is not None
    try:
        deadline = time.monotonic() + 30
        while not partial.exists() and time.monotonic() < deadline:
            process.stdin.write(b"p" * 65536)
            process.stdin.flush()
            time.sleep(0.05)
        assert partial.exists()
        process.send_signal(signal.SIGINT)
        assert _exit_status(process, timeout=30) == 130
        assert "interrupted" in process.stderr.read().decode()
    finally:
        process.kill()
        process.wait()
    assert not partial.exists()
    assert output.read_bytes() == b"the previous contents"


def _exit_status(process: "subprocess.Popen[bytes]", timeout: float) -> int:
    """The process's exit status; if it has not ended by then, a failure that shows
    where each of its threads stood."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _, stderr = process.communicate(timeout=10)
        pytest.fail(f"still running {timeout} s after SIGINT:\n{stderr.decode()}")


@local
def test_progress_shows_on_a_terminal_only(api: Api, tmp_path: Path) -> None:
    run_json(api, "keys", "create", KID)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(os.urandom(4 * 1024 * 1024))
    piped = run(api, "encrypt", "--kid", KID, str(plain), "-o", str(tmp_path / "piped.enc"))
    assert piped.returncode == 0 and "encrypt" not in piped.stderr

    sealed = tmp_path / "tty.enc"
    drawn = _on_a_terminal(api, "encrypt", "--kid", KID, str(plain), "-o", str(sealed))
    assert "encrypt" in drawn and "/s" in drawn and "/4.2 MB" in drawn
    assert sealed.stat().st_size > plain.stat().st_size

    # From storage, the bar learns the length from the response.
    assert run(api, "encrypt", "--kid", KID, str(plain), "--to-storage", "p").returncode == 0
    drawn = _on_a_terminal(api, "decrypt", "--from-storage", "p", "-o", str(tmp_path / "p.out"))
    assert "decrypt" in drawn and "/4.2 MB" in drawn
    assert (tmp_path / "p.out").read_bytes() == plain.read_bytes()

    # A watched job: bars for its items and bytes, then the job.
    drawn = _on_a_terminal(api, "jobs", "verify", "p", "--wait")
    assert "1/1 items" in drawn and "bytes" in drawn and "succeeded" in drawn


def _on_a_terminal(api: Api, *args: str) -> str:
    """`sealstream ARGS` with its stderr on a terminal: what it drew there."""
    leader, follower = pty.openpty()
    env = {**os.environ, "SEALSTREAM_URL": api.url, "SEALSTREAM_TOKEN": ADMIN_TOKEN}
    subprocess.run([SEALSTREAM, *args], stderr=follower, env=env, timeout=60, check=True)
    os.close(follower)
    return _drain(leader)


def _drain(descriptor: int) -> str:
    chunks = []
    try:
        while chunk := os.read(descriptor, 65536):
            chunks.append(chunk)
    except OSError:
        pass  # the terminal's other end closed
    os.close(descriptor)
    return b"".join(chunks).decode(errors="replace")


# Help and completion: no server needed.


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        assert command is not None
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def test_every_command_has_a_description_and_plain_help() -> None:
    root = command_line()
    runner = CliRunner()
    paths = list(_commands(root))
    assert {("serve",), ("upgrade-records",), ("keys", "rotate"), ("jobs", "watch")} <= set(paths)
    for path in paths:
        shown = runner.invoke(root, [*path, "--help"])
        assert shown.exit_code == 0, (path, shown.output)
        for internal in ("null}", "dict[", "list[", "SecretStr", "default factory", "NoneType"):
            assert internal not in shown.output, (path, internal)
        command: click.Command = root
        for name in path:
            assert isinstance(command, click.Group)
            found = command.get_command(click.Context(command), name)
            assert found is not None
            command = found
        assert command.get_short_help_str(), path


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell: str) -> None:
    script = run(None, "completion", shell)
    assert script.returncode == 0 and "_SEALSTREAM_COMPLETE" in script.stdout
    if shell == "bash":
        loaded = subprocess.run(
            ["bash", "-c", f"{script.stdout}\ncomplete -p sealstream"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert loaded.returncode == 0 and "sealstream" in loaded.stdout, loaded.stderr
        words = run(
            None,
            env={"_SEALSTREAM_COMPLETE": "bash_complete", "COMP_WORDS": "sealstream ke",
                 "COMP_CWORD": "1"},
        )  # fmt: skip
        assert "keys" in words.stdout


@local
def test_stored_objects_and_key_versions(api: Api) -> None:
    run_json(api, "keys", "create", KID)
    for name in ("a", "b"):
        stored = run(api, "encrypt", "--kid", KID, "--to-storage", f"o/{name}", stdin=b"x" * 100)
        assert stored.returncode == 0, stored.stderr
    listed = run_json(api, "objects", "list", "--prefix", "o/")
    assert [(entry["key"], entry["keyVersion"]) for entry in listed["objects"]] == [
        ("o/a", 1),
        ("o/b", 1),
    ]
    assert len(run_json(api, "keys", "objects", KID, "--version", "1")["objects"]) == 2
    in_use = run(api, "keys", "retire", KID, "1", "--confirm", f"{KID}#1")
    assert in_use.returncode == 6, in_use.stderr  # conflict: objects still use it

    run_json(api, "keys", "rotate", KID)
    run_json(api, "jobs", "reencrypt", "--kid", KID, "--prefix", "o/", "--wait")
    assert run_json(api, "keys", "objects", KID, "--version", "1")["objects"] == []
    retired = run(api, "keys", "retire", KID, "1", "--confirm", f"{KID}#1")
    assert retired.returncode == 0, retired.stderr
    kept = run_json(api, "keys", "cancel-retirement", KID, "1")
    assert kept["versions"][0]["retiredAt"] is None
    assert run(api, "keys", "cancel-retirement", KID, "1").returncode == 6  # not retired

    assert run(api, "objects", "delete", "o/a").returncode == 0
    assert [entry["key"] for entry in run_json(api, "objects", "list")["objects"]] == ["o/b"]
    assert run(api, "objects", "delete", "o/a").returncode == 5


@local
def test_sign_and_verify(api: Api, tmp_path: Path) -> None:
    signer = run_json(api, "keys", "create", "signer", "--kty", "EC")
    assert signer["alg"] == "ES256"
    document = tmp_path / "contract.txt"
    document.write_text("we agree\n")
    signature = tmp_path / "contract.jws"
    signed = run(api, "sign", "--kid", "signer", str(document), "-o", str(signature))
    assert signed.returncode == 0, signed.stderr
    verdict = run_json(api, "verify", str(document), "--signature", str(signature))
    assert verdict["valid"] is True
    document.write_text("we do not agree\n")
    refused = run(api, "verify", str(document), "--signature", str(signature))
    assert refused.returncode == 1 and "signature-invalid" in refused.stderr


@local
def test_an_archive_streamed_in_and_its_manifest_read_back(api: Api, tmp_path: Path) -> None:
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in {"a.txt": b"alpha", "../evil": b"escape"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    run(api, "keys", "create", KID)
    sealed = run(api, "encrypt-archive", str(archive), "--kid", KID, "--to-storage", "out/")
    assert sealed.returncode == 0, sealed.stderr
    assert "refused: ../evil" in sealed.stderr
    document = run_json(api, "manifest", "out/")
    assert document["complete"] is True
    # Listed in the order they ended: a refusal may come before a member still sealing.
    assert sorted((m["path"], m["status"]) for m in document["members"]) == [
        ("../evil", "refused"),
        ("a.txt", "sealed"),
    ]
    again = run(api, "encrypt-archive", str(archive), "--kid", KID, "--to-storage", "out/")
    assert again.returncode == 6, again.stderr  # the manifest exists: 409


@local
def test_archives_and_batch_jobs_can_hide_member_names(api: Api, tmp_path: Path) -> None:
    archive = tmp_path / "hr.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("jane-doe.pdf")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"fired"))
    run(api, "keys", "create", KID)
    sealed = run(
        api, "encrypt-archive", str(archive), "--kid", KID, "--to-storage", "hr/",
        "--names", "encrypted",
    )  # fmt: skip
    assert sealed.returncode == 0, sealed.stderr
    assert [m["path"] for m in run_json(api, "manifest", "hr/")["members"]] == ["jane-doe.pdf"]
    stored = run(api, "encrypt", "--kid", KID, "--to-storage", "in/jane-doe.txt", stdin=b"x")
    assert stored.returncode == 0, stored.stderr
    batch = run_json(
        api, "jobs", "batch-encrypt", "--kid", KID, "--source-prefix", "in/", "--to-prefix",
        "hidden/", "--names", "encrypted", "--wait",
    )  # fmt: skip
    assert (batch["status"], batch["params"]["names"]) == ("succeeded", "encrypted")
    keys = [info.key for info in api.objects.list("tenants/default/")]
    assert not any("jane-doe" in key for key in keys if not key.startswith("tenants/default/in/"))


@local
def test_reencrypt_resign_and_several_recipients(api: Api, tmp_path: Path) -> None:
    for kid, kty in (("cliAes", "oct"), ("cliPq", "ML-KEM"), ("cliSign", "EC"), ("cliSign2", "EC")):
        assert run(api, "keys", "create", kid, "--kty", kty).returncode == 0
    plain, sealed, moved = tmp_path / "plain.bin", tmp_path / "sealed.enc", tmp_path / "moved.enc"
    plain.write_bytes(os.urandom(70_000))
    both = run(api, "encrypt", str(plain), "--kid", "cliAes", "--kid", "cliPq", "-o", str(sealed))
    assert both.returncode == 0, both.stderr
    assert key_names(parse_header(sealed.read_bytes())) == ["cliAes#1", "cliPq#1"]
    assert parse_header(sealed.read_bytes()).signed  # several recipients: signed
    again = run(api, "reencrypt", str(sealed), "--kid", "cliAes", "-o", str(moved))
    assert again.returncode == 0, again.stderr
    assert key_names(parse_header(moved.read_bytes())) == ["cliAes#1"]
    opened = run(api, "decrypt", str(moved), "--kid", "cliAes")
    assert opened.returncode == 0 and opened.stdout.encode("latin-1") == plain.read_bytes()

    stored = run_json(api, "encrypt", str(plain), "--kid", "cliAes", "--to-storage", "cli/a")
    assert stored["kid"] == "cliAes"
    copied = run_json(
        api, "reencrypt", "--from-storage", "cli/a", "--to-storage", "cli/b", "--kid", "cliPq"
    )
    assert (copied["key"], copied["kid"]) == ("cli/b", "cliPq") and copied["verifyJob"]

    old, new = tmp_path / "old.jws", tmp_path / "new.jws"
    assert run(api, "sign", "--kid", "cliSign", str(plain), "-o", str(old)).returncode == 0
    resigned = run(
        api, "resign", str(plain), "--signature", str(old), "--kid", "cliSign2", "-o", str(new)
    )
    assert resigned.returncode == 0, resigned.stderr
    verdict = run_json(api, "verify", str(plain), "--signature", str(new))
    assert verdict["kid"] == "cliSign2#1"
    plain.write_bytes(b"changed")
    refused = run(api, "resign", str(plain), "--signature", str(old), "--kid", "cliSign2")
    assert refused.returncode == 1 and "signature-invalid" in refused.stderr

"""Hub tokens never appear in logs, console output, written files, Hub commits or error messages.

A realistic token (`hf_` + 34 random characters, new on every run) is given both through `HF_TOKEN` and as
`token=`, against the loopback Hub server; successful and failing pushes are checked, including a server (or
proxy) that echoes the Authorization header back in its error message.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
import traceback
from pathlib import Path

import pytest

from optimum.commands.register.oats import main as cli_main
from optimum_oats import OATSConfig, compress
from optimum_oats.hub.publish import PublishError, publish, publish_folder
from tests.helpers.hub_fixtures import point_hf_clients_at
from tests.helpers.hub_server import HubServer
from tests.helpers.tiny_models import build_tiny_model

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
_ALPHABET = string.ascii_letters + string.digits


def _token() -> str:
    return "hf_" + "".join(secrets.choice(_ALPHABET) for _ in range(34))


TOKEN = _token()  # the user's real token: the server accepts only this one
WRONG = _token()  # a mistyped or revoked token: the server answers 401


@pytest.fixture(scope="module")
def compressed_model(tiny_configs, tokenizer, calibration_texts):
    config = OATSConfig(dataset=calibration_texts[:100], num_samples=2, seqlen=32, num_iterations=2)
    return compress(build_tiny_model(tiny_configs["llama"]), config, tokenizer, progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, compressed_model, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "checkpoint"
    compressed_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch, caplog):
    """A Hub that accepts only TOKEN, with HF_TOKEN=TOKEN, everything logged at DEBUG, and `HF_DEBUG` on:
    huggingface_hub then logs every request as a curl command (it must mask the Authorization header)."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setattr(constants, "HF_DEBUG", True)
    caplog.set_level(logging.DEBUG)
    for name in ("huggingface_hub", "transformers", "optimum_oats", "httpx", "httpcore", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=name)
    with HubServer(accepted_tokens={TOKEN}) as server:
        point_hf_clients_at(server, monkeypatch, home, token=TOKEN)
        yield server


def _assert_nowhere(secret: str, *texts: str, folders: tuple[Path, ...] = (), hub: HubServer | None = None) -> None:
    for index, text in enumerate(texts):
        assert secret not in text, f"token found in text #{index}"
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), f"token written to {path}"
    if hub is not None:
        for label, content in hub.iter_stored_bytes():
            assert secret.encode() not in content, f"token pushed in {label}"


def _error_text(error: BaseException) -> str:
    """Everything a traceback would print: message, repr, and every chained cause and context."""
    return "".join(traceback.format_exception(error)) + repr(error)


# ----------------------------------------------------------------------------------------------- successful pushes
def test_publish_with_token_and_env_leaks_nowhere(hub, compressed_model, tokenizer, tmp_path, caplog, capfd):
    url = publish(
        compressed_model,
        "user/secret-ok",
        tokenizer=tokenizer,
        eval_results={"boolq": {"acc": 0.5, "n_samples": 2}},
        base_model=BASE,
        token=TOKEN,
    )
    assert url and hub.tokens_seen == {TOKEN}  # the token was really used...
    assert "Send: curl" in caplog.text and "<TOKEN>" in caplog.text  # ...in requests logged with a mask...
    files = hub.repo("user/secret-ok").files()
    assert {"README.md", "config.json", "oats_report.json", "eval_results.json"} <= set(files)
    out, err = capfd.readouterr()
    # ...but is nowhere: logs, console, the process's files, the pushed card/config/report/results/commit
    _assert_nowhere(TOKEN, caplog.text, out, err, folders=(tmp_path,), hub=hub)
    _assert_nowhere(TOKEN, compressed_model.config.to_json_string(), str(compressed_model.config.quantization_config))


def test_save_pretrained_push_to_hub_with_token_leaks_nowhere(hub, compressed_model, tmp_path, caplog, capfd):
    compressed_model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="user/secret-save", token=TOKEN)
    assert {"config.json", "oats_report.json"} <= set(hub.repo("user/secret-save").files())
    out, err = capfd.readouterr()
    _assert_nowhere(TOKEN, caplog.text, out, err, folders=(tmp_path,), hub=hub)


def test_cli_push_with_env_token_leaks_nowhere(hub, checkpoint, tmp_path, caplog, capfd):
    cli_main(["push", str(checkpoint), "--repo-id", "user/secret-cli", "--base-model", BASE])
    out, err = capfd.readouterr()
    assert '"ok": true' in out and hub.tokens_seen == {TOKEN}
    _assert_nowhere(TOKEN, caplog.text, out, err, folders=(tmp_path, checkpoint), hub=hub)


# ----------------------------------------------------------------------------------------------- failing pushes
FAILURES = {
    "wrong token (401)": dict(token=WRONG),
    "commit refused (500)": dict(fail=("/commit/", 500, "Internal error")),
    "server echoes the token": dict(fail=("/commit/", 500, "upstream rejected 'Authorization: Bearer {secret}'")),
    "create_repo echoes the token": dict(fail=("/repos/create", 403, "token {secret} has no write access")),
    "Hub unreachable": dict(down=True),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failed_publish_error_never_holds_the_token(case, hub, checkpoint, tmp_path, caplog, capfd):
    spec = FAILURES[case]
    token = spec.get("token", TOKEN)
    if "fail" in spec:
        path, status, message = spec["fail"]
        hub.fail_next(path, status, message=message.format(secret=token))
    if spec.get("down"):
        hub.stop()
    with pytest.raises(PublishError) as excinfo:
        publish_folder(checkpoint, "user/secret-fail", base_model=BASE, token=token)
    text = _error_text(excinfo.value)
    assert "Nothing was committed" in text
    if "echo" in case:  # the server's message is kept, with the token blanked out
        assert "***" in str(excinfo.value)
    out, err = capfd.readouterr()
    _assert_nowhere(TOKEN, text, caplog.text, out, err, folders=(tmp_path, checkpoint))
    _assert_nowhere(WRONG, text, caplog.text, out, err, folders=(tmp_path, checkpoint))


def test_failed_cli_push_prints_no_token(hub, checkpoint, caplog, capfd):
    hub.fail_next("/commit/", 500, message=f"echo {TOKEN}")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["push", str(checkpoint), "--repo-id", "user/secret-cli-fail", "--base-model", BASE])
    assert exit_.value.code == 1
    out, err = capfd.readouterr()
    assert '"ok": false' in out and "HTTP 500" in out
    _assert_nowhere(TOKEN, caplog.text, out, err, _error_text(exit_.value))


def test_token_in_environment_is_not_copied_into_checkpoints(compressed_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    compressed_model.save_pretrained(tmp_path / "out")
    assert {"config.json", "oats_report.json", "model.safetensors"} <= set(os.listdir(tmp_path / "out"))
    _assert_nowhere(TOKEN, folders=(tmp_path,))


# ----------------------------------------------------------------------------------------- transformers' push paths
TRANSFORMERS_PUSHES = {
    "model.push_to_hub": lambda model, folder, token: model.push_to_hub("user/secret-tf", token=token),
    "save_pretrained(push_to_hub=True)": lambda model, folder, token: model.save_pretrained(
        folder, push_to_hub=True, repo_id="user/secret-tf", token=token
    ),
}
ECHOES = {
    "commit echoes": ("/commit/", 500, "upstream rejected 'Authorization: Bearer {secret}'"),
    "create_repo echoes": ("/repos/create", 403, "token {secret} has no write access"),
}


@pytest.mark.parametrize("echo", sorted(ECHOES))
@pytest.mark.parametrize("push", sorted(TRANSFORMERS_PUSHES))
@pytest.mark.parametrize("explicit", [True, False], ids=["token=", "HF_TOKEN"])
def test_transformers_push_paths_blank_an_echoed_token(
    push, echo, explicit, hub, compressed_model, tmp_path, caplog, capfd
):
    """transformers' own methods on a compressed model: the error (and everything chained to it), the DEBUG logs
    and the console hold `***` where the server quoted the token."""
    path, status, message = ECHOES[echo]
    hub.fail_next(path, status, message=message.format(secret=TOKEN))
    with pytest.raises(Exception) as excinfo:
        TRANSFORMERS_PUSHES[push](compressed_model, tmp_path / "out", TOKEN if explicit else None)
    text = _error_text(excinfo.value)
    assert "***" in str(excinfo.value) and str(status) in text  # the server's words are kept, the token blanked
    out, err = capfd.readouterr()
    _assert_nowhere(TOKEN, text, caplog.text, out, err, folders=(tmp_path,))


PUSH_SCRIPT = """
import logging, sys
import optimum_oats
from transformers import AutoModelForCausalLM

if sys.argv[3] == "debug":
    logging.basicConfig(level=logging.DEBUG)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model.push_to_hub(sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.parametrize("logging_setup", ["none", "debug"])
def test_push_to_hub_in_a_plain_script_prints_no_token(logging_setup, checkpoint, tmp_path):
    """A user's script in a fresh process: no logging set up (warnings go to Python's last-resort handler) or
    `basicConfig(DEBUG)`, the push fails with the token echoed, and Python prints the traceback on stderr."""
    import subprocess
    import sys

    with HubServer(accepted_tokens={TOKEN}) as server:
        server.fail_next("/commit/", 500, message=f"upstream rejected 'Authorization: Bearer {TOKEN}'")
        env = server.client_env(tmp_path / "hf_home", token=TOKEN)
        argv = [sys.executable, "-c", PUSH_SCRIPT, str(checkpoint), "user/plain-script", logging_setup]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "HfHubHTTPError" in done.stderr and "***" in done.stderr
    _assert_nowhere(TOKEN, done.stdout, done.stderr)


def test_the_last_resort_handler_is_filtered_too(capsys):
    """Where no logging is set up, Python prints WARNING records through `logging.lastResort`: it blanks too."""
    from optimum_oats.utils.redact import redacted_logs

    def record() -> logging.LogRecord:
        return logging.LogRecord("httpx", logging.WARNING, __file__, 1, "server said %s", (TOKEN,), None)

    with redacted_logs({TOKEN}):
        logging.lastResort.handle(record())
    err = capsys.readouterr().err
    assert "server said ***" in err and TOKEN not in err
    logging.lastResort.handle(record())  # the filter is removed afterwards
    assert TOKEN in capsys.readouterr().err

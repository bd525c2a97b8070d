"""Pytest fixtures around :class:`hub_server.HubServer` (a local, in-memory Hugging Face Hub).

Enable them by adding to ``tests/conftest.py``::

    pytest_plugins = ["tests.helpers.hub_fixtures"]

(``tests/`` is a package, so pytest's default "prepend" import mode puts the repository root on ``sys.path`` and
the helpers import as ``tests.helpers.*``.)

Two ways to use the server:

* ``hub`` -- in-process. The already-imported ``huggingface_hub`` / ``transformers`` are re-pointed at the server
  for the duration of the test (``huggingface_hub`` reads ``HF_ENDPOINT`` etc. at import time, so setting the
  environment alone is not enough once it is imported). Everything is restored afterwards::

      def test_push(hub, tmp_path):
          model.push_to_hub("user/tiny")                   # real client, real HTTP, no mocks
          assert "model.safetensors" in hub.repo("user/tiny").files()
          hub.fail_next("/commit/", 500)                   # next commit answers HTTP 500

* ``hub_env`` -- subprocess. An environment dict for ``subprocess.run([sys.executable, ...], env=hub_env)``;
  the most faithful option (fresh imports, e.g. for CLI tests)::

      def test_cli_push(hub_server, hub_env):
          subprocess.run([sys.executable, "-m", "optimum_oats...", "--push-to-hub", "user/x"], env=hub_env, check=True)
          assert hub_server.repo("user/x").files()

Both use the token :data:`hub_server.DEFAULT_TOKEN` and an ``HF_HOME`` under ``tmp_path``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.helpers.hub_server import DEFAULT_TOKEN, HubServer


def point_hf_clients_at(
    server: HubServer, monkeypatch: pytest.MonkeyPatch, hf_home: Path, token: str | None = DEFAULT_TOKEN
) -> None:
    """Point in-process ``huggingface_hub`` (and ``transformers`` if imported) at ``server`` until undo.

    Patches the environment *and* the module-level values ``huggingface_hub.constants`` computed at import time
    (endpoint, Xet switch, offline mode, cache paths), and drops ``transformers``' cached ``HfApi`` which captured
    the endpoint when it was created.
    """
    from huggingface_hub import constants, hf_api  # import before setenv: restored values are the real defaults
    from huggingface_hub.utils import _http

    env = server.client_env(hf_home, token=token)
    for key in ("HUGGING_FACE_HUB_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER", "HF_OIDC_RESOURCE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    for key in (
        "HF_ENDPOINT",
        "HF_HUB_DISABLE_XET",
        "HF_HUB_DISABLE_TELEMETRY",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_XET_CACHE",
        "NO_PROXY",
        "no_proxy",
    ):
        monkeypatch.setenv(key, env[key])
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)

    hf_home_s = str(hf_home)
    patches = {
        "ENDPOINT": server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": hf_home_s,
        "HF_HUB_CACHE": env["HF_HUB_CACHE"],
        "HF_XET_CACHE": env["HF_XET_CACHE"],
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    parts = urlsplit(server.endpoint)
    origin = (parts.scheme, parts.hostname or "", parts.port or 80)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS) | {origin}, raising=False)

    # Module-level clients built at import time: `huggingface_hub.upload_file` & co. are bound methods of
    # `hf_api.api`, and fsspec caches `HfFileSystem` instances (each with its endpoint).
    monkeypatch.setattr(hf_api.api, "endpoint", server.endpoint)
    hffs_module = sys.modules.get("huggingface_hub.hf_file_system")
    if hffs_module is not None:
        hffs_module.HfFileSystem.clear_instance_cache()
        monkeypatch.setattr(hffs_module.hffs, "endpoint", server.endpoint, raising=False)

    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)


@pytest.fixture
def hub_server() -> Iterator[HubServer]:
    """A fresh, empty server for one test (starting one takes milliseconds)."""
    with HubServer() as server:
        yield server


@pytest.fixture
def hub_home(tmp_path: Path) -> Path:
    """``HF_HOME`` for the client: cache and token live under the test's tmp dir, never in ``~/.cache``."""
    home = tmp_path / "hf_home"
    home.mkdir()
    return home


@pytest.fixture
def hub(hub_server: HubServer, hub_home: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """``hub_server`` with the in-process ``huggingface_hub`` / ``transformers`` pointed at it."""
    point_hf_clients_at(hub_server, monkeypatch, hub_home)
    return hub_server


@pytest.fixture
def hub_env(hub_server: HubServer, hub_home: Path) -> dict[str, str]:
    """Environment for a subprocess client talking to ``hub_server``."""
    return hub_server.client_env(hub_home)

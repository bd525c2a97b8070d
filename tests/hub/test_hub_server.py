"""The local Hub test server works with the real ``huggingface_hub`` / ``transformers`` clients (no mocks).

Subprocess tests prove the "fresh interpreter + env vars" path; in-process tests prove that the ``hub`` fixture
re-points already-imported clients. See ``tests/helpers/hub_fixtures.py`` for how other tests should use the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.hub_server import DEFAULT_TOKEN, HubServer

# Fixtures `hub`, `hub_env`, `hub_home`, `hub_server` (harmless if tests/conftest.py also lists the plugin).
pytest_plugins = ["tests.helpers.hub_fixtures"]
# huggingface_hub's LFS PUT passes raw bytes as `data=`, which httpx2 deprecates: client-side, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

BIG_SIZE = 10 * 1024 * 1024 + 123  # over the Hub's 10 MB regular-file limit => must take the LFS path


def _run_client(code: str, env: dict[str, str], *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON object as its last stdout line."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"client failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder with a small text file, a nested text file and a >10 MB binary file."""
    root = tmp_path / "to_upload"
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("hello hub\n")
    (root / "sub" / "nested.txt").write_text("nested\n")
    (root / "big.bin").write_bytes(os.urandom(BIG_SIZE))
    return root


_ROUNDTRIP = """
    import hashlib, json, os, sys
    from pathlib import Path
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    folder = sys.argv[1]
    api = HfApi()
    url = api.create_repo("user/roundtrip", exist_ok=True)
    api.create_repo("user/roundtrip", exist_ok=True)  # second call: 409 swallowed by exist_ok
    commit = api.upload_folder(repo_id="user/roundtrip", folder_path=folder, commit_message="upload")
    info = api.model_info("user/roundtrip", files_metadata=True)
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
    snap = snapshot_download("user/roundtrip")
    print(json.dumps({
        "repo_id": url.repo_id,
        "commit": commit.oid,
        "info_sha": info.sha,
        "siblings": {s.rfilename: {"size": s.size, "lfs": s.lfs is not None} for s in info.siblings},
        "files": sorted(api.list_repo_files("user/roundtrip")),
        "exists": [api.repo_exists("user/roundtrip"), api.repo_exists("user/missing")],
        "download": {f: sha(hf_hub_download("user/roundtrip", f)) for f in ["notes.txt", "sub/nested.txt", "big.bin"]},
        "snapshot": {str(p.relative_to(snap)): sha(p) for p in Path(snap).rglob("*") if p.is_file()},
    }))
"""


@pytest.mark.slow
def test_subprocess_roundtrip_regular_and_lfs(hub_server: HubServer, hub_env: dict[str, str], folder: Path) -> None:
    out = _run_client(_ROUNDTRIP, hub_env, str(folder))

    expected = {p.relative_to(folder).as_posix(): _sha256(p) for p in folder.rglob("*") if p.is_file()}
    assert out["repo_id"] == "user/roundtrip"
    assert out["commit"] == out["info_sha"] == hub_server.repo("user/roundtrip").head()
    assert out["files"] == sorted([".gitattributes", *expected])
    assert out["exists"] == [True, False]
    assert out["download"] == expected
    assert {k: v for k, v in out["snapshot"].items() if k != ".gitattributes"} == expected
    assert out["siblings"]["big.bin"] == {"size": BIG_SIZE, "lfs": True}
    assert out["siblings"]["notes.txt"] == {"size": len("hello hub\n"), "lfs": False}

    # Server side: the big file really went through the LFS batch + PUT + verify protocol.
    repo = hub_server.repo("user/roundtrip")
    assert repo.lfs_files() == {"big.bin"}
    assert repo.files()["big.bin"] == (folder / "big.bin").read_bytes()
    assert hub_server.requests_matching(".git/info/lfs/objects/batch", "POST")
    (put,) = hub_server.requests_matching("/_lfs/upload/", "PUT")
    assert put.body_size == BIG_SIZE
    assert put.authorization is None  # storage uploads never carry the Hub token
    assert hub_server.tokens_seen == {DEFAULT_TOKEN}


_FAILING_PUSH = """
    import json, sys
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    api.create_repo("user/failing", exist_ok=True)
    try:
        api.upload_folder(repo_id="user/failing", folder_path=sys.argv[1], commit_message="will fail")
    except HfHubHTTPError as err:
        print(json.dumps({"type": type(err).__name__, "status": err.response.status_code, "message": str(err)}))
    else:
        print(json.dumps({"type": None}))
"""


@pytest.mark.slow
def test_subprocess_forced_commit_failure(hub_server: HubServer, hub_env: dict[str, str], folder: Path) -> None:
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    hub_server.fail_next("/commit/", 500, message="disk full on the test hub")

    out = _run_client(_FAILING_PUSH, hub_env, str(folder))

    assert out["type"] == "HfHubHTTPError"
    assert out["status"] == 500
    assert "disk full on the test hub" in out["message"]  # the server's reason reaches the user
    assert len(hub_server.repo("user/failing").log()) == 1  # only the initial commit: nothing was committed
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # local files intact
    assert hub_server.requests_matching("/commit/", "POST")[-1].status == 500


def test_in_process_api(hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download, snapshot_download

    api = HfApi()
    repo_id = api.create_repo("api-test", exist_ok=True).repo_id  # no namespace => the token's user
    assert repo_id == "user/api-test"
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="dir/a.txt", repo_id=repo_id).oid
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="dir/a.txt", repo_id=repo_id)

    assert Path(hf_hub_download(repo_id, "dir/a.txt")).read_bytes() == b"v2"
    assert Path(hf_hub_download(repo_id, "dir/a.txt", revision=first)).read_bytes() == b"v1"
    assert [c.commit_id for c in api.list_repo_commits(repo_id)][1] == first
    assert [f.path for f in api.list_repo_tree(repo_id)] == ["dir", ".gitattributes"]
    assert api.file_exists(repo_id, "dir/a.txt") and not api.file_exists(repo_id, "nope.txt")

    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="pr.txt", repo_id=repo_id, create_pr=True)
    assert pr.pr_url is not None and pr.pr_revision == "refs/pr/1"
    assert "pr.txt" not in api.list_repo_files(repo_id)
    assert "pr.txt" in api.list_repo_files(repo_id, revision="refs/pr/1")

    card = ModelCard.from_template(ModelCardData(license="apache-2.0", tags=["oats"]), model_description="x")
    card.push_to_hub(repo_id)
    info = api.model_info(repo_id)
    assert info.card_data is not None and info.card_data.license == "apache-2.0"
    assert "oats" in (info.tags or [])

    api.delete_file("dir/a.txt", repo_id)
    local = snapshot_download(repo_id, local_dir=tmp_path / "snap")
    assert sorted(p.name for p in Path(local).iterdir() if p.is_file()) == [".gitattributes", "README.md"]


def test_in_process_commit_failure_raises_http_error(hub: HubServer) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    api.create_repo("user/boom")
    hub.fail_next("/commit/", 503, message="maintenance")
    with pytest.raises(HfHubHTTPError, match="maintenance") as excinfo:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/boom")
    assert excinfo.value.response.status_code == 503
    assert "x.txt" not in hub.repo("user/boom").files()
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/boom")  # failure was one-shot
    assert hub.repo("user/boom").files()["x.txt"] == b"x"


def test_multipart_lfs_upload(hub_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    from tests.helpers.hub_fixtures import point_hf_clients_at

    data = os.urandom(3 * 1024 * 1024 + 7)
    with HubServer(lfs_multipart_chunk_size=1024 * 1024) as server:
        point_hf_clients_at(server, monkeypatch, hub_home)
        api = HfApi()
        api.create_repo("user/multi")
        api.upload_file(path_or_fileobj=data, path_in_repo="weights.safetensors", repo_id="user/multi")
        assert len(server.requests_matching("/_lfs/part/", "PUT")) == 4
        assert server.repo("user/multi").lfs_files() == {"weights.safetensors"}
        assert Path(hf_hub_download("user/multi", "weights.safetensors")).read_bytes() == data


def test_token_checks_when_tokens_are_configured(hub_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from tests.helpers.hub_fixtures import point_hf_clients_at

    with HubServer(accepted_tokens={"hf_good"}) as server:
        point_hf_clients_at(server, monkeypatch, hub_home, token="hf_good")
        HfApi().create_repo("user/secret", private=True)
        assert HfApi().repo_exists("user/secret")
        assert not HfApi(token=False).repo_exists("user/secret")  # private repo hidden from anonymous users
        with pytest.raises(HfHubHTTPError) as excinfo:
            HfApi(token="hf_bad").create_repo("user/other")
        assert excinfo.value.response.status_code == 401
        assert server.tokens_seen == {"hf_good", "hf_bad"}


def test_transformers_push_to_hub_and_from_pretrained(hub: HubServer) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = LlamaForCausalLM(config)
    model.push_to_hub("user/tiny")

    files = hub.repo("user/tiny").files()
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert hub.repo("user/tiny").lfs_files() == {"model.safetensors"}
    loaded = AutoModelForCausalLM.from_pretrained("user/tiny")
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)

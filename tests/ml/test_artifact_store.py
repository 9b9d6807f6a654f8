"""The artifact store's contract, on a folder and on a real S3-compatible server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from app.errors import ArtifactExistsError, ArtifactIntegrityError, ModelStoreError
from app.ml.artifact_store import (
    COMPLETION_MARKER,
    ArtifactStore,
    FileArtifactStore,
    S3ArtifactStore,
    S3Config,
    artifact_store_from_settings,
    open_artifact_store,
)
from app.ml.model import load_model
from app.ml.registry import MODEL_ARTIFACT, ModelRegistry
from app.settings import Settings
from tests.conftest import free_port
from tests.s3 import SeaweedS3, s3_prefix, seaweedfs  # noqa: F401  fixtures

TEXTS = ["a moving, beautifully acted film", "a dull, lifeless mess of a movie"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server(seaweedfs: SeaweedS3) -> SeaweedS3:  # noqa: F811
    """The session's SeaweedFS (tests/s3.py)."""
    return seaweedfs


@pytest.fixture
def s3_url(s3_prefix: str) -> str:  # noqa: F811
    """A fresh s3:// prefix of the session's bucket, the server's AWS variables set."""
    return s3_prefix


@pytest.fixture(params=["file", "s3"])
def artifacts(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """An empty store of each backend (s3: a fresh prefix of the session's SeaweedFS bucket)."""
    if request.param == "file":
        return open_artifact_store((tmp_path / "store").as_uri(), tmp_path / "cache", environ={})
    return open_artifact_store(request.getfixturevalue("s3_url"), tmp_path / "cache")


def overwrite_behind_the_stores_back(store: ArtifactStore, version: str, name: str, data: bytes) -> None:
    """What an attacker or a faulty tool with write access does: replace the stored bytes, no conditions."""
    if isinstance(store, FileArtifactStore):
        path = store.root / version / name
        path.chmod(0o644)
        path.write_bytes(data)
    else:
        assert isinstance(store, S3ArtifactStore)
        store.client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{version}/{name}", Body=data)


# -- the contract, on both backends ---------------------------------------------------------------------------


def test_a_real_version_round_trips_and_its_model_predicts_alike(
    artifacts: ArtifactStore, store: ModelRegistry
) -> None:
    """Every artifact of a trained version comes back byte for byte, under the hashes the registry recorded."""
    entry = store.versions()[0]
    recorded: dict[str, str] = entry.metadata["artifacts"]
    hashes = artifacts.put_version(entry.version, {name: entry.path / name for name in recorded})
    assert hashes == recorded
    for name, digest in recorded.items():
        assert artifacts.get_artifact(entry.version, name, digest) == (entry.path / name).read_bytes()
    data = artifacts.get_artifact(entry.version, MODEL_ARTIFACT, recorded[MODEL_ARTIFACT])
    model = load_model(io.BytesIO(data), entry.metadata.get("params"))
    expected = store.load(entry.version).model.predict_proba(TEXTS)
    np.testing.assert_array_equal(model.predict_proba(TEXTS), expected)
    assert artifacts.list_versions() == [entry.version]


def test_a_second_upload_of_a_version_is_refused_and_changes_nothing(artifacts: ArtifactStore) -> None:
    """Versions are immutable: storing the same version again fails and the first bytes stay."""
    artifacts.put_version("v1", {"model.joblib": b"first"})
    with pytest.raises(ArtifactExistsError, match="immutable"):
        artifacts.put_version("v1", {"model.joblib": b"second"})
    assert artifacts.get_artifact("v1", "model.joblib", sha(b"first")) == b"first"


def test_a_tampered_artifact_is_refused(artifacts: ArtifactStore) -> None:
    """Bytes replaced behind the store's back do not hash to the recorded sha256: refused, never returned."""
    artifacts.put_version("v1", {"model.joblib": b"genuine model"})
    overwrite_behind_the_stores_back(artifacts, "v1", "model.joblib", b"evil pickle")
    with pytest.raises(ArtifactIntegrityError, match="sha256 mismatch") as caught:
        artifacts.get_artifact("v1", "model.joblib", sha(b"genuine model"))
    assert caught.value.details["actual"] == sha(b"evil pickle")


def test_bytes_are_returned_only_for_the_sha256_asked_for(artifacts: ArtifactStore) -> None:
    """A caller whose recorded hash differs from the stored artifact gets an error, not the bytes."""
    artifacts.put_version("v1", {"model.joblib": b"model"})
    with pytest.raises(ArtifactIntegrityError, match="sha256 mismatch"):
        artifacts.get_artifact("v1", "model.joblib", sha(b"another model"))


def test_a_missing_artifact_is_a_clear_integrity_error(artifacts: ArtifactStore) -> None:
    """Neither a missing version nor a missing artifact of a stored one is mistaken for another failure."""
    artifacts.put_version("v1", {"model.joblib": b"model"})
    for version, name in [("v2", "model.joblib"), ("v1", "reference.json")]:
        with pytest.raises(ArtifactIntegrityError, match=rf"{version}: artifact {name} (is missing|unreadable)"):
            artifacts.get_artifact(version, name, sha(b"model"))


def test_versions_are_listed_sorted_and_deleted_whole(artifacts: ArtifactStore) -> None:
    """list_versions names every stored version; delete_version removes one with all its artifacts."""
    assert artifacts.list_versions() == []
    artifacts.put_version("v2", {"model.joblib": b"2", "report/metrics.json": b"{}"})
    artifacts.put_version("v1", {"model.joblib": b"1"})
    assert artifacts.list_versions() == ["v1", "v2"]
    artifacts.delete_version("v2")
    artifacts.delete_version("v9")  # absent: nothing to do
    assert artifacts.list_versions() == artifacts.list_versions(include_incomplete=True) == ["v1"]
    with pytest.raises(ArtifactIntegrityError):
        artifacts.get_artifact("v2", "report/metrics.json", sha(b"{}"))
    artifacts.put_version("v2", {"model.joblib": b"2 again"})  # a deleted name can be stored anew
    assert artifacts.get_artifact("v2", "model.joblib", sha(b"2 again")) == b"2 again"


@pytest.mark.parametrize(
    ("version", "name"),
    [("../v1", "model.joblib"), (".v1", "model.joblib"), ("v1", "../model.joblib"), ("v1", COMPLETION_MARKER),
     ("v1", "report//metrics.json"), ("v1", "/model.joblib"), ("", "model.joblib")],
)  # fmt: skip
def test_names_that_could_escape_a_version_are_refused(artifacts: ArtifactStore, version: str, name: str) -> None:
    """A version or artifact name never reaches outside its version's folder or prefix, nor fakes the marker."""
    with pytest.raises(ModelStoreError, match="invalid"):
        artifacts.put_version(version, {name: b"x"})
    with pytest.raises(ModelStoreError, match="invalid"):
        artifacts.get_artifact(version, name, sha(b"x"))


# -- the S3 backend -----------------------------------------------------------------------------------------


def test_seaweedfs_honours_conditional_puts(server: SeaweedS3, s3_url: str) -> None:
    """The server itself refuses If-None-Match: * on an existing key (what immutability rests on)."""
    client, key = server.client(), f"{s3_url.split('/', 3)[3]}/object"
    client.put_object(Bucket=server.bucket, Key=key, Body=b"one", IfNoneMatch="*")
    with pytest.raises(client.exceptions.ClientError) as caught:
        client.put_object(Bucket=server.bucket, Key=key, Body=b"two", IfNoneMatch="*")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=server.bucket, Key=key)["Body"].read() == b"one"


def s3_store(url: str, cache: Path, **environ: str) -> S3ArtifactStore:
    store = open_artifact_store(url, cache, environ=environ or None)
    assert isinstance(store, S3ArtifactStore)
    return store


def count_requests(store: S3ArtifactStore) -> list[str]:
    """The operations the store's client sends from now on (boto3's own event hook)."""
    sent: list[str] = []
    store.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.method))
    return sent


def test_a_cached_artifact_is_served_without_asking_s3(s3_url: str, tmp_path: Path, server: SeaweedS3) -> None:
    """The first read downloads and caches by sha256; later reads, even by a store whose server is down, do not."""
    store = s3_store(s3_url, tmp_path / "cache")
    store.put_version("v1", {"model.joblib": b"model bytes"})
    sent = count_requests(store)
    assert store.get_artifact("v1", "model.joblib", sha(b"model bytes")) == b"model bytes"
    assert sent == ["GET"]
    assert store.get_artifact("v1", "model.joblib", sha(b"model bytes")) == b"model bytes"
    assert sent == ["GET"]
    unreachable = {**server.environ(), "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"}
    offline = s3_store(s3_url, tmp_path / "cache", **unreachable)
    assert offline.get_artifact("v1", "model.joblib", sha(b"model bytes")) == b"model bytes"


def test_a_corrupt_cache_file_is_dropped_and_downloaded_again(s3_url: str, tmp_path: Path) -> None:
    """Cached files are re-hashed on every read: a changed one is never returned."""
    store = s3_store(s3_url, tmp_path / "cache")
    store.put_version("v1", {"model.joblib": b"model bytes"})
    store.get_artifact("v1", "model.joblib", sha(b"model bytes"))
    cached = store.cache.path(sha(b"model bytes"))
    cached.chmod(0o644)
    cached.write_bytes(b"rotted")
    with capture_logs() as logs:
        assert store.get_artifact("v1", "model.joblib", sha(b"model bytes")) == b"model bytes"
    assert [e["event"] for e in logs] == ["artifact_cache_corrupt"]
    assert cached.read_bytes() == b"model bytes"


def test_a_tampered_download_is_not_cached(s3_url: str, tmp_path: Path) -> None:
    """Refused bytes never reach the cache, so the next read asks S3 again."""
    store = s3_store(s3_url, tmp_path / "cache")
    store.put_version("v1", {"model.joblib": b"genuine"})
    overwrite_behind_the_stores_back(store, "v1", "model.joblib", b"evil")
    with pytest.raises(ArtifactIntegrityError):
        store.get_artifact("v1", "model.joblib", sha(b"genuine"))
    assert not store.cache.path(sha(b"genuine")).exists()
    assert not any(path.is_file() for path in (tmp_path / "cache").rglob("*"))


def test_an_interrupted_upload_is_incomplete_and_not_listed(s3_url: str, tmp_path: Path) -> None:
    """The completion marker is written only after every artifact: an upload that failed midway is not a version."""
    store = s3_store(s3_url, tmp_path / "cache")
    store.client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/v1/reference.json", Body=b"in the way")
    with pytest.raises(ArtifactExistsError, match=r"v1/reference\.json exists"):
        store.put_version("v1", {"model.joblib": b"model", "reference.json": b"reference"})
    assert store.list_versions() == []
    assert store.list_versions(include_incomplete=True) == ["v1"]
    store.delete_version("v1")
    assert store.list_versions(include_incomplete=True) == []


def test_the_marker_records_the_versions_hashes(s3_url: str, tmp_path: Path) -> None:
    """The completion marker lists every artifact's sha256, for whoever inspects the bucket."""
    store = s3_store(s3_url, tmp_path / "cache")
    hashes = store.put_version("v1", {"model.joblib": b"model", "report/metrics.json": b"{}"})
    body = store.client.get_object(Bucket=store.bucket, Key=f"{store.prefix}/v1/{COMPLETION_MARKER}")["Body"].read()
    assert json.loads(body)["artifacts"] == hashes == {"model.joblib": sha(b"model"), "report/metrics.json": sha(b"{}")}


def test_wrong_credentials_are_a_clear_store_error(s3_url: str, tmp_path: Path, server: SeaweedS3) -> None:
    """The server checks signatures: a wrong secret key fails with the server's reason, not a hang or a 500."""
    wrong = {**server.environ(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    store = s3_store(s3_url, tmp_path / "cache", **wrong)
    with pytest.raises(ModelStoreError, match="SignatureDoesNotMatch") as caught:
        store.put_version("v1", {"model.joblib": b"model"})
    assert not isinstance(caught.value, ArtifactExistsError)


def test_an_unreachable_server_is_a_clear_store_error(tmp_path: Path, server: SeaweedS3) -> None:
    """Connection refused (after boto3's retries) is a ModelStoreError naming the store."""
    down = {**server.environ(), "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"}
    store = s3_store("s3://bucket/prefix", tmp_path / "cache", **down)
    with pytest.raises(ModelStoreError, match=r"s3://bucket/prefix: download of prefix/v1/model.joblib failed"):
        store.get_artifact("v1", "model.joblib", sha(b"model"))


# -- configuration --------------------------------------------------------------------------------------------


def test_s3_config_reads_the_standard_aws_variables_and_their_file_twins(tmp_path: Path) -> None:
    """Keys come from AWS_* or from the files AWS_*_FILE name (stripped); the region defaults to us-east-1."""
    (tmp_path / "id").write_text("AKID\n")
    (tmp_path / "secret").write_text("  s3cret\n")
    config = S3Config.from_environ(
        {
            "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000",
            "AWS_ACCESS_KEY_ID_FILE": str(tmp_path / "id"),
            "AWS_SECRET_ACCESS_KEY_FILE": str(tmp_path / "secret"),
        }
    )
    assert (config.endpoint_url, config.region, config.access_key_id) == ("http://127.0.0.1:9000", "us-east-1", "AKID")
    assert config.secret_access_key == "s3cret"
    assert "s3cret" not in repr(config)
    direct = S3Config.from_environ({"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "B", "AWS_REGION": "eu-west-1"})
    assert (direct.access_key_id, direct.secret_access_key, direct.region, direct.endpoint_url) == (
        "A",
        "B",
        "eu-west-1",
        None,
    )
    assert S3Config.from_environ({}) == S3Config()  # boto3's own credential chain


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"AWS_ACCESS_KEY_ID": "A"}, "must be set together"),
        ({"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY_FILE": "/nonexistent/secret"}, "_FILE=.* is unreadable"),
    ],
)
def test_s3_config_fails_fast_on_half_configured_keys(environ: dict[str, str], message: str) -> None:
    """A key without its secret, or a secret file that cannot be read, is refused before any request."""
    with pytest.raises(ModelStoreError, match=message):
        S3Config.from_environ(environ)


def test_settings_choose_the_backend(tmp_path: Path) -> None:
    """Unset, the store URL is the model store folder; s3:// gives the S3 backend caching under state_dir."""
    default = artifact_store_from_settings(Settings(model_store=tmp_path / "models", state_dir=tmp_path / "var"))
    assert isinstance(default, FileArtifactStore)
    assert default.root == (tmp_path / "models").resolve()
    s3 = artifact_store_from_settings(
        Settings(model_store_url="s3://models/prod/sentiment", state_dir=tmp_path / "var")
    )
    assert isinstance(s3, S3ArtifactStore)
    assert (s3.bucket, s3.prefix, s3.url) == ("models", "prod/sentiment", "s3://models/prod/sentiment")
    assert s3.cache.root == tmp_path / "var" / "model-cache"
    cache = Settings(model_store_url="s3://models", model_cache_dir=tmp_path / "c", state_dir=tmp_path / "var")
    assert artifact_store_from_settings(cache).cache.root == tmp_path / "c"  # type: ignore[attr-defined]


def test_unknown_store_urls_are_refused(tmp_path: Path) -> None:
    """Settings refuse a URL of no backend; so does opening one directly."""
    with pytest.raises(ValueError, match="model_store_url"):
        Settings(model_store_url="gs://bucket/prefix")
    with pytest.raises(ModelStoreError, match="unsupported model store URL"):
        open_artifact_store("gs://bucket/prefix", tmp_path)
    with pytest.raises(ModelStoreError, match="absolute local path"):
        open_artifact_store("file://host/share", tmp_path)


def test_the_file_backend_never_imports_boto3(tmp_path: Path) -> None:
    """Web workers on the file store (and S3 stores never used) do not load boto3."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from app.ml.artifact_store import open_artifact_store\n"
        f"store = open_artifact_store({(tmp_path / 's').as_uri()!r}, Path('cache'), environ={{}})\n"
        "store.put_version('v1', {'model.joblib': b'x'})\n"
        "open_artifact_store('s3://bucket/prefix', Path('cache'), environ={})\n"
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, sorted(sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr

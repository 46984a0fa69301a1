"""Tests of birder.io.download against a real HTTP server on 127.0.0.1 (no other network)."""

import hashlib
import logging
import os
import random
from pathlib import Path

import pytest
from conftest import LoopbackServer

from birder.errors import ChecksumMismatchError, DownloadError
from birder.io import atomic, download
from birder.io.download import download_file, fetch_pretrained_file, sha256_file, verified_sha256
from birder.version import __version__

GOOD = random.Random(1234).randbytes(3 * 1024 * 1024 - 12345)  # several 1 MiB chunks, not a whole number of them
GOOD_SHA256 = hashlib.sha256(GOOD).hexdigest()
OTHER = random.Random(99).randbytes(1000)
OTHER_SHA256 = hashlib.sha256(OTHER).hexdigest()
SHORT_BODY = random.Random(7).randbytes(100_000)
WRONG_SHA256 = "0" * 64


@pytest.fixture
def server(http_server: LoopbackServer) -> LoopbackServer:
    http_server.add("/models/good.pt", GOOD)
    http_server.add("/models/good.safetensors", OTHER)
    # Promises more than it sends, then closes: an interrupted transfer
    http_server.add("/models/short.pt", SHORT_BODY, declared_length=len(SHORT_BODY) + 50_000)
    return http_server


def _metadata(base_url: str | None, sha256: str = GOOD_SHA256) -> dict:
    entry = {
        "description": "test model",
        "resolution": (224, 224),
        "formats": {"pt": {"file_size": 3.0, "sha256": sha256}, "safetensors": {"file_size": 0.1, "sha256": "ab"}},
        "net": {"network": "vit_l16", "tag": "test"},
    }
    if base_url is not None:
        entry["url"] = base_url

    return entry


def _files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ---------------------------------------------------------------------------------------------------------------------
# download_file
# ---------------------------------------------------------------------------------------------------------------------


def test_download_good_file(server: LoopbackServer, tmp_path: Path) -> None:
    dst = tmp_path / "out" / "deep" / "good.pt"
    result = download_file(server.url("/models/good.pt"), dst, GOOD_SHA256, progress_bar=False)

    assert result == dst
    assert dst.read_bytes() == GOOD
    assert not (dst.parent / "good.pt.partial").exists()
    assert server.user_agents == [f"birder/{__version__}"]


def test_download_writes_stamp(server: LoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dst = tmp_path / "good.pt"
    download_file(server.url("/models/good.pt"), dst, GOOD_SHA256, progress_bar=False)
    assert (tmp_path / "good.pt.sha256.json").is_file()

    monkeypatch.setattr(download, "sha256_file", _forbidden_hash)
    assert verified_sha256(dst) == GOOD_SHA256


def test_download_without_expected_hash(server: LoopbackServer, tmp_path: Path) -> None:
    dst = tmp_path / "good.pt"
    download_file(server.url("/models/good.pt"), dst, progress_bar=False)
    assert dst.read_bytes() == GOOD


def test_download_wrong_hash(server: LoopbackServer, tmp_path: Path) -> None:
    dst = tmp_path / "out" / "good.pt"
    url = server.url("/models/good.pt")
    with pytest.raises(ChecksumMismatchError) as excinfo:
        download_file(url, dst, WRONG_SHA256, progress_bar=False)

    message = str(excinfo.value)
    assert WRONG_SHA256 in message
    assert GOOD_SHA256 in message
    assert url in message
    assert _files_in(dst.parent) == []


def test_download_wrong_hash_keeps_existing_file(server: LoopbackServer, tmp_path: Path) -> None:
    dst = tmp_path / "good.pt"
    dst.write_bytes(b"previous")
    with pytest.raises(ChecksumMismatchError):
        download_file(server.url("/models/good.pt"), dst, WRONG_SHA256, progress_bar=False)

    assert dst.read_bytes() == b"previous"
    assert _files_in(tmp_path) == ["good.pt"]


def test_download_interrupted(server: LoopbackServer, tmp_path: Path) -> None:
    dst = tmp_path / "out" / "short.pt"
    url = server.url("/models/short.pt")
    with pytest.raises(DownloadError) as excinfo:
        download_file(url, dst, progress_bar=False)

    assert url in str(excinfo.value)
    assert str(len(SHORT_BODY)) in str(excinfo.value)
    assert _files_in(dst.parent) == []


def test_download_404(server: LoopbackServer, tmp_path: Path) -> None:
    dst = tmp_path / "missing.pt"
    with pytest.raises(DownloadError) as excinfo:
        download_file(server.url("/models/missing.pt"), dst, progress_bar=False)

    assert "404" in str(excinfo.value)
    assert not isinstance(excinfo.value, ChecksumMismatchError)
    assert _files_in(tmp_path) == []


def test_download_offline(closed_port_url: str, tmp_path: Path) -> None:
    dst = tmp_path / "out" / "good.pt"
    with pytest.raises(DownloadError) as excinfo:
        download_file(f"{closed_port_url}/good.pt", dst, GOOD_SHA256, progress_bar=False, timeout=5)

    message = str(excinfo.value)
    assert str(dst) in message
    assert "offline" in message
    assert "\n" not in message
    assert _files_in(dst.parent) == []


def test_download_keyboard_interrupt_cleans_up(
    server: LoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class InterruptingBar:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> "InterruptingBar":
            return self

        def __exit__(self, *args: object) -> None:
            pass

        def update(self, n: int) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(download, "tqdm", InterruptingBar)
    dst = tmp_path / "good.pt"
    with pytest.raises(KeyboardInterrupt):
        download_file(server.url("/models/good.pt"), dst, GOOD_SHA256, progress_bar=False)

    assert _files_in(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------------
# verified_sha256
# ---------------------------------------------------------------------------------------------------------------------


def _forbidden_hash(path: Path, chunk_size: int = 1 << 20) -> str:
    raise AssertionError(f"{path} was hashed although its stamp is valid")


def test_stamp_avoids_rehashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def counting_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
        calls.append(path)
        return sha256_file(path, chunk_size)

    monkeypatch.setattr(download, "sha256_file", counting_sha256)
    path = tmp_path / "model.pt"
    path.write_bytes(GOOD)

    assert verified_sha256(path) == GOOD_SHA256
    assert len(calls) == 1
    assert (tmp_path / "model.pt.sha256.json").is_file()

    assert verified_sha256(path) == GOOD_SHA256
    assert len(calls) == 1

    # A new mtime (same content) makes the stamp stale
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert verified_sha256(path) == GOOD_SHA256
    assert len(calls) == 2

    # New content gives a new hash, not the stamped one
    path.write_bytes(OTHER)
    assert verified_sha256(path) == OTHER_SHA256
    assert len(calls) == 3
    assert verified_sha256(path) == OTHER_SHA256
    assert len(calls) == 3


def test_damaged_stamp_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(OTHER)
    (tmp_path / "model.pt.sha256.json").write_text("{not json")

    assert verified_sha256(path) == OTHER_SHA256


def test_unwritable_stamp_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)  # no temporary file can be made beside the model
    path = tmp_path / "model.pt"
    path.write_bytes(OTHER)

    assert verified_sha256(path) == OTHER_SHA256
    assert _files_in(tmp_path) == ["model.pt"]


# ---------------------------------------------------------------------------------------------------------------------
# fetch_pretrained_file
# ---------------------------------------------------------------------------------------------------------------------


def test_fetch_downloads_then_uses_cache(server: LoopbackServer, tmp_path: Path) -> None:
    metadata = _metadata(server.url("/models"))
    path = fetch_pretrained_file("good", metadata, progress_bar=False)

    assert path == tmp_path / "models-cache" / "good.pt"
    assert path.read_bytes() == GOOD
    assert server.requests["/models/good.pt"] == 1

    assert fetch_pretrained_file("good", metadata, progress_bar=False) == path
    assert sum(server.requests.values()) == 1


def test_fetch_already_cached_makes_no_request(server: LoopbackServer, tmp_path: Path) -> None:
    cached = tmp_path / "models-cache" / "good.pt"
    cached.parent.mkdir()
    cached.write_bytes(GOOD)

    assert fetch_pretrained_file("good", _metadata(server.url("/models")), progress_bar=False) == cached
    assert sum(server.requests.values()) == 0


def test_fetch_uses_legacy_models_dir(server: LoopbackServer, tmp_path: Path) -> None:
    legacy = tmp_path / "models" / "good.pt"
    legacy.parent.mkdir()
    legacy.write_bytes(GOOD)

    path = fetch_pretrained_file("good", _metadata(server.url("/models")), progress_bar=False)
    assert path.resolve() == legacy.resolve()
    assert sum(server.requests.values()) == 0
    assert not (tmp_path / "models-cache" / "good.pt").exists()


def test_damaged_legacy_file_is_ignored_not_touched(
    server: LoopbackServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As the README says: a ./models file with a wrong hash is left as it is; a good copy goes to the cache."""
    legacy = tmp_path / "models" / "good.pt"
    legacy.parent.mkdir()
    legacy.write_bytes(OTHER)

    with caplog.at_level(logging.WARNING, logger="birder.download"):
        path = fetch_pretrained_file("good", _metadata(server.url("/models")), progress_bar=False)

    assert path == tmp_path / "models-cache" / "good.pt"
    assert path.read_bytes() == GOOD
    assert legacy.read_bytes() == OTHER
    assert "ignoring it" in caplog.text


def test_fetch_legacy_without_url(tmp_path: Path) -> None:
    legacy = tmp_path / "models" / "good.pt"
    legacy.parent.mkdir()
    legacy.write_bytes(GOOD)

    assert fetch_pretrained_file("good", _metadata(None), progress_bar=False).resolve() == legacy.resolve()


def test_fetch_replaces_damaged_cache(server: LoopbackServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cached = tmp_path / "models-cache" / "good.pt"
    cached.parent.mkdir()
    cached.write_bytes(OTHER)

    with caplog.at_level(logging.WARNING, logger="birder.download"):
        path = fetch_pretrained_file("good", _metadata(server.url("/models")), progress_bar=False)

    assert path == cached
    assert cached.read_bytes() == GOOD
    assert server.requests["/models/good.pt"] == 1
    assert _files_in(cached.parent) == ["good.pt", "good.pt.sha256.json"]
    assert OTHER_SHA256 in caplog.text
    assert GOOD_SHA256 in caplog.text


def test_fetch_damaged_cache_offline(closed_port_url: str, tmp_path: Path) -> None:
    cached = tmp_path / "models-cache" / "good.pt"
    cached.parent.mkdir()
    cached.write_bytes(OTHER)

    with pytest.raises(ChecksumMismatchError) as excinfo:
        fetch_pretrained_file("good", _metadata(closed_port_url), progress_bar=False)

    message = str(excinfo.value)
    assert OTHER_SHA256 in message
    assert GOOD_SHA256 in message
    assert str(cached) in message
    assert cached.read_bytes() == OTHER  # the bad file is only replaced by a verified one


def test_fetch_offline_names_destination(closed_port_url: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as excinfo:
        fetch_pretrained_file("good", _metadata(closed_port_url), progress_bar=False)

    assert str(tmp_path / "models-cache" / "good.pt") in str(excinfo.value)


def test_fetch_to_explicit_dst(server: LoopbackServer, tmp_path: Path) -> None:
    # A file in ./models is not considered when the caller names the destination
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "good.pt").write_bytes(GOOD)
    dst = tmp_path / "elsewhere" / "my_model.pt"

    assert fetch_pretrained_file("good", _metadata(server.url("/models")), dst=dst, progress_bar=False) == dst
    assert dst.read_bytes() == GOOD
    assert server.requests["/models/good.pt"] == 1


def test_fetch_without_url_or_file(tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as excinfo:
        fetch_pretrained_file("good", _metadata(None), progress_bar=False)

    assert str(tmp_path / "models-cache" / "good.pt") in str(excinfo.value)


def test_fetch_unknown_format() -> None:
    with pytest.raises(DownloadError) as excinfo:
        fetch_pretrained_file("good", _metadata("http://127.0.0.1:9/models"), "onnx", progress_bar=False)

    message = str(excinfo.value)
    assert "onnx" in message
    assert "pt" in message
    assert "safetensors" in message

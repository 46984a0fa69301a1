"""The server's bound on request bytes in flight: uploads beyond it get 503 before their bodies are read."""

import asyncio
import concurrent.futures
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_support import (
    SlowNet,
    memory_kib,
    padded_photo,
    reset_peak_memory,
    running_server,
    saved_and_loaded_tiny_model,
    server_process,
)

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from birder.serve.app import ServeSettings, create_app  # noqa: E402 (after the extras check)

MIB = 2**20
CLIENT_TIMEOUT = 60

# The flood: 40 uploads of 8 MiB at once (320 MiB) against a server holding at most 64 MiB of them.
FLOOD_UPLOADS = 40
FLOOD_UPLOAD_BYTES = 8 * MIB
FLOOD_INFLIGHT_MB = 64
# Above the bound: the read buffers' over-allocation, socket buffers, the requests refused meanwhile, allocator
# slack (measured: 3-7 MiB over the bound). Without the bound the server grew by 454 MiB under this flood.
FLOOD_MARGIN_MB = 64


async def flood(url: str, payload: bytes, count: int) -> list[tuple[int, Any]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=CLIENT_TIMEOUT) as client:

        async def upload() -> tuple[int, Any]:
            response = await client.post("/v1/classify", content=payload, headers={"content-type": "image/jpeg"})
            return (response.status_code, response.json())

        async with asyncio.timeout(120):
            return await asyncio.gather(*(upload() for _ in range(count)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from Linux's /proc")
def test_a_flood_of_large_uploads_keeps_the_server_memory_bounded(tmp_path: Path) -> None:
    saved_and_loaded_tiny_model(tmp_path)
    payload = padded_photo(FLOOD_UPLOAD_BYTES)
    small = padded_photo(64 * 1024)
    headers = {"content-type": "image/jpeg"}
    # Each batch takes 0.4 s: admitted uploads stay in flight while the rest of the flood arrives.
    with server_process(tmp_path / "tiny_birds.safetensors", max_inflight_mb=FLOOD_INFLIGHT_MB, delay_s=0.4) as server:
        (url, pid) = server
        warm_up = httpx.post(f"{url}/v1/classify", content=small, headers=headers, timeout=CLIENT_TIMEOUT)
        assert warm_up.status_code == 200, warm_up.text
        baseline_kib = memory_kib(pid, "VmRSS")  # torch, the model, the server: everything but the flood
        reset_peak_memory(pid)

        answers = asyncio.run(flood(url, payload, FLOOD_UPLOADS))
        peak_kib = memory_kib(pid, "VmHWM")

        after = httpx.post(f"{url}/v1/classify", content=small, headers=headers, timeout=CLIENT_TIMEOUT)
        health = httpx.get(f"{url}/healthz", timeout=CLIENT_TIMEOUT)

    statuses = [status for (status, _) in answers]
    growth_mib = (peak_kib - baseline_kib) / 1024
    print(
        f"flood: {statuses.count(200)} x 200, {statuses.count(503)} x 503; server RSS {baseline_kib / 1024:.0f} MiB "
        f"before, peak {peak_kib / 1024:.0f} MiB (+{growth_mib:.0f} MiB; bound {FLOOD_INFLIGHT_MB} MiB)"
    )
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
    for status, body in answers:
        if status == 503:
            assert set(body) == {"error"} and "retry" in body["error"], body
    assert growth_mib < FLOOD_INFLIGHT_MB + FLOOD_MARGIN_MB, f"server memory grew by {growth_mib:.0f} MiB"
    assert after.status_code == 200, after.text
    assert health.status_code == 200 and health.json()["inflight_bytes"] == 0


def _raw_request(url: str, head: bytes) -> tuple[int, bytes]:
    """Sends only a request's head (no body) and reads the answer: proof the server did not wait for the body."""
    (host, port) = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection without an answer"
            received += chunk
        (status_line, _, rest) = received.partition(b"\r\n")
        (header_block, _, body) = rest.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in header_block.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection mid-answer"
            body += chunk
    return (int(status_line.split()[1]), body)


@contextlib.contextmanager
def posting_in_background(url: str, content: bytes, headers: dict[str, str]) -> Iterator[concurrent.futures.Future]:
    """Posts to /v1/classify in a thread while the ``with`` block runs; yields the future of its response."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(httpx.post, f"{url}/v1/classify", content=content, headers=headers, timeout=CLIENT_TIMEOUT)


def test_uploads_over_the_inflight_bound_get_503_before_their_body_declared_or_chunked(tmp_path: Path) -> None:
    (net, model_info) = saved_and_loaded_tiny_model(tmp_path)
    slow_net = SlowNet(net, delay_s=1.5)
    settings = ServeSettings(max_upload_bytes=MIB, max_inflight_bytes=MIB, batch_window_ms=1, timeout_s=30)
    upload = padded_photo(600 * 1024)  # one fits in the bound, two do not
    headers = {"content-type": "image/jpeg"}

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(upload), 64 * 1024):
            yield upload[start : start + 64 * 1024]

    with running_server(create_app(slow_net, model_info, name="slow", settings=settings)) as url:
        slow_net.slow.set()
        with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT) as client:
            with posting_in_background(url, upload, headers) as holding:
                assert slow_net.entered.wait(10), "the first upload never reached the model"
                started = time.monotonic()
                head = "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                head += f"Content-Length: {len(upload)}\r\n\r\n"
                (declared_status, declared_body) = _raw_request(url, head.encode())
                chunked = client.post("/v1/classify", content=chunks(), headers=headers)
                health = client.get("/healthz")
                refused_within = time.monotonic() - started
            slow_net.slow.clear()
            later = client.post("/v1/classify", content=upload, headers=headers)

    assert holding.result(timeout=CLIENT_TIMEOUT).status_code == 200
    assert declared_status == 503, declared_body
    assert b'"error"' in declared_body and b"retry" in declared_body
    assert chunked.status_code == 503, chunked.text
    assert "retry" in chunked.json()["error"]
    assert refused_within < 1.5  # answered while the first upload was still in the model
    assert health.status_code == 200  # requests without a body always pass
    assert health.json()["inflight_bytes"] == len(upload)
    assert later.status_code == 200  # the bound was released with the first answer


# The command line


def test_cli_max_inflight_option_reaches_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from birder.scripts.serve import build_parser, main, settings_from_args

    parser = build_parser()
    assert "--max-inflight-mb" in parser.format_help()
    assert parser.parse_args(["--weights", "m.pt"]).max_inflight_mb == 256
    args = parser.parse_args(["--weights", "m.pt", "--max-inflight-mb", "64", "--max-upload-mb", "8"])
    assert settings_from_args(args).max_inflight_bytes == 64 * MIB

    with pytest.raises(SystemExit) as exit_info:
        main(["--weights", "m.pt", "--max-inflight-mb", "10", "--max-upload-mb", "20"])
    assert exit_info.value.code == 2
    assert "--max-inflight-mb" in capsys.readouterr().err


def test_create_app_refuses_an_inflight_bound_below_the_upload_limit(tmp_path: Path) -> None:
    (net, model_info) = saved_and_loaded_tiny_model(tmp_path)
    with pytest.raises(ValueError, match="max_inflight_bytes"):
        create_app(net, model_info, settings=ServeSettings(max_upload_bytes=2 * MIB, max_inflight_bytes=MIB))

"""The HTTP service: a real uvicorn server on a loopback port, a tiny ViT, concurrent good and bad requests."""

import asyncio
import base64
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from serve_support import (
    SPECIES,
    SlowNet,
    encode,
    expected_outputs,
    make_photos,
    running_server,
    saved_and_loaded_tiny_model,
    tiny_model_info,
)

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from birder.serve.app import ServeSettings, create_app  # noqa: E402 (after the extras check)
from birder.serve.batcher import DynamicBatcher, QueueFullError  # noqa: E402

MAX_UPLOAD = 256 * 1024
MAX_PIXELS = 1_000_000
PROB_TOLERANCE = 1e-5


@dataclass
class Served:
    url: str
    net: torch.nn.Module
    photos: dict[str, Path]
    expected: dict[str, tuple[np.ndarray, np.ndarray]]


# httpx waits 5 s by default: too little for a loaded 2-core CI machine serving a batch, so every plain request
# gets this much (the server's own timeout behaviour is tested separately).
CLIENT_TIMEOUT = 60


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("serve")
    (net, model_info) = saved_and_loaded_tiny_model(directory)
    photos = make_photos(directory / "photos")
    expected = {name: expected_outputs(net, model_info, path) for (name, path) in photos.items()}
    settings = ServeSettings(
        max_batch_size=16, batch_window_ms=20, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, timeout_s=60
    )
    app = create_app(net, model_info, name="tiny-birds", settings=settings)
    with running_server(app) as url:
        yield Served(url, net, photos, expected)


# Requests: each knows how to send itself and what the answer must be.


@dataclass
class Case:
    path: str
    kwargs: dict[str, Any]
    status: int
    photo: str | None = None  # a good request: the photo whose outputs it must return
    error: str = ""  # a bad request: a piece of its error message


def good_cases(photos: dict[str, Path]) -> list[Case]:
    cases = []
    for name, path in photos.items():
        data = path.read_bytes()
        cases += [
            Case("/v1/classify", {"files": {"image": (name, data, "application/octet-stream")}}, 200, photo=name),
            Case("/v1/classify", {"json": {"image": base64.b64encode(data).decode(), "top_k": 3}}, 200, photo=name),
            Case("/v1/classify", {"content": data, "headers": {"content-type": "image/png"}}, 200, photo=name),
            Case("/v1/embed", {"files": {"photo": (name, data, "image/jpeg")}}, 200, photo=name),
        ]
    return cases


def bad_cases(photos: dict[str, Path]) -> list[Case]:
    jpeg = photos["robin.jpg"].read_bytes()
    huge_png = encode(Image.new("L", (2000, 1000)), "PNG")  # 2 MP of zeros: a few KB on the wire
    assert len(huge_png) < MAX_UPLOAD

    def upload(name: str, data: bytes) -> dict[str, Any]:
        return {"files": {"image": (name, data, "image/jpeg")}}

    return [
        Case("/v1/classify", upload("cut.jpg", jpeg[: len(jpeg) // 3]), 422, error="truncated or corrupt"),
        Case("/v1/classify", upload("notes.jpg", b"not a photo at all"), 422, error="not a recognised image format"),
        Case("/v1/classify", upload("empty.jpg", b""), 422, error="empty file"),
        Case("/v1/embed", upload("huge.png", huge_png), 413, error="2000x1000"),
        Case("/v1/classify", upload("big.jpg", bytes(MAX_UPLOAD + 1024)), 413, error="upload too large"),
        Case("/v1/classify", {"json": {"image": "%%% not base64"}}, 400, error="base64"),
        Case("/v1/classify", {"json": {"picture": "abc"}}, 400, error='"image"'),
        Case("/v1/classify", {"files": {"note": (None, "hello")}}, 400, error="no image"),
        Case(
            "/v1/classify", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, error="content type"
        ),
        Case("/v1/classify?top_k=many", upload("robin.jpg", jpeg), 400, error="top_k"),
    ]


def check_answer(served: Served, case: Case, response: Any) -> None:
    assert response.status_code == case.status, (case.path, case.status, response.text[:300])
    body = response.json()
    if case.photo is None:
        assert set(body) == {"error"}, body
        assert case.error in body["error"], body
        assert "\n" not in body["error"]
        return

    (probs, embedding) = served.expected[case.photo]
    assert body["model"] == "tiny-birds"
    assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"] >= 0
    if case.path == "/v1/embed":
        assert body["dim"] == embedding.shape[0]
        np.testing.assert_allclose(body["embedding"], embedding, atol=1e-5, rtol=0)
        return

    predictions = body["predictions"]
    top_k = case.kwargs.get("json", {}).get("top_k", 5)
    assert len(predictions) == top_k
    order = np.argsort(-probs, kind="stable")[:top_k]
    assert [p["index"] for p in predictions] == order.tolist()
    assert [p["species"] for p in predictions] == [SPECIES[i] for i in order]
    np.testing.assert_allclose([p["probability"] for p in predictions], probs[order], atol=PROB_TOLERANCE, rtol=0)


async def send_all(url: str, cases: list[Case]) -> list[Any]:
    limits = httpx.Limits(max_connections=len(cases), max_keepalive_connections=len(cases))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        return await asyncio.gather(*(client.post(case.path, **case.kwargs) for case in cases))


def test_200_concurrent_requests_good_and_bad(served: Served) -> None:
    before = httpx.get(f"{served.url}/healthz", timeout=CLIENT_TIMEOUT).json()
    good = good_cases(served.photos)
    bad = bad_cases(served.photos)
    cases = [good[i % len(good)] for i in range(150)] + [bad[i % len(bad)] for i in range(50)]
    random.Random(0).shuffle(cases)

    responses = asyncio.run(send_all(served.url, cases))

    for case, response in zip(cases, responses, strict=True):
        check_answer(served, case, response)
    health = httpx.get(f"{served.url}/healthz", timeout=CLIENT_TIMEOUT)
    assert health.status_code == 200
    after = health.json()
    assert after["status"] == "ok"
    # The concurrent requests shared batches; the decodable good images are 150 of them, plus none of the bad.
    images = after["images"] - before["images"]
    batches = after["batches"] - before["batches"]
    assert images == 150
    assert images / batches > 1, after
    assert after["mean_batch_size"] > 1
    assert after["largest_batch"] <= 16
    assert after["queue_depth"] == 0


def test_every_bad_request_gets_its_error_and_the_server_keeps_serving(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=CLIENT_TIMEOUT) as client:
        for case in bad_cases(served.photos):
            check_answer(served, case, client.post(case.path, **case.kwargs))
        for case in good_cases(served.photos)[:4]:
            check_answer(served, case, client.post(case.path, **case.kwargs))
        assert client.get("/healthz").json()["status"] == "ok"


def test_unknown_routes_and_methods_answer_json(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=CLIENT_TIMEOUT) as client:
        missing = client.get("/v2/nothing")
        wrong_method = client.get("/v1/classify")
    assert missing.status_code == 404 and "error" in missing.json()
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_chunked_upload_over_the_limit_is_refused(served: Served) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the body is counted as it arrives
        for _ in range(MAX_UPLOAD // 8192 + 4):
            yield bytes(8192)

    response = httpx.post(
        f"{served.url}/v1/classify", content=chunks(), headers={"content-type": "image/jpeg"}, timeout=30
    )
    assert response.status_code == 413
    assert "upload too large" in response.json()["error"]


def test_top_k_larger_than_the_classes_gives_them_all(served: Served) -> None:
    data = served.photos["wren.png"].read_bytes()
    response = httpx.post(
        f"{served.url}/v1/classify?top_k=50",
        content=data,
        headers={"content-type": "image/png"},
        timeout=CLIENT_TIMEOUT,
    )
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == len(SPECIES)


def test_models_and_health_describe_the_service(served: Served) -> None:
    models = httpx.get(f"{served.url}/v1/models", timeout=CLIENT_TIMEOUT).json()["models"]
    assert len(models) == 1
    assert models[0]["name"] == "tiny-birds"
    assert models[0]["network"] == "vit_b16"
    assert models[0]["classes"] == SPECIES
    assert models[0]["input_size"] == [32, 48]
    assert models[0]["embedding_size"] == 32
    health = httpx.get(f"{served.url}/healthz", timeout=CLIENT_TIMEOUT).json()
    assert {"status", "model", "mean_batch_size", "batches", "images", "queue_depth"} <= set(health)


def test_page_and_assets_are_served_locally(served: Served) -> None:
    page = httpx.get(served.url, timeout=CLIENT_TIMEOUT)
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    for asset in ("/static/app.js", "/static/style.css", "/static/base.css", "/static/favicon.svg"):
        response = httpx.get(served.url + asset, timeout=CLIENT_TIMEOUT)
        assert response.status_code == 200
        assert "https://" not in response.text


def test_request_timeout_answers_504_and_the_server_recovers(tmp_path: Path) -> None:
    (net, model_info) = saved_and_loaded_tiny_model(tmp_path)
    slow_net = SlowNet(net)
    photo = make_photos(tmp_path / "photos")["robin.jpg"].read_bytes()
    app = create_app(slow_net, model_info, name="slow", settings=ServeSettings(timeout_s=0.3, batch_window_ms=1))
    headers = {"content-type": "image/jpeg"}
    with running_server(app) as url:
        slow_net.slow.set()
        timed_out = httpx.post(f"{url}/v1/classify", content=photo, headers=headers, timeout=30)
        slow_net.slow.clear()
        assert slow_net.finished.wait(10)  # the stalled batch is through (a fixed sleep was flaky on a busy machine)
        recovered = httpx.post(f"{url}/v1/classify", content=photo, headers=headers, timeout=30)
        health = httpx.get(f"{url}/healthz", timeout=CLIENT_TIMEOUT)

    assert timed_out.status_code == 504
    assert "timed out" in timed_out.json()["error"]
    assert recovered.status_code == 200
    assert health.json()["status"] == "ok"


class _TorchFailingToStackOnce:
    """Stands in for ``torch`` in the batcher module: its first ``stack`` fails, as a bug in the collect loop would."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def stack(self, tensors: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("injected failure while forming a batch")
        return torch.stack(tensors, *args, **kwargs)


def test_a_batch_failing_in_the_collect_loop_answers_500_and_the_server_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import birder.serve.batcher as batcher_module

    (net, model_info) = saved_and_loaded_tiny_model(tmp_path)
    photo = make_photos(tmp_path / "photos")["robin.jpg"].read_bytes()
    monkeypatch.setattr(batcher_module, "torch", _TorchFailingToStackOnce())
    # A short timeout: were the failure to leave the request hanging, it would end as 504 within seconds.
    app = create_app(net, model_info, name="fragile", settings=ServeSettings(timeout_s=5, batch_window_ms=1))
    headers = {"content-type": "image/jpeg"}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT) as client:
        failed = client.post("/v1/classify", content=photo, headers=headers)
        health = client.get("/healthz")
        served = client.post("/v1/classify", content=photo, headers=headers)

    assert failed.status_code == 500, failed.text
    assert set(failed.json()) == {"error"} and "\n" not in failed.json()["error"]
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert served.status_code == 200
    assert served.json()["predictions"]


def test_headless_encoder_embeds_but_does_not_classify(tmp_path: Path) -> None:
    from conftest import make_tiny_vit

    net = make_tiny_vit(num_classes=0, size=(32, 48))
    photo = make_photos(tmp_path / "photos")["wren.png"].read_bytes()
    with running_server(create_app(net, tiny_model_info(num_classes=0), name="encoder")) as url:
        classify = httpx.post(
            f"{url}/v1/classify", content=photo, headers={"content-type": "image/png"}, timeout=CLIENT_TIMEOUT
        )
        embed = httpx.post(
            f"{url}/v1/embed", content=photo, headers={"content-type": "image/png"}, timeout=CLIENT_TIMEOUT
        )
    assert classify.status_code == 409
    assert "/v1/embed" in classify.json()["error"]
    assert embed.status_code == 200
    assert embed.json()["dim"] == 32


def test_serves_an_exported_model(tmp_path: Path) -> None:
    from birder.io.export import export_model, load_exported

    (net, model_info) = saved_and_loaded_tiny_model(tmp_path)
    photos = make_photos(tmp_path / "photos")
    (exported, exported_info) = load_exported(export_model(net, tmp_path / "tiny.pts", model_info))
    (probs, _) = expected_outputs(net, model_info, photos["tit.png"])
    with running_server(create_app(exported, exported_info, name="exported")) as url:
        response = httpx.post(
            f"{url}/v1/classify", files={"image": ("tit.png", photos["tit.png"].read_bytes())}, timeout=CLIENT_TIMEOUT
        )
    assert response.status_code == 200
    top = response.json()["predictions"][0]
    assert top["index"] == int(np.argmax(probs))
    assert abs(top["probability"] - float(probs.max())) < 1e-5


# The batcher on its own


def run_batcher(coroutine_factory: Any) -> Any:
    return asyncio.run(coroutine_factory())


def test_batcher_groups_concurrent_requests_and_keeps_order() -> None:
    calls: list[int] = []

    def double(inputs: torch.Tensor) -> list[float]:
        calls.append(inputs.shape[0])
        return (inputs * 2).flatten().tolist()

    async def scenario() -> list[tuple[float, Any]]:
        batcher = DynamicBatcher(double, max_batch_size=8, window_s=0.05)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(torch.tensor([float(i)])) for i in range(20)))
        finally:
            await batcher.stop()

    results = run_batcher(scenario)
    assert [result for (result, _) in results] == [2.0 * i for i in range(20)]
    assert max(calls) == 8 and sum(calls) == 20
    assert all(info.batch_size in calls for (_, info) in results)


def test_batcher_reports_errors_to_the_batch_and_carries_on() -> None:
    def fragile(inputs: torch.Tensor) -> list[float]:
        if (inputs < 0).any():
            raise ValueError("negative input")
        return inputs.flatten().tolist()

    async def scenario() -> tuple[Any, Any]:
        batcher = DynamicBatcher(fragile, max_batch_size=4, window_s=0.0)
        await batcher.start()
        try:
            with pytest.raises(ValueError, match="negative"):
                await batcher.submit(torch.tensor([-1.0]))
            return (await batcher.submit(torch.tensor([3.0])), batcher.stats)
        finally:
            await batcher.stop()

    ((value, info), stats) = run_batcher(scenario)
    assert value == 3.0 and info.batch_size == 1
    assert stats.batches == 1


def test_batcher_fails_only_a_batch_whose_inputs_do_not_stack_and_carries_on() -> None:
    async def scenario() -> tuple[Any, Any, bool]:
        batcher = DynamicBatcher(lambda inputs: inputs.sum(dim=1).tolist(), max_batch_size=4, window_s=0.05)
        await batcher.start()
        try:
            # Two shapes in one batch: torch.stack fails in the collect loop itself, not in run_batch.
            mixed = [batcher.submit(torch.ones(2)), batcher.submit(torch.ones(3))]
            outcomes = await asyncio.wait_for(asyncio.gather(*mixed, return_exceptions=True), 5)
            (value, _) = await asyncio.wait_for(batcher.submit(torch.ones(2)), 5)
            return (outcomes, value, batcher.alive)
        finally:
            await batcher.stop()

    (outcomes, value, alive) = run_batcher(scenario)
    assert all(isinstance(outcome, RuntimeError) for outcome in outcomes), outcomes
    assert value == 2.0
    assert alive


def test_batcher_stop_lets_the_event_loop_run_while_the_last_batch_finishes() -> None:
    release = threading.Event()
    entered = threading.Event()

    def blocking(inputs: torch.Tensor) -> list[float]:
        entered.set()
        release.wait(5)
        return inputs.flatten().tolist()

    async def scenario() -> tuple[list[float], float, float, Any]:
        batcher = DynamicBatcher(blocking, max_batch_size=1, window_s=0.0)
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit(torch.tensor([7.0])))
        await asyncio.to_thread(entered.wait, 5)
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.01)

        ticking = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        timer = threading.Timer(0.5, release.set)  # the batch ends half a second into stop()
        timer.start()
        started = time.perf_counter()
        try:
            await batcher.stop()
        finally:
            release.set()
            timer.join()
        stopped = time.perf_counter()
        ticking.cancel()
        return (ticks, started, stopped, await running)

    (ticks, started, stopped, (value, _)) = run_batcher(scenario)
    during = [tick for tick in ticks if started <= tick <= stopped]
    assert stopped - started >= 0.4  # stop() did wait for the running batch...
    assert len(during) >= 10, f"{len(during)} ticks in {stopped - started:.2f} s"  # ...without freezing the loop
    assert value == 7.0  # and that batch's request got its answer


def test_batcher_refuses_when_the_queue_is_full_and_drops_timed_out_requests() -> None:
    release = threading.Event()
    seen: list[float] = []

    def blocking(inputs: torch.Tensor) -> list[float]:
        release.wait(5)
        seen.extend(inputs.flatten().tolist())
        return inputs.flatten().tolist()

    async def scenario() -> None:
        batcher = DynamicBatcher(blocking, max_batch_size=1, window_s=0.0, max_queue=2)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(torch.tensor([1.0])))
            await asyncio.sleep(0.05)  # the first batch is running (blocked)
            second = asyncio.ensure_future(batcher.submit(torch.tensor([2.0])))
            await asyncio.sleep(0.05)  # held by the collector, waiting for the worker
            third = asyncio.ensure_future(asyncio.wait_for(batcher.submit(torch.tensor([3.0])), 0.05))
            fourth = asyncio.ensure_future(batcher.submit(torch.tensor([4.0])))
            await asyncio.sleep(0.01)
            with pytest.raises(QueueFullError):
                await batcher.submit(torch.tensor([5.0]))
            with pytest.raises(TimeoutError):
                await third
            release.set()
            assert (await first)[0] == 1.0
            assert (await second)[0] == 2.0
            assert (await fourth)[0] == 4.0
        finally:
            release.set()
            await batcher.stop()

    run_batcher(scenario)
    assert seen == [1.0, 2.0, 4.0]  # the timed-out request was never computed


# The command line


def test_cli_defaults_to_loopback() -> None:
    from birder.scripts.serve import build_parser

    args = build_parser().parse_args(["--weights", "model.safetensors"])
    assert args.host == "127.0.0.1"
    assert args.max_batch_size == 32


def test_cli_reports_a_missing_model_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from birder.scripts.serve import main

    assert main(["--weights", str(tmp_path / "missing.safetensors")]) == 2
    error = capsys.readouterr().err.strip()
    assert "missing.safetensors" in error and "\n" not in error


def test_cli_reports_a_bad_device_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from birder.scripts.serve import main

    saved_and_loaded_tiny_model(tmp_path)
    code = main(["--weights", str(tmp_path / "tiny_birds.safetensors"), "--device", "warp9"])
    error = capsys.readouterr().err.strip()
    assert code != 0
    assert "warp9" in error and "\n" not in error and "Traceback" not in error


def test_cli_rejects_bad_limits(capsys: pytest.CaptureFixture[str]) -> None:
    from birder.scripts.serve import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--weights", "m.pt", "--max-batch-size", "0"])
    assert exit_info.value.code == 2
    assert "--max-batch-size" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_birder_serve_command_serves_a_saved_model(tmp_path: Path) -> None:
    (net, model_info) = saved_and_loaded_tiny_model(tmp_path)
    photo = make_photos(tmp_path / "photos")["robin.jpg"]
    (probs, _) = expected_outputs(net, model_info, photo)
    port = _free_port()
    command = [sys.executable, "-m", "birder.scripts.serve", "--weights", str(tmp_path / "tiny_birds.safetensors")]
    command += ["--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "birder-serve did not start"
            time.sleep(0.2)
        response = httpx.post(
            f"{url}/v1/classify", files={"image": ("robin.jpg", photo.read_bytes())}, timeout=CLIENT_TIMEOUT
        )
    finally:
        process.terminate()
        process.wait(timeout=20)

    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "tiny_birds"
    assert body["predictions"][0]["species"] == SPECIES[int(np.argmax(probs))]


@pytest.mark.slow
def test_throughput_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    # Keeps benchmarks/serve.py working: a tiny network, few photos (the figures themselves are not checked).
    from benchmarks.serve import main

    figures = main(["--network", "vit_t16", "--tiny", "--size", "64", "--images", "24", "--concurrency", "8", "--json"])
    assert figures["predict_images_per_s"] > 0 and figures["serve_images_per_s"] > 0
    assert figures["server_mean_batch_size"] >= 1
    assert '"ratio"' in capsys.readouterr().out

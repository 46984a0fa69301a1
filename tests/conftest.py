"""Shared test fixtures: an isolated model cache, a loopback file server, seeded tiny networks."""

import contextlib
import shutil
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from birder.model_registry import registry

FIXTURES = Path(__file__).parent / "fixtures"

# A ViT small enough to build, save and run in milliseconds, with every kind of layer of the real one.
TINY_VIT_CONFIG = {"hidden_dim": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64}


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread inside the block: reductions split across threads can differ in the last bits, and
    tiny models on a shared 2-core machine run far slower oversubscribed. The modules' ``single_thread``
    fixtures use it, each with the scope its other fixtures need."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated_models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own download cache and working directory: nothing touches the user's files."""
    cache = tmp_path / "models-cache"
    monkeypatch.setenv("BIRDER_MODELS_DIR", str(cache))
    monkeypatch.chdir(tmp_path)
    # A proxy from the environment would route 127.0.0.1 requests elsewhere.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return cache


@pytest.fixture(autouse=True, scope="session")
def pinned_float32() -> Iterator[None]:
    """``--dtype auto`` (the default) means float32 in every test, on any CPU or GPU: exact comparisons hold.

    Session-wide, so that module-scoped fixtures (set up before any function's fixtures) run in float32 too: on a
    CPU with native bf16 they ran in bfloat16, and a module's reference run no longer matched its tests' runs. The
    automatic choice itself is tested on faked flag sets (tests/test_dtype_choice.py), with this unset.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BIRDER_DTYPE", "float32")
        yield


@pytest.fixture
def restore_manifest() -> Iterator[None]:
    """Undo the test's ``register_weights`` calls."""
    saved = dict(registry._pretrained)
    yield
    registry._pretrained.clear()
    registry._pretrained.update(saved)


@dataclass
class Payload:
    # Bytes, or a file streamed from disk (a full-size checkpoint need not sit in memory).
    body: bytes | Path
    # Content-Length announced; more than len(body) simulates a transfer cut off midway.
    declared_length: int | None = None


@dataclass
class LoopbackServer:
    """A real HTTP server on 127.0.0.1 serving in-memory files, counting the requests per path."""

    base_url: str = ""
    payloads: dict[str, Payload] = field(default_factory=dict)
    requests: Counter = field(default_factory=Counter)
    user_agents: list[str] = field(default_factory=list)

    def add(self, path: str, body: bytes | Path, declared_length: int | None = None) -> str:
        self.payloads[path] = Payload(body, declared_length)
        return self.url(path)

    def url(self, path: str) -> str:
        return self.base_url + path


def _handler_for(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with lock:
                server.requests[self.path] += 1
                server.user_agents.append(self.headers.get("User-Agent", ""))

            payload = server.payloads.get(self.path)
            if payload is None:
                self.send_error(404, "Not Found")
                return

            body = payload.body
            length = body.stat().st_size if isinstance(body, Path) else len(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(payload.declared_length or length))
            self.end_headers()
            if isinstance(body, Path):
                with open(body, "rb") as handle:
                    shutil.copyfileobj(handle, self.wfile, 1 << 20)
            else:
                self.wfile.write(body)
            if payload.declared_length is not None:
                self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def http_server() -> Iterator[LoopbackServer]:
    state = LoopbackServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(state))
    httpd.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_port_url() -> str:
    """A base URL on a port that was just free and is now closed: connecting is refused, like an offline host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    return f"http://127.0.0.1:{port}/models"


def make_tiny_vit(num_classes: int = 5, network: str = "vit_b16", size: tuple[int, int] = (32, 48), seed: int = 0):
    """A seeded tiny ViT in eval mode, its config override recorded like any registry build."""
    torch.manual_seed(seed)
    net = registry.net_factory(network, num_classes, config=TINY_VIT_CONFIG, size=size)
    return net.eval()

"""``birder-serve``: an HTTP service (and web page) classifying photos with one model.

Examples::

    birder-serve -n vit_l16_mim-eu-common
    birder-serve --weights my_model.safetensors --port 8080
    birder-serve --weights vit_l16.pt --network vit_l16 --max-batch-size 16
    birder-serve --weights my_model.onnx          # exports (.pts, .pt2, .onnx) load too
    birder-serve -n vit_l16_mim-eu-common --detector det.pt   # adds POST /v1/detect: every bird in the photo

Binds to 127.0.0.1 unless ``--host`` says otherwise: put a reverse proxy with authentication in front of it
before opening it to a network.
"""

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from birder.errors import BirderError
from birder.geo.predict import add_prior_arguments
from birder.inference.optimize import DTYPE_CHOICES
from birder.log_setup import configure_logging
from birder.run_options import positive_int, positive_number
from birder.scripts.common import add_decision_arguments, add_run_arguments, model_command_parser, run_command

if TYPE_CHECKING:
    from birder.geo.prior import LocationPrior
    from birder.inference.decision import DecisionPolicy
    from birder.inference.model import InferenceModel
    from birder.inference.optimize import DtypeChoice
    from birder.serve.app import ServeSettings
    from birder.serve.detect import ServedDetector

PROG = "birder-serve"
logger = logging.getLogger("birder.serve")

# The service's limits, each a count or an amount above 0: (option, argparse type, default, what it bounds)
_LIMITS: tuple[tuple[str, Callable[[str], float], float, str], ...] = (
    ("--max-batch-size", positive_int, 32, "images per batch"),
    ("--max-upload-mb", positive_number, 20.0, "largest request body, in MiB"),
    (
        "--max-inflight-mb",
        positive_number,
        256.0,
        "request bodies held at once, in MiB, at least --max-upload-mb; uploads beyond it get 503 before they are read",
    ),
    ("--max-pixels", positive_int, 50_000_000, "largest image, in pixels"),
    (
        "--max-explanations",
        positive_int,
        8,
        "/v1/explain requests waiting or running at once (one runs at a time); more get 503",
    ),
    ("--timeout", positive_number, 30.0, "request timeout in seconds, every route"),
    ("--top-k", positive_int, 5, "species returned by default"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = model_command_parser(
        PROG,
        "Serve a birder model over HTTP: POST /v1/classify, POST /v1/embed, GET /v1/models, "
        "GET /healthz, and a web page at /.",
    )
    parser.add_argument("--model-name", help="name reported by the API (default: the model's name or file stem)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    # --device, --dtype, -j/--num-workers, --no-progress (a download's): the execution options every command shares
    add_run_arguments(
        parser, workers_default_text="2 to 8, by CPU cores", workers_help="threads decoding photos", dtype=DTYPE_CHOICES
    )
    for option, kind, default, bounds in _LIMITS:
        parser.add_argument(option, type=kind, default=default, help=f"{bounds} (default: %(default)s)")
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=5.0,
        help="longest a request waits for others to share its batch (default: %(default)s ms)",
    )
    parser.add_argument(
        "--max-decode-mb",
        type=float,
        help="memory for decoding photos at once, in MiB; a photo waits for room (default: 26 bytes per pixel of "
        "--max-pixels, 1244 MiB at 50 MP: one 8-bit photo with alpha at the pixel limit)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--index", type=Path, metavar="DIR", help="a birder-index folder built with this model: adds /v1/similar"
    )
    parser.add_argument(
        "--min-prob", type=float, default=0.0, metavar="P", help="global species threshold of the answer (default: 0)"
    )
    detection = parser.add_argument_group("detection (POST /v1/detect: each box found, classified)")
    detection.add_argument("--detector", type=Path, metavar="FILE", help="a detector file (birder-train-det)")
    detection.add_argument(
        "--det-threshold", type=float, default=0.5, metavar="S", help="boxes scoring at least S (default: 0.5)"
    )
    detection.add_argument(
        "--crop-margin", type=float, default=0.1, metavar="F", help="grow each crop by F of its box (default: 0.1)"
    )
    add_decision_arguments(parser)
    add_prior_arguments(parser, places=False)  # the place and date come with each request
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # The limits (_LIMITS) are above 0 already, checked by their argparse types; here, what one says of another
    if args.max_inflight_mb < args.max_upload_mb:
        parser.error(
            f"--max-inflight-mb ({args.max_inflight_mb:g}) must be at least --max-upload-mb ({args.max_upload_mb:g}), "
            "or the largest uploads could never be admitted"
        )
    if args.max_decode_mb is not None:
        from birder.serve.memory import BYTES_PER_PIXEL_8BIT, DECODE_OVERHEAD_BYTES

        smallest = (args.max_pixels * BYTES_PER_PIXEL_8BIT + DECODE_OVERHEAD_BYTES) / 2**20
        if not args.max_decode_mb >= smallest:  # NaN too
            parser.error(
                f"--max-decode-mb ({args.max_decode_mb:g}) cannot hold one 8-bit photo of --max-pixels "
                f"({args.max_pixels}): give at least {smallest:.0f}, or lower --max-pixels"
            )
    if args.batch_window_ms < 0:
        parser.error(f"--batch-window-ms cannot be negative, got {args.batch_window_ms}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    if not 0 <= args.det_threshold <= 1:
        parser.error(f"--det-threshold must be between 0 and 1, got {args.det_threshold}")
    if args.crop_margin < 0:
        parser.error(f"--crop-margin must be a fraction >= 0, got {args.crop_margin}")


def load_for_serving(args: argparse.Namespace) -> tuple["InferenceModel", str]:
    """The model of ``-n`` or ``--weights``, ready for inference on the chosen device (float32 as loaded), and the
    name the API reports (:func:`birder.inference.model.load_for_inference`, as every command loads one)."""
    from birder.inference.model import load_for_inference

    # --device is resolved before anything loads: a bad one is a one-line BirderError, not torch's traceback.
    model = load_for_inference(args.model, args.weights, args.network, device=args.device, progress_bar=args.progress)
    default_name = Path(args.weights).stem if args.weights is not None else args.model
    return (model, args.model_name or default_name)


def apply_dtype(net: object, requested: str) -> tuple[object, "DtypeChoice"]:
    """``net`` converted to the ``--dtype`` choice for its device, and that choice (said once in the log).

    Exports (.pts, .pt2, .onnx) run as they were exported: their dtype is fixed in the file.
    """
    from birder.inference.model import convert_dtype
    from birder.net.base import BaseNet

    device = next(net.parameters()).device if isinstance(net, BaseNet) else torch.device("cpu")
    (net, choice) = convert_dtype(net, requested, device)  # type: ignore[arg-type]
    logger.info("dtype %s", choice)
    return (net, choice)


def load_serving_prior(args: argparse.Namespace, class_names: list[str]) -> "LocationPrior | None":
    """The ``--prior`` file for the served model's classes (refused in one line when built for others)."""
    if args.prior is None:
        return None
    if not 0 <= args.prior_strength < float("inf"):  # NaN and infinity would give every species the same answer
        raise BirderError(f"--prior-strength must be a number >= 0, got {args.prior_strength}")
    from birder.geo.prior_file import load_prior_for

    return load_prior_for(args.prior, class_names)


def decision_policy(args: argparse.Namespace, model: "InferenceModel") -> "DecisionPolicy":
    """How answers are decided (:mod:`birder.inference.decision`): the model's calibration and the options."""
    from birder.inference.decision import policy_from_options
    from birder.scripts.common import decision_options

    return policy_from_options(model.net, model.class_names, decision_options(args), min_prob=args.min_prob)


def load_serving_index(directory: Path | None, model: "InferenceModel") -> object:
    """The index of ``--index`` (None without it), refused unless built with this model and preprocessing."""
    if directory is None:
        return None
    from birder.search.fingerprint import model_fingerprint
    from birder.search.store import PhotoIndex, check_model

    index = PhotoIndex(directory)
    check_model(index.info, model_fingerprint(model.net, model.transform), Path(directory))
    return index


def load_serving_detector(args: argparse.Namespace, model: "InferenceModel") -> "ServedDetector | None":
    """The ``--detector`` file (None without it), on the classifier's device (an export's: the CPU), in float32."""
    if args.detector is None:
        return None
    from birder.serve.detect import load_served_detector

    device = model.device if hasattr(model.net, "parameters") else torch.device("cpu")
    return load_served_detector(args.detector, device, threshold=args.det_threshold, margin=args.crop_margin)


def settings_from_args(args: argparse.Namespace) -> "ServeSettings":
    from birder.serve.app import ServeSettings

    # -j 0 (elsewhere: decode in the main process) is one thread here: a server never decodes on its event loop
    decoding = {} if args.num_workers is None else {"decode_workers": max(1, args.num_workers)}
    return ServeSettings(
        **decoding,
        max_batch_size=args.max_batch_size,
        batch_window_ms=args.batch_window_ms,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_inflight_bytes=int(args.max_inflight_mb * 2**20),
        max_pixels=args.max_pixels,
        max_decode_bytes=int(args.max_decode_mb * 2**20) if args.max_decode_mb is not None else None,
        max_explanations=args.max_explanations,
        timeout_s=args.timeout,
        default_top_k=args.top_k,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    configure_logging(args.log_level.upper(), "%(asctime)s %(levelname)s %(name)s: %(message)s")

    return run_command(PROG, lambda: serve(args))


def serve(args: argparse.Namespace) -> None:
    """Load what ``args`` names and serve it until stopped (a user error raises a :class:`BirderError`)."""
    try:
        import uvicorn

        from birder.serve.app import create_app
    except ImportError as err:
        raise BirderError(f"{err}; install the extra: pip install 'birder[serve]'") from None

    (model, name) = load_for_serving(args)
    index = load_serving_index(args.index, model)  # before any dtype change: the weights' hash
    model = model.with_dtype(args.dtype)
    logger.info("dtype %s", model.dtype)
    prior = load_serving_prior(args, model.class_names)
    policy = decision_policy(args, model)
    detector = load_serving_detector(args, model)

    app = create_app(
        model.net,
        model.info,
        name=name,
        settings=settings_from_args(args),
        dtype=model.dtype,
        prior=prior,
        prior_strength=args.prior_strength,
        policy=policy,
        photo_index=index,
        detector=detector,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: anyone who can reach this address can use the service", args.host)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    sys.exit(main())

"""``birder-train-mim``: masked-image-modelling (MAE) pretraining on folders of unlabeled images.

    birder-train-mim --network vit_b16 --data-dir photos/ more_photos/ --output-dir runs/mim --size 224 \\
        --epochs 400 --warmup-epochs 40 --batch-size 128 --amp bf16
    # millions of photos: pack them into tar shards once, then stream them
    python -m birder.tools pack photos/ -o shards/
    birder-train-mim --network vit_b16 --wds shards/ --output-dir runs/mim --epochs 400 --amp bf16

Multi-GPU: ``torchrun --nproc_per_node 8 -m birder.scripts.train_mim ...`` (the same options).
"""

import argparse

from birder.model_registry import Task, registry
from birder.training.cli import add_training_args, add_wds_args, config_from_args, json_object, run_cli, training_parser
from birder.training.mim import MIMTrainConfig, train_mim

PROG = "birder-train-mim"


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser(
        PROG,
        "Pretrain a ViT encoder with a masked autoencoder on unlabeled images.",
        "<network>_mim_<epoch>.pt (the encoder, for birder-train --init), the whole MAE model, *_states.pt (for "
        "--resume), mim_metrics.csv and mim_reconstruction_<epoch>.png.",
    )
    parser.add_argument("--network", default="vit_b16", help="encoder network (default: %(default)s)")
    parser.add_argument(
        "--mim-network",
        default="mae_vit",
        choices=registry.list_models(task=Task.MASKED_IMAGE_MODELING),
        metavar="NAME",
        help="mae_vit (decoder of 8 blocks), mae_vit_dec{4,2,1}, each with _npl (normalized pixel targets)",
    )
    data = parser.add_argument_group("data (one of --data-dir and --wds)")
    data.add_argument("--data-dir", dest="data_dirs", nargs="+", default=(), help="folders of images (recursively)")
    add_wds_args(data)
    parser.add_argument("--model-config", type=json_object, help="encoder config override (JSON object)")
    parser.add_argument("--mim-config", type=json_object, help='e.g. \'{"mask_ratio": 0.75, "decoder_depth": 4}\'')
    parser.add_argument("--min-scale", type=float, default=0.3, help="random resized crop minimum area")
    parser.add_argument("--visualize", type=int, default=8, help="images in the per-epoch reconstruction PNG")
    add_training_args(parser, lr=1.5e-4, weight_decay=0.05, epochs=100)
    return parser


def mim_config_from_args(args: argparse.Namespace) -> MIMTrainConfig:
    # MAE's own defaults where the shared options have none: 224 px, birder's colour statistics, no drop-path.
    return config_from_args(
        MIMTrainConfig,
        args,
        size=args.size if args.size is not None else 224,
        rgb_stats=args.rgb_stats or "birder",
        drop_path=args.drop_path if args.drop_path is not None else 0.0,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: train_mim(mim_config_from_args(args)))


if __name__ == "__main__":
    raise SystemExit(main())

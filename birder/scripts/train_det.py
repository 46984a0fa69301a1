"""``birder-train-det``: train a detector on COCO-format annotations.

    birder-train-det --network faster_rcnn --init runs/ft/vit_b16_50.pt --train-json train.json \\
        --val-json val.json --output-dir runs/det --size 512 --epochs 24 --lr 1e-4 --layer-decay 0.7 --amp bf16

Multi-GPU: ``torchrun --nproc_per_node 8 -m birder.scripts.train_det ...`` (the same options).
"""

import argparse

from birder.model_registry import Task, registry
from birder.training.cli import add_training_args, config_from_args, json_object, run_cli, training_parser
from birder.training.detection import DetectionTrainConfig, train_detector

PROG = "birder-train-det"
DESCRIPTION = (
    "Train an object detector (a ViT backbone with a ViTDet pyramid and a detection head) on COCO annotations."
)
OUTPUTS = (
    "<network>_<backbone>_<epoch>.pt (the detector), *_states.pt (for --resume), det_metrics.csv (mAP, mAP@.5) and "
    "det_per_class_ap.csv."
)


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser(PROG, DESCRIPTION, OUTPUTS)
    data = parser.add_argument_group("data (COCO files: a bad item is one warning line, the rest is used)")
    data.add_argument("--train-json", required=True, help="COCO annotations of the training images")
    data.add_argument("--val-json", required=True, help="COCO annotations of the validation images")
    data.add_argument("--train-images", help="folder of the training file_names (default: the JSON's folder)")
    data.add_argument("--val-images", help="folder of the validation file_names (default: the JSON's folder)")

    model = parser.add_argument_group("model")
    heads = registry.list_models(task=Task.OBJECT_DETECTION)
    model.add_argument("--network", default="faster_rcnn", choices=heads, help="detection head (default: %(default)s)")
    model.add_argument("--model-config", type=json_object, help="head config, e.g. '{\"fpn_channels\": 128}'")
    model.add_argument("--backbone", help="backbone network (needed without --init, e.g. vit_b16)")
    model.add_argument("--backbone-config", type=json_object, help="backbone config override (JSON object)")
    model.add_argument("--init", help="a classifier or MIM encoder checkpoint the backbone starts from")
    model.add_argument("--freeze-backbone", action="store_true", help="train the pyramid and head only")

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--layer-decay", type=float, help="layer-wise lr decay of the backbone (e.g. 0.7)")
    recipe.add_argument("--ema-decay", type=float, help="evaluate and save an EMA of the weights")
    defaults = DetectionTrainConfig
    recipe.add_argument(
        "--scale-range", type=float, nargs=2, default=defaults.scale_range, metavar=("LOW", "HIGH"), help="scale jitter"
    )
    recipe.add_argument("--hflip", type=float, default=defaults.hflip, help="horizontal flip probability")
    recipe.add_argument(
        "--copy-paste",
        type=float,
        default=defaults.copy_paste,
        metavar="P",
        help="probability that a training photo gets boxes of another pasted beside and over its own objects: "
        "touching and partly hidden animals, for a detector whose boxes count animals (default: %(default)s)",
    )
    # Detectors train with DDP: their saving and evaluation are not written for sharded models.
    add_training_args(parser, lr=defaults.lr, weight_decay=defaults.weight_decay, epochs=defaults.epochs, fsdp=False)
    parser.set_defaults(batch_size=defaults.batch_size)
    return parser


def det_config_from_args(args: argparse.Namespace) -> DetectionTrainConfig:
    return config_from_args(DetectionTrainConfig, args, size=args.size if args.size is not None else 512)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: train_detector(det_config_from_args(args)))


if __name__ == "__main__":
    raise SystemExit(main())

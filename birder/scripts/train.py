"""``birder-train``: supervised training / fine-tuning on labeled photos (ImageFolder layout or CSV labels).

    # fine-tune an MAE encoder (linear probe first, then everything), at 256 px
    birder-train --init runs/mim/vit_b16_mim_400.pt --data-dir birds/ --output-dir runs/probe --size 256 \\
        --freeze-body --optimizer sgd --lr 0.1 --epochs 10
    birder-train --init runs/probe/vit_b16_10.pt --data-dir birds/ --output-dir runs/ft --epochs 50 \\
        --lr 1e-3 --warmup-epochs 5 --layer-decay 0.8 --label-smoothing 0.1 --mixup 0.8 --cutmix 1.0 \\
        --ema-decay 0.9999 --clip-grad-norm 1.0 --amp bf16
    # a small student learning from the fine-tuned large model
    birder-train --network vit_s16 --teacher runs/ft/vit_l16_50.pt --distill soft --data-dir birds/ \\
        --output-dir runs/s16 --size 256 --epochs 50 --amp bf16

``birds/`` holds ``train/<class>/<images>`` and ``val/<class>/<images>``. From tar shards (millions of photos):

    python -m birder.tools pack birds/train -o shards/train --labels folders
    birder-train --network vit_b16 --wds shards/train --val-dir birds/val --output-dir runs/b16

 Multi-GPU: ``torchrun --nproc_per_node 8
-m birder.scripts.train ...`` (the same options).
"""

import argparse

from birder.data.training import AUG_LEVELS
from birder.training.classification import TrainConfig, train_classifier
from birder.training.cli import (
    add_training_args,
    add_wds_args,
    config_from_args,
    json_object,
    run_cli,
    training_parser,
)
from birder.training.distillation import DISTILL_KINDS
from birder.training.optim import OPTIMIZERS

PROG = "birder-train"


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser(
        PROG,
        "Train or fine-tune an image classifier, evaluating on a validation split every epoch.",
        "<network>[_<tag>]_<epoch>.pt (for birder-predict / birder.load_model), *_states.pt (for --resume), "
        "metrics.csv, per_class_metrics.csv, confusion_matrix.csv/.png.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", help="folder with train/<class>/ and val/<class>/ sub-folders")
    data.add_argument("--train-dir", help="training ImageFolder root (instead of <data-dir>/train)")
    data.add_argument("--val-dir", help="validation ImageFolder root (instead of <data-dir>/val)")
    data.add_argument("--train-csv", help="training labels: CSV of path,label (paths relative to the CSV)")
    data.add_argument("--val-csv", help="validation labels: CSV of path,label")
    add_wds_args(data, validation=True)
    data.add_argument("--class-balanced", action="store_true", help="sample every class equally often")
    data.add_argument("--aug-level", type=int, choices=sorted(AUG_LEVELS), default=2, help="augmentation strength")

    model = parser.add_argument_group("model")
    model.add_argument("--network", help="e.g. vit_b16 (from scratch, or for a checkpoint that does not name it)")
    model.add_argument("--model-config", type=json_object, help="config override (JSON object)")
    model.add_argument("--init", help="start from an MIM encoder or a classifier checkpoint")
    model.add_argument("--reset-head", action="store_true", help="a new head even if the classes are the same")
    model.add_argument("--freeze-body", action="store_true", help="linear probe: train the head only")
    model.add_argument("--tag", help="file names become <network>_<tag>_<epoch>.pt")

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    recipe.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    recipe.add_argument("--layer-decay", type=float, help="layer-wise lr decay (ViT), e.g. 0.8")
    recipe.add_argument("--label-smoothing", type=float, default=0.0)
    recipe.add_argument("--mixup", dest="mixup_alpha", type=float, default=0.0, help="mixup alpha (0: off)")
    recipe.add_argument("--cutmix", dest="cutmix_alpha", type=float, default=0.0, help="cutmix alpha (0: off)")
    recipe.add_argument("--ema-decay", type=float, help="keep an EMA of the weights (evaluated and saved)")
    recipe.add_argument("--top-k", type=int, default=5, help="top-k accuracy reported besides top-1")
    add_distillation_args(parser)
    add_training_args(parser, lr=1e-3, weight_decay=0.05, epochs=50)
    return parser


def add_distillation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher", help="a trained classifier of the same classes (e.g. larger) to learn from")
    group.add_argument(
        "--distill",
        choices=DISTILL_KINDS,
        help="soft (default): KL on temperature-scaled logits mixed with the label loss; hard: the teacher's top-1",
    )
    group.add_argument("--distill-temperature", type=float, default=2.0, help="soft distillation (default: 2)")
    group.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the teacher's term (default: 0.5)")
    group.add_argument(
        "--teacher-cache", help="file caching the teacher's logits (needs --aug-level 0 and no --mixup/--cutmix)"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: train_classifier(config_from_args(TrainConfig, args)))


if __name__ == "__main__":
    raise SystemExit(main())

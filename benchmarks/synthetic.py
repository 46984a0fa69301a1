"""Generated data shared by the tests and the benchmarks: distinct rendered object classes, cluttered scenes.

No data comes from the web: every image is drawn here from a seed. An object class is a shape with its own colour
pair and pattern, so a small network can learn the classes in seconds yet they are not separable by colour alone.
Scenes paste 0-4 objects at random scales (a share of the frame area) and positions onto a cluttered textured
background and come with COCO-format annotations (boxes ``[x, y, width, height]`` in pixels).

Used by the detection, calibration, explanation and speed work: ``render_object`` for crops, ``make_class_folder``
for ImageFolder classification data, ``make_scene`` / ``write_coco_scenes`` for detection and pointing games.
"""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond", "star", "bars")
# Colour pairs (body, detail); combined with the shapes they give up to 64 distinct classes.
PALETTE = (
    ((220, 40, 40), (250, 220, 60)),
    ((40, 90, 220), (240, 240, 240)),
    ((30, 160, 70), (20, 20, 20)),
    ((240, 140, 20), (60, 20, 120)),
    ((150, 40, 180), (120, 230, 120)),
    ((20, 180, 190), (200, 30, 90)),
    ((240, 240, 240), (30, 60, 200)),
    ((90, 60, 30), (240, 180, 200)),
)
MAX_CLASSES = len(SHAPES) * len(PALETTE)


def class_name(class_id: int) -> str:
    return f"{SHAPES[class_id % len(SHAPES)]}_{class_id // len(SHAPES)}"


def _polygon(shape: str, size: int) -> list[tuple[float, float]]:
    centre = size / 2
    radius = size * 0.45
    corners = {"triangle": 3, "square": 4, "diamond": 4}
    if shape == "star":
        points = []
        for index in range(10):
            angle = math.pi * index / 5 - math.pi / 2
            reach = radius if index % 2 == 0 else radius * 0.45
            points.append((centre + reach * math.cos(angle), centre + reach * math.sin(angle)))
        return points

    count = corners[shape]
    offset = math.pi / 4 if shape == "square" else -math.pi / 2
    return [
        (
            centre + radius * math.cos(offset + 2 * math.pi * i / count),
            centre + radius * math.sin(offset + 2 * math.pi * i / count),
        )
        for i in range(count)
    ]


def render_object(class_id: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One object of class ``class_id`` as an RGBA image ``size`` x ``size`` (transparent outside the shape).

    Each draw varies: rotation, a small colour jitter and the detail's position, so no two objects are identical.
    """
    if not 0 <= class_id < MAX_CLASSES:
        raise ValueError(f"class_id must be in [0, {MAX_CLASSES}), got {class_id}")

    shape = SHAPES[class_id % len(SHAPES)]
    (body, detail) = PALETTE[class_id // len(SHAPES)]
    jitter = rng.integers(-18, 19, size=3)
    body = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(body, jitter, strict=True))
    scale = 4  # drawn large, then reduced: smooth edges at any size
    canvas = size * scale
    image = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    box = (canvas * 0.05, canvas * 0.05, canvas * 0.95, canvas * 0.95)
    if shape == "disc":
        draw.ellipse(box, fill=(*body, 255))
    elif shape == "ring":
        draw.ellipse(box, fill=(*body, 255))
        draw.ellipse((canvas * 0.3, canvas * 0.3, canvas * 0.7, canvas * 0.7), fill=(0, 0, 0, 0))
    elif shape == "cross":
        draw.rectangle((canvas * 0.38, canvas * 0.05, canvas * 0.62, canvas * 0.95), fill=(*body, 255))
        draw.rectangle((canvas * 0.05, canvas * 0.38, canvas * 0.95, canvas * 0.62), fill=(*body, 255))
    elif shape == "bars":
        for left in (0.08, 0.4, 0.72):
            draw.rectangle((canvas * left, canvas * 0.05, canvas * (left + 0.2), canvas * 0.95), fill=(*body, 255))
    else:
        draw.polygon(_polygon(shape, canvas), fill=(*body, 255))

    # The detail: a spot of the second colour, inside the shape (alpha-masked below).
    (cx, cy) = canvas * (0.5 + rng.uniform(-0.08, 0.08, size=2))
    spot = canvas * 0.14
    detail_layer = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    ImageDraw.Draw(detail_layer).ellipse((cx - spot, cy - spot, cx + spot, cy + spot), fill=(*detail, 255))
    alpha = image.getchannel("A")
    detail_layer.putalpha(Image.fromarray(np.minimum(np.asarray(alpha), np.asarray(detail_layer.getchannel("A")))))
    image = Image.alpha_composite(image, detail_layer)
    image = image.rotate(float(rng.uniform(0, 360)), resample=Image.Resampling.BICUBIC)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def textured_background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A cluttered RGB background ``(height, width)``: smooth colour fields, noise and faint strokes."""
    (height, width) = size
    coarse = rng.uniform(60, 200, size=(max(height // 32, 2), max(width // 32, 2), 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 14))):
        (x0, y0) = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        (x1, y1) = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(int(c) for c in rng.integers(50, 210, size=3))
        draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 4)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32)
    pixels += rng.normal(0, 12, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def object_on_background(class_id: int, size: int, rng: np.random.Generator, fill: float = 0.7) -> Image.Image:
    """A classification photo: one object covering about ``fill`` of the side, on a textured background."""
    image = textured_background((size, size), rng)
    side = max(4, int(size * fill * rng.uniform(0.85, 1.0)))
    offset = rng.integers(0, size - side + 1, size=2)
    obj = render_object(class_id, side, rng)
    image.paste(obj, (int(offset[0]), int(offset[1])), obj)
    return image


def make_class_folder(
    root: Path, classes: list[int], per_class: int, *, size: int = 64, seed: int = 0, fill: float = 0.7
) -> Path:
    """``root/<class_name>/<i>.png``: an ImageFolder of ``per_class`` photos for each class id in ``classes``."""
    rng = np.random.default_rng(seed)
    for class_id in classes:
        folder = Path(root) / class_name(class_id)
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            object_on_background(class_id, size, rng, fill).save(folder / f"{index}.png")

    return Path(root)


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    boxes: list[tuple[float, float, float, float]]  # [x, y, width, height], pixels (COCO)
    labels: list[int]  # class ids


def make_scene(
    rng: np.random.Generator,
    *,
    size: tuple[int, int] = (256, 256),
    classes: list[int] | None = None,
    num_objects: tuple[int, int] = (0, 4),
    area_range: tuple[float, float] = (0.02, 0.10),
) -> Scene:
    """A cluttered background with ``num_objects`` (inclusive range) objects, each covering a share of the frame
    area drawn from ``area_range``, placed without overlapping each other."""
    (height, width) = size
    classes = classes if classes is not None else list(range(8))
    image = textured_background(size, rng)
    (boxes, labels) = ([], [])
    for _ in range(int(rng.integers(num_objects[0], num_objects[1] + 1))):
        side = round(math.sqrt(rng.uniform(*area_range) * height * width))
        side = max(4, min(side, height, width))
        for _attempt in range(20):
            (x, y) = (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)))
            if all(x + side <= bx or bx + bw <= x or y + side <= by or by + bh <= y for (bx, by, bw, bh) in boxes):
                break
        else:
            continue  # no free place left for an object this large

        class_id = int(rng.choice(classes))
        obj = render_object(class_id, side, rng)
        image.paste(obj, (x, y), obj)
        boxes.append((float(x), float(y), float(side), float(side)))
        labels.append(class_id)

    return Scene(image, boxes, labels)


def write_coco_scenes(
    root: Path,
    count: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = (256, 256),
    classes: list[int] | None = None,
    num_objects: tuple[int, int] = (0, 4),
    area_range: tuple[float, float] = (0.02, 0.10),
) -> Path:
    """``count`` scenes as ``root/images/<i>.png`` plus ``root/annotations.json`` (COCO); returns the JSON path."""
    rng = np.random.default_rng(seed)
    classes = classes if classes is not None else list(range(8))
    coco = _new_coco(root, classes)
    for index in range(count):
        scene = make_scene(rng, size=size, classes=classes, num_objects=num_objects, area_range=area_range)
        file_name = f"images/{index:05d}.png"
        scene.image.save(Path(root) / file_name)
        coco["images"].append({"id": index + 1, "file_name": file_name, "height": size[0], "width": size[1]})
        _add_boxes(coco, index + 1, scene.boxes, scene.labels)
    return _write_coco(root, coco)


# Scenes with known counts: touching and overlapping objects

COUNT_LAYOUTS = ("apart", "touching", "overlapping")
# A touching pair's boxes meet, or share a sliver of at most this share of the smaller side (the drawn shapes fill
# 90 % of their boxes, so boxes that only met would leave a visible gap).
TOUCH_DEPTH = 0.1


def _intersection(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Area shared by two ``[x, y, width, height]`` boxes."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(width, 0.0) * max(height, 0.0)


def box_iou_xywh(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    shared = _intersection(a, b)
    return shared / (a[2] * a[3] + b[2] * b[3] - shared)


def _touching_place(rng: np.random.Generator, anchor: tuple[float, float, float, float], side: int) -> tuple[int, int]:
    """A box of ``side`` beside ``anchor`` on a random side of it: the two meet, or overlap by a sliver."""
    (ax, ay, aw, ah) = anchor
    depth = int(rng.integers(0, int(TOUCH_DEPTH * min(aw, side)) + 1))
    # Along the shared edge the two boxes face each other over at least 40 % of the smaller side
    reach = int(0.6 * min(aw, side))
    along = int(rng.integers(-reach, reach + 1))
    which = int(rng.integers(0, 4))
    if which == 0:  # right of the anchor
        return (int(ax + aw - depth), int(ay + along))
    if which == 1:  # left
        return (int(ax - side + depth), int(ay + along))
    if which == 2:  # below
        return (int(ax + along), int(ay + ah - depth))
    return (int(ax + along), int(ay - side + depth))  # above


def make_count_scene(
    rng: np.random.Generator,
    count: int,
    layout: str,
    *,
    size: tuple[int, int] = (128, 128),
    classes: list[int] | None = None,
    area_range: tuple[float, float] = (0.02, 0.10),
    overlap_range: tuple[float, float] = (0.15, 0.4),
    background: str = "clutter",
    attempts: int = 400,
) -> Scene | None:
    """A scene of exactly ``count`` objects; each after the first is placed by ``layout``:

    - ``apart``: at least 2 px from every other box;
    - ``touching``: beside a random earlier object, the boxes meeting or sharing a sliver (:data:`TOUCH_DEPTH`);
    - ``overlapping``: over a random earlier object, hiding a share ``overlap_range`` of the smaller of the two
      boxes' areas (the later object is drawn on top: the earlier one is partly occluded).

    No object shares any area with an object but the one it was placed against, so each stays at least
    ``1 - overlap_range[1]`` visible. ``background``: ``clutter`` (:func:`textured_background`) or ``foliage``
    (:func:`foliage_background`). None when the objects do not fit (the caller draws again)."""
    (height, width) = size
    classes = classes if classes is not None else list(range(8))
    boxes: list[tuple[float, float, float, float]] = []
    for index in range(count):
        side = max(4, min(round(math.sqrt(rng.uniform(*area_range) * height * width)), height, width))
        for _attempt in range(attempts):
            if index == 0 or layout == "apart":
                (x, y) = (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)))
                anchor = None
            else:
                anchor = int(rng.integers(0, len(boxes)))
                (ax, ay, aw, ah) = boxes[anchor]
                if layout == "touching":
                    (x, y) = _touching_place(rng, boxes[anchor], side)
                else:
                    (x, y) = (int(ax + rng.integers(-side + 1, aw)), int(ay + rng.integers(-side + 1, ah)))
            if not (0 <= x <= width - side and 0 <= y <= height - side):
                continue
            box = (float(x), float(y), float(side), float(side))
            if anchor is None:
                grown = (box[0] - 2, box[1] - 2, box[2] + 4, box[3] + 4)
                if all(_intersection(grown, other) == 0 for other in boxes):
                    break
                continue
            others_clear = all(_intersection(box, other) == 0 for i, other in enumerate(boxes) if i != anchor)
            hidden = _intersection(box, boxes[anchor]) / min(side * side, boxes[anchor][2] * boxes[anchor][3])
            if layout == "touching":
                # Meeting edges share no area; the sliver is at most TOUCH_DEPTH of the smaller side deep
                meets = (
                    hidden <= TOUCH_DEPTH
                    and _intersection((box[0] - 0.5, box[1] - 0.5, box[2] + 1, box[3] + 1), boxes[anchor]) > 0
                )
                if others_clear and meets:
                    break
            elif others_clear and overlap_range[0] <= hidden <= overlap_range[1]:
                break
        else:
            return None
        boxes.append(box)

    image = textured_background(size, rng) if background == "clutter" else foliage_background(size, rng)
    labels = [int(rng.choice(classes)) for _ in boxes]
    for box, class_id in zip(boxes, labels, strict=True):
        obj = render_object(class_id, int(box[2]), rng)
        image.paste(obj, (int(box[0]), int(box[1])), obj)
    return Scene(image, boxes, labels)


def foliage_background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A background unlike :func:`textured_background`: overlapping blurred leaves (ellipses) of greens and
    browns under uneven light, with fine grain."""
    (height, width) = size
    base = tuple(int(c) for c in rng.integers((40, 60, 20), (90, 120, 60)))
    image = Image.new("RGB", (width, height), base)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(30, 60))):
        (cx, cy) = (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
        (rx, ry) = (float(rng.uniform(3, width / 6)), float(rng.uniform(2, height / 10)))
        tone = rng.integers((30, 70, 10), (140, 190, 90))
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=tuple(int(c) for c in tone))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
    # Uneven light: a brightness ramp across the frame, then grain
    ramp = np.linspace(float(rng.uniform(0.6, 1.0)), float(rng.uniform(1.0, 1.4)), width, dtype=np.float32)
    pixels *= ramp[None, :, None]
    pixels += rng.normal(0, 6, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_count_scenes(
    root: Path,
    count: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = (128, 128),
    classes: list[int] | None = None,
    num_objects: tuple[int, int] = (0, 4),
    area_range: tuple[float, float] = (0.02, 0.10),
    overlap_range: tuple[float, float] = (0.15, 0.4),
    background: str = "clutter",
) -> Path:
    """``count`` scenes of :func:`make_count_scene` as ``root/images/<i>.png`` plus ``root/annotations.json``
    (COCO; each image also has its true ``count`` and ``layout``): counts drawn evenly from ``num_objects``
    (inclusive), the layout of a scene with two or more objects evenly from :data:`COUNT_LAYOUTS`."""
    rng = np.random.default_rng(seed)
    classes = classes if classes is not None else list(range(8))
    coco = _new_coco(root, classes)
    for index in range(count):
        scene = None
        while scene is None:
            objects = int(rng.integers(num_objects[0], num_objects[1] + 1))
            layout = COUNT_LAYOUTS[int(rng.integers(0, len(COUNT_LAYOUTS)))] if objects >= 2 else "apart"
            scene = make_count_scene(
                rng,
                objects,
                layout,
                size=size,
                classes=classes,
                area_range=area_range,
                overlap_range=overlap_range,
                background=background,
            )
        file_name = f"images/{index:05d}.png"
        scene.image.save(Path(root) / file_name)
        coco["images"].append(
            {
                "id": index + 1,
                "file_name": file_name,
                "height": size[0],
                "width": size[1],
                "count": len(scene.boxes),
                "layout": layout,
            }
        )
        _add_boxes(coco, index + 1, scene.boxes, scene.labels)
    return _write_coco(root, coco)


def _new_coco(root: str | Path, classes: list[int]) -> dict:
    """An empty COCO document of ``classes``, its ``root/images`` folder made."""
    (Path(root) / "images").mkdir(parents=True, exist_ok=True)
    return {
        "images": [],
        "annotations": [],
        "categories": [{"id": class_id + 1, "name": class_name(class_id)} for class_id in classes],
    }


def _add_boxes(coco: dict, image_id: int, boxes: Sequence[Sequence[float]], labels: Sequence[int]) -> None:
    """COCO annotations of one image's xywh ``boxes`` (class ``labels``, category ids from 1)."""
    for box, label in zip(boxes, labels, strict=True):
        coco["annotations"].append(
            {
                "id": len(coco["annotations"]) + 1,
                "image_id": image_id,
                "category_id": label + 1,
                "bbox": list(box),
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
        )


def _write_coco(root: str | Path, coco: dict) -> Path:
    path = Path(root) / "annotations.json"
    path.write_text(json.dumps(coco))
    return path

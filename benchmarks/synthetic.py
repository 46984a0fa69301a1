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
    images_dir = Path(root) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    coco: dict = {
        "images": [],
        "annotations": [],
        "categories": [{"id": class_id + 1, "name": class_name(class_id)} for class_id in classes],
    }
    for index in range(count):
        scene = make_scene(rng, size=size, classes=classes, num_objects=num_objects, area_range=area_range)
        file_name = f"images/{index:05d}.png"
        scene.image.save(Path(root) / file_name)
        coco["images"].append({"id": index + 1, "file_name": file_name, "height": size[0], "width": size[1]})
        for box, label in zip(scene.boxes, scene.labels, strict=True):
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": index + 1,
                    "category_id": label + 1,
                    "bbox": list(box),
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )

    path = Path(root) / "annotations.json"
    path.write_text(json.dumps(coco))
    return path

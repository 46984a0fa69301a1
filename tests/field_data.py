"""A generated field world for the calibration, unknown and taxonomy tests: photos, a taxonomy, a trained classifier.

Birds are discs on the cluttered backgrounds of ``benchmarks.synthetic``. The genus shows in the body colour, the
species in the colour of a mark on the body. Two things make a species-level answer hard, as in the field:

- **back views**: a share of the photos show no mark (the bird turned away). The genus is plain, the species is
  not: a calibrated model spreads its probability over the genus, and only the genus can be answered.
- **cryptic species**: each genus has a rare species that looks exactly like one of the common ones (same body,
  same mark), a few times less frequent. Its photos are confidently called the common species: honest errors
  that no threshold can remove.

Where a photo was taken says which species are possible: each genus lives at two sites, the common species with
the first four marks at site A, those with the last four and the cryptic one at site B (so a cryptic species and its
look-alike never meet). :func:`site_priors` gives each photo the prior of a site where its species lives, for step
4 of the decision order. Everything is drawn from seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import birder
from benchmarks.synthetic import textured_background
from birder.model_registry import registry

BODIES = {"Rubra": (220, 40, 40), "Caerula": (40, 90, 220)}  # genus -> body colour
MARKS = (
    ("flava", (250, 220, 60)),
    ("alba", (245, 245, 245)),
    ("nigra", (20, 20, 20)),
    ("rosea", (230, 60, 200)),
    ("cyanea", (40, 220, 230)),
    ("aurantia", (250, 140, 20)),
    ("viridis", (150, 240, 120)),
)
FAMILIES = {"Rubra": "Rubridae", "Caerula": "Caerulidae"}
ORDER = "Disciformes"
SIZE = 32
FILL = 0.7  # the disc's side, as a share of the photo's
MARK_RADIUS = 0.3  # the mark's radius, as a share of the disc's side
RGB_STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
# A ViT small enough to train in seconds on two cores, big enough to see the marks
MODEL_CONFIG = {"hidden_dim": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64, "patch_size": 8}


@dataclass(frozen=True)
class Species:
    name: str
    genus: str
    mark: tuple[int, int, int]
    frequency: float  # relative to a common species


def world_species(rare: float = 0.6) -> list[Species]:
    """Per genus, a common species per mark and one rare cryptic species looking like the first."""
    species = []
    for genus in BODIES:
        species += [Species(f"{genus} {epithet}", genus, mark, 1.0) for (epithet, mark) in MARKS]
        species.append(Species(f"{genus} cryptica", genus, MARKS[0][1], rare))
    return species


def write_taxonomy(path: Path, species: list[Species]) -> Path:
    rows = ["species,genus,family,order"] + [f"{s.name},{s.genus},{FAMILIES[s.genus]},{ORDER}" for s in species]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def bird(body: tuple[int, int, int], mark: tuple[int, int, int] | None, rng: np.random.Generator) -> Image.Image:
    """A photo: a disc of the body colour (with the mark, unless a back view) on a cluttered background."""
    image = textured_background((SIZE, SIZE), rng)
    side = int(SIZE * FILL * rng.uniform(0.85, 1.0))
    (x, y) = rng.integers(0, SIZE - side + 1, size=2)
    scale = 4  # drawn large, then reduced: smooth edges
    canvas = side * scale
    disc = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    draw = ImageDraw.Draw(disc)
    colour = tuple(int(np.clip(c + j, 0, 255)) for (c, j) in zip(body, rng.integers(-18, 19, size=3), strict=True))
    draw.ellipse((canvas * 0.05, canvas * 0.05, canvas * 0.95, canvas * 0.95), fill=(*colour, 255))
    if mark is not None:
        (cx, cy) = canvas * (0.5 + rng.uniform(-0.1, 0.1, size=2))
        radius = canvas * MARK_RADIUS
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(*mark, 255))
    disc = disc.resize((side, side), Image.Resampling.LANCZOS)
    image.paste(disc, (int(x), int(y)), disc)
    return image


def write_split(root: Path, species: list[Species], per_species: int, *, seed: int, back_views: float = 0.1) -> Path:
    """``root/<species>/<i>.png``: ``per_species`` x frequency photos each, a share ``back_views`` without mark."""
    rng = np.random.default_rng(seed)
    for item in species:
        folder = root / item.name
        folder.mkdir(parents=True, exist_ok=True)
        count = round(per_species * item.frequency)
        hidden = round(count * back_views)
        for index in range(count):
            mark = None if index < hidden else item.mark
            bird(BODIES[item.genus], mark, rng).save(folder / f"{index:03d}.png")
    return root


def sites_of(species_name: str) -> list[str]:
    epithet = species_name.split()[1]
    if epithet == "cryptica":
        return ["B"]
    position = [name for (name, _) in MARKS].index(epithet)
    return (["A"] if position <= 3 else []) + (["B"] if position >= 3 else [])


def site_priors(class_names: list[str], targets: np.ndarray, *, seed: int, absent: float = 0.05) -> np.ndarray:
    """``[photos, classes]``: for each photo, the prior of a site its species lives at (1 for the species living
    there, ``absent`` for the others: rarely recorded there, not impossible)."""
    rng = np.random.default_rng(seed)
    rows = []
    for target in targets:
        site = rng.choice(sites_of(class_names[target]))
        rows.append([1.0 if site in sites_of(name) else absent for name in class_names])
    return np.array(rows)


def load_folder(root: Path, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The photos of an ImageFolder as normalised tensors, the way the model's transform makes them."""
    (images, targets) = ([], [])
    mean = torch.tensor(RGB_STATS["mean"]).view(3, 1, 1)
    std = torch.tensor(RGB_STATS["std"]).view(3, 1, 1)
    for index, name in enumerate(class_names):
        for path in sorted((root / name).glob("*.png")):
            pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)
            images.append((pixels.permute(2, 0, 1) - mean) / std)
            targets.append(index)
    return (torch.stack(images), torch.tensor(targets))


def train_classifier_on(
    images: torch.Tensor, targets: torch.Tensor, num_classes: int, *, epochs: int, seed: int = 0, lr: float = 2e-3
) -> torch.nn.Module:
    """A tiny ViT trained from scratch: AdamW, one-cycle schedule, horizontal flips, no label smoothing."""
    torch.manual_seed(seed)
    net = registry.net_factory("vit_b16", num_classes, config=MODEL_CONFIG, size=(SIZE, SIZE))
    generator = torch.Generator().manual_seed(seed)
    return fit_with_flips(net, images, targets, epochs=epochs, lr=lr, batch_size=16, pct_start=0.1, generator=generator)


def fit_with_flips(
    net: torch.nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    pct_start: float,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
) -> torch.nn.Module:
    """Train ``net`` on normalised image tensors: AdamW, one-cycle schedule, random horizontal flips (the object's
    side must not matter), cross-entropy without label smoothing. ``generator`` None draws from torch's global RNG.
    Returns the network in eval mode."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    count = len(images)
    batches = count // batch_size if drop_last else (count + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * batches, pct_start=pct_start
    )
    net.train()
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, batches * batch_size, batch_size):
            batch = order[start : start + batch_size]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            inputs = torch.where(flip[:, None, None, None], images[batch].flip(-1), images[batch])
            loss = F.cross_entropy(net(inputs), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval()


def save_classifier(net: torch.nn.Module, class_names: list[str], path: Path) -> Path:
    info = birder.ModelInfo({name: index for (index, name) in enumerate(class_names)}, None, RGB_STATS)
    return birder.save_model(net, path, info)

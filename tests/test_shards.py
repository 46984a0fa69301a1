"""WebDataset shards: packing (resumable, unreadable photos listed), the streamed epochs (every sample once over
ranks and workers, an order that does not depend on the workers, exact mid-epoch resume) and training from them,
in one process and under ``torchrun`` (``-m slow``)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from test_training_classification import tiny_config
from test_training_data import STATS, make_image_folder, make_split_dataset, single_thread  # noqa: F401 (autouse)
from test_training_resume import Interrupt, assert_same_states, recorder

import birder
from birder.data import packing
from birder.data.packing import pack, pack_source, parse_size
from birder.data.shards import ShardStream, open_shards, rank_segments
from birder.data.training import DataError, training_transform
from birder.errors import BirderError
from birder.io.images import load_image
from birder.tools.cli import main as tools_main
from birder.training.classification import train_classifier

ROOT = Path(__file__).resolve().parents[1]
TRANSFORM = training_transform((16, 16), STATS, level=1)


def packed(tmp_path: Path, per_class: int = 6, shard_size: str = "3KB", **kwargs) -> tuple[Path, Path]:
    photos = make_image_folder(tmp_path / "photos", per_class, size=24)
    shards = tmp_path / "shards"
    pack(pack_source([photos], "folders"), shards, shard_size=parse_size(shard_size), progress_bar=False, **kwargs)
    return (photos, shards)


def stream_ids(stream: ShardStream, epoch: int, workers: int, skip: int = 0) -> list[list[int]]:
    loader = stream.loader(epoch, skip, workers, torch.device("cpu"))
    return [batch.indices.tolist() for batch in loader]


# Packing


def test_pack_stores_each_photo_as_it_was_with_its_label_and_lists_unreadable_ones(tmp_path: Path) -> None:
    photos = make_image_folder(tmp_path / "photos", 5, size=24)
    (photos / "class_1" / "broken.png").write_bytes(b"not an image")
    code = tools_main(["pack", str(photos), "-o", str(tmp_path / "shards"), "--labels", "folders",
                       "--shard-size", "4KB", "--no-progress"])  # fmt: skip
    assert code == 0

    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["complete"] and index["samples"] == 20 and len(index["shards"]) > 2
    assert index["classes"] == ["class_0", "class_1", "class_2", "class_3"]
    with open(tmp_path / "shards" / "unreadable.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == ["class_1/broken.png"] and "not a recognised image" in rows[0]["error"]

    seen = {}
    for shard in index["shards"]:
        for sample in wds.tarfile_samples([{"url": str(tmp_path / "shards" / shard["name"])}]):
            meta = json.loads(sample["json"])
            seen[meta["path"]] = (sample["png"], int(sample["cls"]), meta["label"])
    assert len(seen) == 20 and "class_1/broken.png" not in seen
    for name, (data, target, label) in seen.items():
        assert data == (photos / name).read_bytes()  # the file's bytes, not re-encoded
        assert label == name.split("/")[0] and target == int(label[-1])


def test_interrupted_pack_continues_after_the_last_complete_shard(tmp_path: Path, monkeypatch) -> None:
    photos = make_image_folder(tmp_path / "photos", 6, size=24)
    source = pack_source([photos], "folders")
    pack(source, tmp_path / "straight", shard_size=3000, progress_bar=False)

    real = packing._read_checked
    calls = []

    def crash_at_photo_15(path: Path, name: str):
        calls.append(name)
        if len(calls) == 15:
            raise KeyboardInterrupt
        return real(path, name)

    monkeypatch.setattr(packing, "_read_checked", crash_at_photo_15)
    with pytest.raises(KeyboardInterrupt):
        pack(source, tmp_path / "resumed", shard_size=3000, progress_bar=False)
    index = json.loads((tmp_path / "resumed" / "index.json").read_text())
    assert not index["complete"] and 0 < index["shards"][-1]["end"] < 15
    assert not list((tmp_path / "resumed").glob(".*tmp"))  # no half-written shard left behind

    monkeypatch.setattr(packing, "_read_checked", real)
    report = pack(source, tmp_path / "resumed", shard_size=3000, progress_bar=False)
    assert report.resumed_from == index["shards"][-1]["end"] and report.samples == 24
    straight = sorted(p.name for p in (tmp_path / "straight").glob("*.tar"))
    assert straight == sorted(p.name for p in (tmp_path / "resumed").glob("*.tar"))
    for name in straight:
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()

    make_image_folder(tmp_path / "photos", 7, size=24)  # more photos than were packed: another packing
    with pytest.raises(DataError, match="other photos"):
        pack(pack_source([photos], "folders"), tmp_path / "resumed", shard_size=3000, progress_bar=False)


def test_pack_with_csv_labels_unlabelled_and_bad_arguments(tmp_path: Path, capsys) -> None:
    photos = make_image_folder(tmp_path / "photos", 2, classes=2, size=24)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nphotos/class_0/0.png,wren\nphotos/class_1/1.png,robin\n")
    pack(pack_source([photos], labels), tmp_path / "csv", progress_bar=False)
    shard_set = open_shards(tmp_path / "csv")
    assert shard_set.class_names == ("robin", "wren") and shard_set.total == 2

    pack(pack_source([photos]), tmp_path / "plain", progress_bar=False)
    assert open_shards(tmp_path / "plain").class_names is None and open_shards(tmp_path / "plain").total == 4

    assert parse_size("1GB") == 10**9 and parse_size("64KiB") == 65536 and parse_size("1000") == 1000
    assert tools_main(["pack", str(photos), "-o", str(tmp_path / "x"), "--shard-size", "lots"]) == 2
    assert "expected a size such as 1GB" in capsys.readouterr().err
    assert tools_main(["pack", str(tmp_path / "nowhere"), "-o", str(tmp_path / "y")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_open_shards_by_folder_pattern_and_without_an_index(tmp_path: Path, caplog) -> None:
    (_, shards) = packed(tmp_path)
    whole = open_shards(shards)
    names = [shard.path.name for shard in whole.shards]
    assert whole.total == 24 and names[0] == "shard-000000.tar"

    last = len(names) - 1
    part = open_shards(f"{shards}/shard-{{000001..{last:06d}}}.tar")
    assert part.total == 24 - whole.shards[0].samples
    assert [s.first for s in part.shards] == [s.first for s in whole.shards[1:]]  # sample ids stay the packed ones

    with pytest.raises(DataError, match="no such shard"):
        open_shards(f"{shards}/shard-{{000000..{last + 1:06d}}}.tar")

    bare = tmp_path / "bare"
    bare.mkdir()
    for shard in whole.shards:
        shutil.copy(shard.path, bare / shard.path.name)
    counted = open_shards(bare)
    assert counted.total == 24 and counted.class_names is None
    assert "counting its samples" in caplog.text


# Planning and streaming epochs


@pytest.mark.parametrize(("counts", "world_size"), [([5, 3, 4, 6], 2), ([5, 3, 4, 6], 4), ([7], 3), ([2, 0, 9], 5)])
def test_rank_blocks_cover_the_epoch_once_padding_only_to_even_out(counts: list[int], world_size: int) -> None:
    total = sum(counts)
    starts = np.cumsum([0, *counts])
    for pad in (True, False):
        seen = Counter()
        sizes = []
        for rank in range(world_size):
            segments = rank_segments(counts, seed=3, epoch=2, rank=rank, world_size=world_size, pad=pad)
            ids = [int(starts[shard]) + i for (shard, start, stop) in segments for i in range(start, stop)]
            sizes.append(len(ids))
            seen.update(ids)
        assert set(seen) == set(range(total))
        if pad:
            assert len(set(sizes)) == 1 and sum(sizes) - total < world_size
        else:
            assert sum(sizes) == total and max(seen.values()) == 1 and max(sizes) - min(sizes) <= 1


def test_stream_sees_every_sample_once_per_epoch_over_ranks_and_workers(tmp_path: Path) -> None:
    (_, shards) = packed(tmp_path)  # 24 samples in several shards
    shard_set = open_shards(shards)
    orders = {}
    for epoch in (1, 2):
        for workers in (0, 2):
            ranks = []
            for rank in range(2):
                stream = ShardStream(shard_set, TRANSFORM, batch_size=5, rank=rank, world_size=2, shuffle_buffer=8)
                batches = stream_ids(stream, epoch, workers)
                assert len(batches) == stream.batches_per_rank == 3  # 12 per rank: 5 + 5 + 2
                ranks.append(batches)
            ids = [i for batches in ranks for batch in batches for i in batch]
            assert sorted(ids) == list(range(24))
            orders[(epoch, workers)] = ranks
        assert orders[(epoch, 0)] == orders[(epoch, 2)]  # decoding workers do not change the order
    assert orders[(1, 0)] != orders[(2, 0)]  # a new shuffle every epoch


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_resumed_stream_continues_the_same_order(tmp_path: Path) -> None:
    (_, shards) = packed(tmp_path)
    stream = ShardStream(open_shards(shards), TRANSFORM, batch_size=3, rank=1, world_size=2, shuffle_buffer=6)
    whole = stream_ids(stream, 4, workers=0)
    for workers in (0, 2, 3):
        assert stream_ids(stream, 4, workers, skip=2) == whole[2:]

    # The images too: augmentation follows the sample and the epoch, not the position in the loader.
    full = list(stream.loader(4, 0, 0, torch.device("cpu")))
    rest = list(stream.loader(4, 2, 2, torch.device("cpu")))
    for a, b in zip(full[2:], rest, strict=True):
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
        assert a.targets.tolist() == b.targets.tolist()


def test_stream_decodes_like_the_folder_and_replaces_an_unreadable_sample(tmp_path: Path) -> None:
    photos = make_image_folder(tmp_path / "photos", 2, classes=2, size=24)
    shard = tmp_path / "mine" / "shard-000000.tar"
    shard.parent.mkdir()
    with wds.TarWriter(str(shard), encoder=False) as sink:  # made by hand: a damaged photo got in
        for number, name in enumerate(["class_0/0.png", "class_0/1.png", "class_1/0.png"]):
            sink.write({"__key__": f"{number:09d}", "png": (photos / name).read_bytes(), "cls": name[6].encode(),
                        "json": json.dumps({"path": name}).encode()})  # fmt: skip
        sink.write({"__key__": "000000003", "png": b"broken", "cls": b"1", "json": b'{"path": "class_1/1.png"}'})

    shard_set = open_shards(shard.parent)
    plain = ShardStream(shard_set, lambda image: torch.from_numpy(np.array(image)), batch_size=4, shuffle=False)
    (batch,) = list(plain.loader(0, 0, 0, torch.device("cpu")))
    assert batch.indices.tolist() == [0, 1, 2] and batch.targets.tolist() == [0, 0, 1]  # evaluation: dropped
    assert batch.unreadable == ["cannot read image 'shard-000000.tar/000000003 (class_1/1.png)': not a recognised "
                                "image format"]  # fmt: skip
    expected = torch.from_numpy(np.array(load_image(photos / "class_1" / "0.png")))
    torch.testing.assert_close(batch.images[2], expected, rtol=0, atol=0)

    training = ShardStream(shard_set, TRANSFORM, batch_size=4, shuffle_buffer=1)
    (batch,) = list(training.loader(1, 0, 0, torch.device("cpu")))
    assert sorted(batch.indices.tolist()) == [0, 1, 2, 3] and len(batch.unreadable) == 1  # replaced: size kept


# Training from shards


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("wds")
    data = make_split_dataset(root / "birds", train_per_class=7, val_per_class=3)
    pack(pack_source([data / "train"], "folders"), root / "train", shard_size=4000, progress_bar=False)
    pack(pack_source([data / "val"], "folders"), root / "val", progress_bar=False)
    return (data, root)


def wds_config(shard_data: tuple[Path, Path], output: Path, **overrides):
    (data, root) = shard_data
    settings = {"data_dir": None, "wds": root / "train", "val_wds": root / "val", "wds_shuffle_buffer": 10,
                "epochs": 2, "batch_size": 4, "accumulation_steps": 2, "save_every": 1, "aug_level": 2}  # fmt: skip
    return tiny_config(data, output, **{**settings, **overrides})


def test_training_from_shards_learns_and_resumes_mid_epoch_exactly(shard_data, tmp_path: Path) -> None:
    straight: list[tuple] = []
    result = train_classifier(wds_config(shard_data, tmp_path / "a", epochs=3), on_batch=recorder(straight))
    assert result.validation[3].top1 >= 0.75  # 4 separable classes: it learns from the stream
    for epoch in (1, 2, 3):
        ids = [i for event in straight if event[0] == epoch for i in event[3]]
        assert sorted(ids) == list(range(28))  # every training photo once per epoch
    (net, info) = birder.load_model(result.model_path)
    assert net.num_classes == 4 and list(info.class_to_idx) == ["class_0", "class_1", "class_2", "class_3"]

    events: list[tuple] = []
    config = wds_config(shard_data, tmp_path / "b", epochs=3, save_every_steps=1, workers=2)
    with pytest.raises(Interrupt):  # 7 batches per epoch: stopped in the middle of epoch 2
        train_classifier(config, on_batch=recorder(events, stop_at=(2, 4)))
    config.resume = "latest"
    train_classifier(config, on_batch=recorder(events))
    assert events == straight  # same batches, same samples, same order, same steps
    assert_same_states(tmp_path / "a" / "vit_b16_3_states.pt", tmp_path / "b" / "vit_b16_3_states.pt")


def test_training_options_that_need_files_are_refused_with_shards(shard_data, tmp_path: Path) -> None:
    with pytest.raises(BirderError, match="class-balanced"):
        train_classifier(wds_config(shard_data, tmp_path, class_balanced=True))
    pack(pack_source([shard_data[0] / "val"]), tmp_path / "unlabelled", progress_bar=False)
    with pytest.raises(BirderError, match="no class names"):
        train_classifier(wds_config(shard_data, tmp_path / "run", wds=tmp_path / "unlabelled"))


# Under torchrun

TORCHRUN_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from birder.training.classification import TrainConfig, train_classifier

(train, val, output, log, stop) = sys.argv[1:6]
rank = int(__import__("os").environ["RANK"])

class Stop(Exception):
    pass

def on_batch(event):
    with open(f"{log}.{rank}", "a") as handle:
        handle.write(json.dumps([event.epoch, event.batch, event.step, event.indices]) + "\\n")
    if stop != "-" and [event.epoch, event.batch] == json.loads(stop):
        raise Stop

config = TrainConfig(output_dir=output, wds=train, val_wds=val, network="vit_b16",
    model_config={"hidden_dim": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64}, size=16,
    rgb_stats="neutral", epochs=2, batch_size=3, lr=2e-3, workers=2, aug_level=1, progress_bar=False,
    wds_shuffle_buffer=8, save_every_steps=1, resume="latest" if stop == "resume" else None)
if stop == "resume":
    stop = "-"
try:
    train_classifier(config, on_batch=on_batch)
except Stop:
    sys.exit(3)
"""


def _torchrun(script: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    launcher = ["torchrun"] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    command = [*launcher, "--standalone", "--nproc_per_node", "2", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def _events(log: Path) -> dict[int, list[list]]:
    return {rank: [json.loads(line) for line in Path(f"{log}.{rank}").read_text().splitlines()] for rank in (0, 1)}


@pytest.mark.slow
def test_torchrun_two_processes_stream_each_sample_once_and_resume_in_order(shard_data, tmp_path: Path) -> None:
    (_, root) = shard_data
    script = tmp_path / "train_wds.py"
    script.write_text(TORCHRUN_SCRIPT)
    common = [str(root / "train"), str(root / "val")]

    straight = _torchrun(script, [*common, str(tmp_path / "a"), str(tmp_path / "a.log"), "-"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    events = _events(tmp_path / "a.log")
    for epoch in (1, 2):
        ids = [i for rank in (0, 1) for event in events[rank] if event[0] == epoch for i in event[3]]
        assert sorted(ids) == list(range(28)), f"epoch {epoch}"  # 2 ranks x 2 workers, each sample once

    # Stopped after batch 3 of epoch 2 (both ranks), then resumed from the step checkpoint of batch 3.
    stopped = _torchrun(script, [*common, str(tmp_path / "b"), str(tmp_path / "b.log"), "[2, 3]"], tmp_path)
    assert stopped.returncode != 0
    resumed = _torchrun(script, [*common, str(tmp_path / "b"), str(tmp_path / "b.log"), "resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _events(tmp_path / "b.log") == events
    assert_same_states(tmp_path / "a" / "vit_b16_2_states.pt", tmp_path / "b" / "vit_b16_2_states.pt")

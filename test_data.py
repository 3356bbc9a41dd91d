"""Tests for data.py: every format is built here in its real layout, so no test needs the network
(only servers on 127.0.0.1) or a downloaded dataset (the Debian Fashion-MNIST test is skipped when
the package is absent)."""

import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
import tarfile
import urllib.request

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

import data
from conftest import CIFAR_NAMES, cifar_bytes, make_cifar_tar, serve


# ------------------------------------------------------------------------------------------------
# Builders of files in the real formats.


def cifar_expected(n: int = 10) -> dict[str, np.ndarray]:
    parts = [cifar_bytes(i, n) for i in range(6)]
    return {"train": np.concatenate([p[1] for p in parts[:5]]),
            "train_labels": np.concatenate([p[2] for p in parts[:5]]),
            "test": parts[5][1], "test_labels": parts[5][2]}


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == {"train", "train_labels", "test", "test_labels"}
    for key, value in want.items():
        assert got[key].dtype == (np.uint8 if key in ("train", "test") else np.int64), key
        assert got[key].flags.c_contiguous, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def files_under(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture
def no_wait(monkeypatch):
    monkeypatch.setattr(data, "RETRY_DELAYS_S", (0.0, 0.0))


# ------------------------------------------------------------------------------------------------
# CIFAR-10.

def test_cifar_record_layout_is_channel_major(tmp_path):
    """Byte 1 + c*1024 + h*32 + w of a record is channel c of pixel (h, w); byte 0 is the label."""
    make_cifar_tar(tmp_path / "cifar-10-binary.tar.gz")
    raw = cifar_bytes(0)[0]
    got = data.load("cifar10", str(tmp_path), md5=data._md5(tmp_path / "cifar-10-binary.tar.gz"))
    image = got["train"][0]
    assert got["train_labels"][0] == raw[0]
    assert list(image[0, 0]) == [raw[1], raw[1 + 1024], raw[1 + 2048]]
    assert image[0, 1, 0] == raw[2] and image[1, 0, 0] == raw[1 + 32]
    assert image[31, 31, 2] == raw[3072]
    assert got["train"][1, 0, 0, 0] == raw[3073 + 1]


def test_cifar_from_file_url(tmp_path):
    md5 = make_cifar_tar(tmp_path / "mini.tar.gz")
    cache = tmp_path / "cache"
    got = data.load("cifar10", str(cache), url=(tmp_path / "mini.tar.gz").as_uri(), md5=md5)
    assert_same(got, cifar_expected())
    assert files_under(cache) == {"cifar-10-binary.tar.gz"}


def test_cifar_over_http_then_from_cache(tmp_path):
    md5 = make_cifar_tar(tmp_path / "cifar-10-binary.tar.gz")
    cache = tmp_path / "cache"
    with serve(tmp_path) as base:
        url = f"{base}/cifar-10-binary.tar.gz"
        assert_same(data.load("cifar10", str(cache), url=url, md5=md5), cifar_expected())
    assert files_under(cache) == {"cifar-10-binary.tar.gz"}
    assert data._md5(cache / "cifar-10-binary.tar.gz") == md5
    # The server is gone: the second call must come from the cache.
    assert_same(data.load("cifar10", str(cache), url=url, md5=md5), cifar_expected())


def test_cifar_extracted_folder_needs_no_archive(tmp_path):
    (tmp_path / "cifar-10-batches-bin").mkdir()
    for i, name in enumerate(CIFAR_NAMES):
        (tmp_path / "cifar-10-batches-bin" / name).write_bytes(cifar_bytes(i)[0])
    # An unreachable URL proves that nothing is downloaded.
    assert_same(data.load("cifar10", str(tmp_path), url="file:///nonexistent.tar.gz"),
                cifar_expected())
    (tmp_path / "cifar-10-batches-bin" / "data_batch_2.bin").unlink()
    with pytest.raises(data.DataError, match="data_batch_2.bin"):
        data.load("cifar10", str(tmp_path))


def test_wrong_md5_download_leaves_nothing(tmp_path):
    make_cifar_tar(tmp_path / "mini.tar.gz")
    cache = tmp_path / "cache"
    with pytest.raises(data.DataError, match="nothing was cached"):
        data.load("cifar10", str(cache), url=(tmp_path / "mini.tar.gz").as_uri(), md5="0" * 32)
    assert files_under(cache) == set()
    with serve(tmp_path) as base, pytest.raises(data.DataError, match="md5"):
        data.load("cifar10", str(cache), url=f"{base}/mini.tar.gz", md5="0" * 32)
    assert files_under(cache) == set()


def test_cached_archive_with_wrong_md5_raises_and_md5_override_loads_it(tmp_path):
    md5 = make_cifar_tar(tmp_path / "cifar-10-binary.tar.gz")
    with pytest.raises(data.DataError, match=f"has md5 {md5}.*{data.CIFAR10_MD5}.*--data_md5"):
        data.load("cifar10", str(tmp_path))
    assert_same(data.load("cifar10", str(tmp_path), md5=md5.upper()), cifar_expected())


def test_truncated_bin_raises(tmp_path):
    md5 = make_cifar_tar(tmp_path / "cifar-10-binary.tar.gz", cut=("data_batch_3.bin", 5))
    with pytest.raises(data.DataError, match=r"data_batch_3.bin has 30725 bytes, not a multiple"):
        data.load("cifar10", str(tmp_path), md5=md5)


@pytest.mark.parametrize("fields", [None, {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}])
def test_archive_missing_member_raises(tmp_path, fields):
    """A member that is absent, or only a symlink, is missing: no link is ever followed."""
    extra = [] if fields is None else [("cifar-10-batches-bin/test_batch.bin", fields)]
    md5 = make_cifar_tar(tmp_path / "cifar-10-binary.tar.gz", drop=["test_batch.bin"], extra=extra)
    with pytest.raises(data.DataError, match="no regular file cifar-10-batches-bin/test_batch.bin"):
        data.load("cifar10", str(tmp_path), md5=md5)


def test_malicious_members_are_never_written(tmp_path, monkeypatch):
    evil = [("../evil", {}), ("cifar-10-batches-bin/../../evil2", {}),
            (str(tmp_path / "absolute_evil"), {}),
            ("cifar-10-batches-bin/link", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}),
            ("cifar-10-batches-bin/hard", {"type": tarfile.LNKTYPE, "linkname": "../../evil3"})]
    cache = tmp_path / "a" / "b"
    cache.mkdir(parents=True)
    md5 = make_cifar_tar(cache / "cifar-10-binary.tar.gz", extra=evil)
    before = files_under(tmp_path)
    monkeypatch.chdir(cache)
    assert_same(data.load("cifar10", str(cache), md5=md5), cifar_expected())
    assert files_under(tmp_path) == before  # nothing extracted at all, inside or outside
    assert not os.path.exists(tmp_path.parent / "evil")


def test_corrupt_archive_raises(tmp_path):
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"not a gzip file")
    md5 = hashlib.md5(b"not a gzip file").hexdigest()
    with pytest.raises(data.DataError, match="not a readable .tar.gz"):
        data.load("cifar10", str(tmp_path), md5=md5)


# ------------------------------------------------------------------------------------------------
# Download errors and retries.

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_error_says_host_unreachable_and_how_to_fix(tmp_path, no_wait):
    url = f"http://127.0.0.1:{closed_port()}/cifar-10-binary.tar.gz"
    with pytest.raises(data.DataError, match=r"in 3 attempt\(s\): 127.0.0.1 could not be reached"
                       r".*cifar-10-batches-bin/ folder in"):
        data.load("cifar10", str(tmp_path / "cache"), url=url)
    assert files_under(tmp_path) == set()


def test_http_error_is_not_retried(tmp_path, no_wait, monkeypatch):
    calls = []
    real_urlopen = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: calls.append(1) or
                        real_urlopen(*a, **k))
    with serve(tmp_path) as base, pytest.raises(data.DataError, match="HTTP error 404"):
        data.load("cifar10", str(tmp_path / "cache"), url=f"{base}/missing.tar.gz")
    assert len(calls) == 1


def test_dropped_connection_is_retried(tmp_path, no_wait, monkeypatch):
    md5 = make_cifar_tar(tmp_path / "cifar-10-binary.tar.gz")
    calls = []
    real_urlopen = urllib.request.urlopen

    def flaky_urlopen(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError("connection reset by peer")
        return real_urlopen(*args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", flaky_urlopen)
    with serve(tmp_path) as base:
        got = data.load("cifar10", str(tmp_path / "cache"), url=f"{base}/cifar-10-binary.tar.gz",
                        md5=md5)
    assert_same(got, cifar_expected())
    assert len(calls) == 2 and files_under(tmp_path / "cache") == {"cifar-10-binary.tar.gz"}


# ------------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST (IDX).

def write_idx(path, array: np.ndarray, magic: int | None = None, cut: int = 0) -> None:
    """Gzipped IDX: big-endian magic 0x0000_08_<ndim>, one big-endian uint32 per dim, then data."""
    magic = 0x0800 + array.ndim if magic is None else magic
    header = b"".join(d.to_bytes(4, "big") for d in (magic, *array.shape))
    with gzip.open(path, "wb") as f:
        f.write((header + array.astype(np.uint8).tobytes())[:len(header) + array.size - cut])


def write_mnist(folder, n_train: int = 7, n_test: int = 3) -> dict[str, np.ndarray]:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    want = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), labels)
        want[split], want[f"{split}_labels"] = images[..., None], labels
    return want


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("in_subfolder", [True, False])
def test_idx_round_trip(tmp_path, name, in_subfolder):
    want = write_mnist(tmp_path / name if in_subfolder else tmp_path)
    got = data.load(name, str(tmp_path))
    assert_same(got, want)
    assert got["train"].shape == (7, 28, 28, 1)


def test_idx_wrong_magic_raises(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)), magic=0x0801)
    with pytest.raises(data.DataError, match="magic number is 0x00000801, expected 0x00000803"):
        data.load("mnist", str(tmp_path))


def test_idx_truncated_payload_raises(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((7, 28, 28)), cut=1)
    with pytest.raises(data.DataError, match=r"train-images.*5488 bytes.*has 5487.*truncated"):
        data.load("mnist", str(tmp_path))


def test_idx_download_is_checked_against_official_md5(tmp_path):
    """Served files differ from the official ones, so nothing may enter the cache."""
    write_mnist(tmp_path / "mirror")
    cache = tmp_path / "cache"
    with serve(tmp_path / "mirror") as base, pytest.raises(data.DataError, match="f68b3c2d"):
        data.load("mnist", str(cache), url=f"{base}/")
    assert files_under(cache) == set()


# md5s of the decompressed upstream IDX files, as listed next to the .gz md5s in public
# Fashion-MNIST loaders; Debian recompresses the .gz files, so only these can be compared.
FASHION_RAW_MD5 = {"train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                   "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
                   "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
                   "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965"}


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DEBIAN_DIR),
                    reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_package(tmp_path):
    for name, md5 in FASHION_RAW_MD5.items():
        with gzip.open(os.path.join(data.FASHION_MNIST_DEBIAN_DIR, name), "rb") as f:
            assert hashlib.md5(f.read()).hexdigest() == md5, name
    got = data.load("fashion_mnist", str(tmp_path))
    assert got["train"].shape == (60000, 28, 28, 1) and got["test"].shape == (10000, 28, 28, 1)
    # Fashion-MNIST is balanced: 6000 train and 1000 test images per class.
    assert list(np.bincount(got["train_labels"])) == [6000] * 10
    assert list(np.bincount(got["test_labels"])) == [1000] * 10
    assert files_under(tmp_path) == set()


# ------------------------------------------------------------------------------------------------
# Downsampled ImageNet and generic npz.

def write_imagenet(folder, size: int, n: int = 2) -> dict[str, np.ndarray]:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(size)
    want = {"train": [], "train_labels": [], "test": [], "test_labels": []}
    names = [("train", f"train_data_batch_{i}.npz") for i in range(1, 11)] + [("test", "val_data")]
    for split, name in names:
        rows = rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)  # R, G, B planes
        labels = rng.integers(1, 1001, n)  # 1-based, as in the official files
        np.savez(os.path.join(folder, name), data=rows, labels=labels)
        want[split].append(rows.reshape(n, 3, size, size).transpose(0, 2, 3, 1))
        want[f"{split}_labels"].append(labels - 1)
    return {key: np.concatenate(value) for key, value in want.items()}


def test_imagenet_npz_batches_load_with_zero_based_labels(tmp_path):
    want = write_imagenet(tmp_path / "imagenet32", 32)
    got = data.load("imagenet32", str(tmp_path))
    assert_same(got, want)
    assert got["train"].shape == (20, 32, 32, 3) and got["test"].shape == (2, 32, 32, 3)
    row = np.load(tmp_path / "imagenet32" / "train_data_batch_1.npz")["data"][0]
    assert list(got["train"][0, 0, 1]) == [row[1], row[1 + 1024], row[1 + 2048]]


def test_imagenet_missing_files_say_where_to_get_them(tmp_path):
    write_imagenet(tmp_path / "imagenet64", 64)
    (tmp_path / "imagenet64" / "val_data.npz").unlink()
    with pytest.raises(data.DataError, match="image-net.org/download-images.*64x64 \\(npz\\)"):
        data.load("imagenet64", str(tmp_path))


def test_imagenet_wrong_size_raises(tmp_path):
    write_imagenet(tmp_path, 32)
    with pytest.raises(data.DataError, match=r"uint8 \[N, 12288\]"):
        data.load("imagenet64", str(tmp_path))


def test_npz_loads_with_and_without_labels(tmp_path):
    train = np.arange(2 * 4 * 6 * 1, dtype=np.uint8).reshape(2, 4, 6, 1)  # non-square
    test = np.asfortranarray(np.arange(3 * 4 * 6, dtype=np.uint8).reshape(3, 4, 6, 1))
    np.savez(tmp_path / "d.npz", train=train, test=test, train_labels=np.array([3, 4], np.int32))
    got = data.load(f"npz:{tmp_path / 'd.npz'}")
    assert set(got) == {"train", "test", "train_labels"}  # no test labels in the file: none
    np.testing.assert_array_equal(got["train"], train)
    np.testing.assert_array_equal(got["test"], test)
    assert got["test"].flags.c_contiguous and got["train_labels"].dtype == np.int64
    np.testing.assert_array_equal(got["train_labels"], [3, 4])
    assert data.num_classes("npz:x", got | {"test_labels": np.array([7])}) == 8


@pytest.mark.parametrize("arrays, message", [
    ({"train": np.zeros((2, 4, 4, 1), np.float32)}, "`train` must be uint8 .* float32"),
    ({"test": np.zeros((2, 4, 4), np.uint8)}, r"`test` must be uint8 \[N, H, W, C\].*\(2, 4, 4\)"),
    ({"test": np.zeros((2, 4, 5, 1), np.uint8)}, r"\(4, 4, 1\) .* \(4, 5, 1\)"),
    ({"train_labels": np.zeros(3, np.int64)}, r"`train_labels` must be integers \[2\]"),
    ({"train": None}, "`train` must be uint8"),
    ({"test": np.array([None, 1], dtype=object)}, "not a readable .npz of plain arrays"),
])
def test_npz_bad_arrays_raise(tmp_path, arrays, message):
    good = {"train": np.zeros((2, 4, 4, 1), np.uint8), "test": np.zeros((1, 4, 4, 1), np.uint8)}
    contents = {k: v for k, v in {**good, **arrays}.items() if v is not None}
    np.savez(tmp_path / "d.npz", **contents)
    with pytest.raises(data.DataError, match=message):
        data.load(f"npz:{tmp_path / 'd.npz'}")


def test_npz_missing_file_raises(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load(f"npz:{tmp_path / 'absent.npz'}")


# ------------------------------------------------------------------------------------------------
# Synthetic data, names, arguments, defaults.

def test_synthetic_is_deterministic_structured_uint8():
    a, b = data.load("synthetic"), data.load("synthetic")
    assert_same(a, b)
    assert a["train"].shape == (512, 16, 16, 3) and a["test"].shape == (128, 16, 16, 3)
    images = a["train"].astype(np.float64)
    assert images.std() > 30  # images differ from each other ...
    assert np.abs(np.diff(images, axis=2)).mean() < 15  # ... but each one is smooth
    assert set(a["train_labels"]) == set(range(10))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'.*cifar10, mnist"):
        data.load("cifar100")


def test_md5_and_url_only_where_they_apply(tmp_path):
    with pytest.raises(data.DataError, match="md5= only applies to the cifar10"):
        data.load("mnist", str(tmp_path), md5="0" * 32)
    with pytest.raises(data.DataError, match="url= does not apply"):
        data.load("synthetic", url="http://127.0.0.1/")


def test_default_data_dir_honours_xdg_cache_home(tmp_path):
    code = "import data; print(data.DEFAULT_DATA_DIR)"
    for env, want in (({"XDG_CACHE_HOME": str(tmp_path)}, tmp_path / "jet-data"),
                      ({"HOME": str(tmp_path)}, tmp_path / ".cache" / "jet-data")):
        clean = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
        out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, check=True,
                             capture_output=True, text=True, cwd=os.path.dirname(data.__file__))
        assert out.stdout.strip() == str(want)


# ------------------------------------------------------------------------------------------------
# Batch order.

sizes = st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n)))
seeds = st.integers(0, 2**63 - 1)
# These properties are cheap (no XLA), so they get more examples than conftest.py's profile.
many = hypothesis.settings(max_examples=100)


@many
@hypothesis.given(sizes, seeds, st.integers(0, 3))
def test_batches_of_an_epoch_are_disjoint_full_and_in_range(size, seed, epoch):
    n, batch_size = size
    steps = data.steps_per_epoch(n, batch_size)
    assert steps == n // batch_size  # the remainder is dropped
    batches = [data.batch_indices(n, batch_size, seed, epoch * steps + i) for i in range(steps)]
    seen = np.concatenate(batches)
    assert all(b.shape == (batch_size,) and b.dtype.kind == "i" for b in batches)
    assert len(np.unique(seen)) == steps * batch_size and 0 <= seen.min() and seen.max() < n


@many
@hypothesis.given(sizes, seeds, st.integers(0, 10_000))
def test_batch_is_a_pure_function_of_its_arguments(size, seed, step):
    n, batch_size = size
    first = data.batch_indices(n, batch_size, seed, step)
    first[:] = -1  # a caller scribbling on its batch must not change later answers
    data._epoch_order.cache_clear()  # as in a fresh process, e.g. a resumed run
    again = data.batch_indices(n, batch_size, seed, step)
    epoch, index = divmod(step, n // batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    np.testing.assert_array_equal(again, order[index * batch_size:(index + 1) * batch_size])
    np.testing.assert_array_equal(again, data.batch_indices(n, batch_size, seed, step))


@many
@hypothesis.given(st.integers(8, 300), seeds, st.integers(0, 100))
def test_each_epoch_has_a_different_order(n, seed, epoch):
    """With n >= 8 two equal permutations have probability <= 1/8! per pair: a failure is a bug."""
    orders = [np.concatenate([data.batch_indices(n, 1, seed, e * n + i) for i in range(n)])
              for e in (epoch, epoch + 1)]
    assert not np.array_equal(*orders)


def test_drop_remainder_and_epoch_boundary():
    # 10 examples, batch 4: steps 0, 1 are epoch 0; examples order[8:10] are never used; step 2
    # starts epoch 1 with a new permutation.
    order0 = np.random.default_rng([5, 0]).permutation(10)
    order1 = np.random.default_rng([5, 1]).permutation(10)
    np.testing.assert_array_equal(data.batch_indices(10, 4, 5, 1), order0[4:8])
    np.testing.assert_array_equal(data.batch_indices(10, 4, 5, 2), order1[0:4])


@pytest.mark.parametrize("n, batch_size, seed, step", [
    (10, 11, 0, 0), (10, 0, 0, 0), (10, 2, -1, 0), (10, 2, 0, -1)])
def test_invalid_batch_arguments_raise(n, batch_size, seed, step):
    with pytest.raises(data.DataError):
        data.batch_indices(n, batch_size, seed, step)


@hypothesis.given(st.integers(2, 80), st.data())
def test_validation_split_partitions_the_training_set(size, draw):
    """The held-out examples and the remaining training examples partition the training set,
    labels stay with their images, the split depends on nothing but the set's size and n (so
    every run holds out the same examples), and the test set is untouched."""
    n = draw.draw(st.integers(1, size - 1))
    ids = np.arange(size)
    dataset = {"train": ids[:, None, None, None], "train_labels": ids * 10,
               "test": np.zeros((3, 1, 1, 1)), "test_labels": np.zeros(3)}
    out = data.validation_split(dataset, n)
    kept, held = out["train"].ravel(), out["validation"].ravel()
    assert len(held) == n and sorted(np.concatenate([kept, held])) == list(ids)
    assert list(kept) == sorted(kept)  # the others keep their order
    np.testing.assert_array_equal(out["validation_labels"], held * 10)
    np.testing.assert_array_equal(out["train_labels"], kept * 10)
    assert out["test"] is dataset["test"]
    again = data.validation_split(dataset, n)
    np.testing.assert_array_equal(again["validation"], out["validation"])


@hypothesis.given(st.integers(3, 80), st.data())
def test_train_images_keeps_the_first_n_and_the_same_held_out_set(size, draw):
    """--train_images N (load_for_run): after the validation split, the first N of the
    remaining training examples with their labels; the held-out set is the one the whole
    training set gets, whatever N; N beyond what is left is refused."""
    held = draw.draw(st.integers(1, size - 2))
    n = draw.draw(st.integers(1, size - held))
    ids = np.arange(size)
    dataset = {"train": ids[:, None, None, None].astype(np.uint8), "train_labels": ids * 10,
               "test": np.zeros((3, 1, 1, 1), np.uint8)}
    full = data.validation_split(dataset, held)
    out = data.first_images(full, n)
    np.testing.assert_array_equal(out["train"], full["train"][:n])
    np.testing.assert_array_equal(out["train_labels"], out["train"].ravel().astype(int) * 10)
    np.testing.assert_array_equal(out["validation"], full["validation"])
    with pytest.raises(data.DataError, match="--train_images"):
        data.first_images(full, size - held + 1)


@pytest.mark.parametrize("n", [0, 5, -1])
def test_validation_split_needs_examples_left_to_train_on(n):
    with pytest.raises(data.DataError, match="--validation"):
        data.validation_split({"train": np.zeros((5, 1, 1, 1)), "train_labels": np.zeros(5)}, n)


# ------------------------------------------------------------------------------------------
# The trivial baseline


def test_histogram_baseline_is_the_per_pixel_code_length():
    """Each position has its own 256-bin histogram with add-one smoothing: two training
    images [0, 7] and [0, 9] give position 0 the count 2 + 1 of 2 + 256 for value 0 and
    position 1 the count 1 + 1 for value 7; positions do not inform each other."""
    train = np.array([[0, 7], [0, 9]], np.uint8).reshape(2, 1, 1, 2)
    held = np.array([[0, 7]], np.uint8).reshape(1, 1, 1, 2)
    expected = (-np.log2(3 / 258) - np.log2(2 / 258)) / 2
    assert data.histogram_bpd(train, held) == pytest.approx(expected, rel=1e-12)
    # Chunked over many images, the same as one pass: 5000 random images of 3 values.
    rng = np.random.default_rng(0)
    many = rng.integers(0, 256, (5000, 1, 1, 3), np.uint8)
    some = rng.integers(0, 256, (7, 1, 1, 3), np.uint8)
    counts = [np.bincount(many[:, 0, 0, c], minlength=256) + 1 for c in range(3)]
    want = -np.mean([np.log2(counts[c][some[:, 0, 0, c]] / counts[c].sum()) for c in range(3)])
    assert data.histogram_bpd(many, some) == pytest.approx(want, rel=1e-12)


def test_histogram_baselines_are_cached_beside_the_data(tmp_path, monkeypatch):
    """The figures of a dataset and split are computed once and read back from
    <data_dir>/baselines.json; another split is another entry. The synthetic set writes
    nothing: a run on it leaves no file in the data directory (or the user's cache)."""
    path = tmp_path / "set.npz"
    np.savez(path, **{k: v for k, v in data.load("synthetic").items()})
    name = f"npz:{path}"
    dataset = data.validation_split(data.load(name), 100)
    first = data.histogram_baselines(dataset, name, tmp_path, 100)
    assert set(first) == {"validation", "test"} and 7 < first["validation"] < 8
    assert data.histogram_baselines(data.load("synthetic"), "synthetic", tmp_path / "s", None)
    assert not (tmp_path / "s").exists()
    monkeypatch.setattr(data, "histogram_bpd", lambda *a: pytest.fail("computed again"))
    assert data.histogram_baselines(dataset, name, tmp_path, 100) == first
    [key] = json.load(open(tmp_path / "baselines.json"))
    assert key.startswith(f"{name} validation=100 size=")

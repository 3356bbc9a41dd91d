"""Image datasets for Jet as uint8 arrays, parsed from their original file formats.

Standard library + NumPy only: nothing is unpickled (npz files are read with allow_pickle=False)
and nothing is extracted (CIFAR-10 records are read straight out of the .tar.gz).

load(name) returns {"train": uint8 [N, H, W, C], "train_labels": int64 [N],
                    "test": uint8 [M, H, W, C], "test_labels": int64 [M]} for
  cifar10                 CIFAR-10 binary version, downloaded and md5-checked on first use
  mnist, fashion_mnist    the original IDX .gz files, downloaded and md5-checked on first use
  imagenet32, imagenet64  downsampled ImageNet npz batches (image-net.org needs a login: by hand)
  npz:PATH                any .npz with uint8 `train` and `test` arrays [N, H, W, C] (and,
                          optionally, integer `train_labels` and `test_labels` [N])
  synthetic               a small generated dataset for smoke tests
Files the user placed (an extracted CIFAR-10 folder, IDX files) are used as they are; a cached
archive is md5-checked before use; a download enters the cache only once its md5 matches.
"""

import contextlib
import functools
import gzip
import hashlib
import http.client
import json
import math
import os
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import numpy as np

DEFAULT_DATA_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jet-data")
NAMES = ("cifar10", "mnist", "fashion_mnist", "imagenet32", "imagenet64", "npz:PATH", "synthetic")


class DataError(ValueError):
    """A dataset file is missing, corrupt or in the wrong format; the message says how to fix it."""


# ------------------------------------------------------------------------------------------------
# Download: to a temporary file next to the target, with progress and retries; md5, then rename.

RETRY_DELAYS_S = (1.0, 4.0, 16.0)  # a dropped connection or a DNS hiccup usually heals in seconds
PROGRESS_EVERY_S = 1.0  # at most one progress line per second, so logs stay readable


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, tmp: str) -> str:
    """Streams `url` into the file `tmp`, printing progress to stderr; returns its md5."""
    digest, done, last_print = hashlib.md5(), 0, time.monotonic()
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        of_total = f" / {total / 1e6:.1f}" if total else ""
        while chunk := response.read(1 << 20):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if time.monotonic() - last_print >= PROGRESS_EVERY_S:
                print(f"{url}: {done / 1e6:.1f}{of_total} MB", file=sys.stderr, flush=True)
                last_print = time.monotonic()
    print(f"{url}: {done / 1e6:.1f}{of_total} MB, done", file=sys.stderr, flush=True)
    return digest.hexdigest()


def _download(url: str, path: str, md5: str, fix: str) -> None:
    """Downloads `url` to `path`, which only ever appears complete and with the expected md5."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.part")
    host = urllib.parse.urlsplit(url).hostname
    delays = RETRY_DELAYS_S if host else ()  # a missing local file will not appear by waiting
    for attempt in range(len(delays) + 1):
        try:
            actual = _fetch(url, tmp)
            if actual != md5:
                raise DataError(f"{url} downloaded with md5 {actual}, but {md5} was expected; "
                                f"the download was deleted and nothing was cached. {fix}")
            os.replace(tmp, path)
            return
        except urllib.error.HTTPError as e:  # the server answered, so asking again will not help
            raise DataError(f"{url}: HTTP error {e.code} {e.reason}. {fix}") from e
        except (urllib.error.URLError, ConnectionError, TimeoutError,
                http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            if attempt == len(delays):
                problem = f"{host} could not be reached" if host else "it could not be read"
                raise DataError(f"could not download {url} ({reason}) in {attempt + 1} "
                                f"attempt(s): {problem}. If this machine is offline: {fix}") from e
            print(f"{url}: {reason}; retrying in {delays[attempt]:.0f} s", file=sys.stderr)
            time.sleep(delays[attempt])
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


# ------------------------------------------------------------------------------------------------
# CIFAR-10, binary version: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32).
# URL and md5 from the download table on https://www.cs.toronto.edu/~kriz/cifar.html.

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
_CIFAR_DIR, _CIFAR_ARCHIVE = "cifar-10-batches-bin", "cifar-10-binary.tar.gz"
_CIFAR_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _parse_cifar(raw: bytes, source: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    if len(raw) % _CIFAR_RECORD:
        raise DataError(f"{source}: {name} has {len(raw)} bytes, not a multiple of the "
                        f"{_CIFAR_RECORD}-byte CIFAR-10 record (1 label + 3072 pixels): it is "
                        f"truncated or not CIFAR-10 binary. Delete {source} to download it again.")
    records = np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR_RECORD)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # -> [N, 32, 32, 3]
    return np.ascontiguousarray(images), records[:, 0].astype(np.int64)


def _read_cifar_archive(path: str) -> dict[str, bytes]:
    """Reads the six expected members; no other member is extracted or even opened."""
    names = _CIFAR_FILES["train"] + _CIFAR_FILES["test"]
    wanted, found = {f"{_CIFAR_DIR}/{name}": name for name in names}, {}
    try:
        with tarfile.open(path, mode="r|gz") as tar:  # stream mode: one pass over the gzip
            for member in tar:
                if member.name in wanted and member.isfile():
                    found[wanted[member.name]] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable .tar.gz ({e}); delete it to download it "
                        f"again.") from e
    missing = [member for member, name in wanted.items() if name not in found]
    if missing:
        raise DataError(f"{path} has no regular file {', '.join(missing)}: it is neither the "
                        f"CIFAR-10 binary archive ({CIFAR10_URL}) nor a subset in its layout.")
    return found


def _load_cifar10(data_dir: str, url: str, md5: str) -> dict[str, np.ndarray]:
    folder, archive = os.path.join(data_dir, _CIFAR_DIR), os.path.join(data_dir, _CIFAR_ARCHIVE)
    if os.path.isdir(folder):
        raw, where = {}, folder
        for name in _CIFAR_FILES["train"] + _CIFAR_FILES["test"]:
            if not os.path.isfile(os.path.join(folder, name)):
                raise DataError(f"{folder} has no {name}: complete the extracted folder, or "
                                f"delete it to use the archive.")
            with open(os.path.join(folder, name), "rb") as f:
                raw[name] = f.read()
    else:
        if not os.path.exists(archive):
            _download(url, archive, md5, fix=(
                f"Put {_CIFAR_ARCHIVE} (from {CIFAR10_URL}) or its extracted {_CIFAR_DIR}/ folder "
                f"in {data_dir}; a trusted archive with another checksum also needs md5=<its "
                f"md5> (train.py: --data_md5)."))
        elif (actual := _md5(archive)) != md5:
            raise DataError(f"{archive} has md5 {actual}, but {md5} was expected. Delete it to "
                            f"download it again, or if you trust this file pass md5='{actual}' "
                            f"(train.py: --data_md5 {actual}).")
        raw, where = _read_cifar_archive(archive), archive
    out = {}
    for split, names in _CIFAR_FILES.items():
        parsed = [_parse_cifar(raw.pop(name), where, name) for name in names]
        out[split] = np.concatenate([images for images, _ in parsed])
        out[f"{split}_labels"] = np.concatenate([labels for _, labels in parsed])
    return out


# ------------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: gzipped IDX files (big-endian magic and dims, then uint8 data).

# Official .gz md5s: torchvision/datasets/mnist.py; for Fashion-MNIST also the zalandoresearch
# README. Debian's dataset-fashion-mnist recompresses the .gz files (so their md5s differ); the
# decompressed bytes match the upstream md5s of the raw IDX files.
_IDX_SOURCES = {
    "mnist": ("https://storage.googleapis.com/cvdf-datasets/mnist/", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
}
# Debian package dataset-fashion-mnist installs the four .gz files here, with the upstream names.
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801  # magic: uint8 data, 3 resp. 1 dimensions


def _read_idx(path: str, magic: int) -> np.ndarray:
    """Returns the data of a gzipped IDX file: uint8 [N, 28, 28] images or [N] labels."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable .gz ({e}); delete it and load again.") from e
    ndim, found, start = magic & 0xFF, int.from_bytes(raw[:4], "big"), 4 * (1 + (magic & 0xFF))
    if found != magic or len(raw) < start:
        raise DataError(f"{path}: IDX magic number is 0x{found:08x}, expected 0x{magic:08x} "
                        f"(uint8, {ndim} dims): not an MNIST {'image' if ndim == 3 else 'label'} "
                        f"file, check its name.")
    shape = tuple(int.from_bytes(raw[i:i + 4], "big") for i in range(4, start, 4))
    if shape[1:] != (28, 28)[:ndim - 1] or len(raw) - start != np.prod(shape):
        raise DataError(f"{path}: header says {shape} = {np.prod(shape)} bytes of 28x28 data, "
                        f"the file has {len(raw) - start}: it is truncated or corrupt, delete it "
                        f"and load again.")
    return np.frombuffer(raw, np.uint8, offset=start).reshape(shape)


def _load_idx(name: str, data_dir: str, url: str | None) -> dict[str, np.ndarray]:
    base_url, md5s = _IDX_SOURCES[name]
    own = os.path.join(data_dir, name)
    candidates = [own, data_dir] + ([FASHION_MNIST_DEBIAN_DIR] if name == "fashion_mnist" else [])
    folder = next((d for d in candidates if all(os.path.isfile(os.path.join(d, f)) for f in md5s)),
                  own)
    debian = " or `apt-get install dataset-fashion-mnist`" if name == "fashion_mnist" else ""
    for filename, md5 in md5s.items():
        if not os.path.isfile(os.path.join(folder, filename)):
            _download(f"{url or base_url}{filename}", os.path.join(folder, filename), md5,
                      fix=f"Put the four files {', '.join(md5s)} in {own}{debian}.")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), _IDX_IMAGES)
        labels = _read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), _IDX_LABELS)
        if len(images) != len(labels):
            raise DataError(f"{folder}: {len(images)} {prefix} images but {len(labels)} labels; "
                            f"one of the two files belongs to another dataset.")
        out[split], out[f"{split}_labels"] = images[..., None].copy(), labels.astype(np.int64)
    return out


# ------------------------------------------------------------------------------------------------
# Downsampled ImageNet (npz batches, channel-major rows, 1-based labels) and generic npz files.

def _read_npz(path: str, keys: tuple[str, ...], fix: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {key: f[key] for key in keys if key in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz of plain arrays ({e}). {fix}") from e


def _load_imagenet(data_dir: str, size: int) -> dict[str, np.ndarray]:
    files = {"train": [f"train_data_batch_{i}.npz" for i in range(1, 11)], "test": ["val_data.npz"]}
    own, fix = os.path.join(data_dir, f"imagenet{size}"), (
        f"They cannot be downloaded automatically: log in at https://image-net.org/download-images,"
        f" download 'Downsampled ImageNet {size}x{size} (npz)', train and val, and unzip both")
    everything = files["train"] + files["test"]
    folder = next((d for d in (own, data_dir)
                   if all(os.path.isfile(os.path.join(d, f)) for f in everything)), None)
    if folder is None:
        raise DataError(f"imagenet{size} needs train_data_batch_1.npz .. train_data_batch_10.npz "
                        f"and val_data.npz in {own}. {fix} into {own}.")
    out = {}
    for split, names in files.items():
        images, labels = [], []
        for path in (os.path.join(folder, name) for name in names):
            arrays = _read_npz(path, ("data", "labels"), f"{fix} again.")
            rows, ids = arrays.get("data", np.zeros(0)), arrays.get("labels", np.zeros(0))
            if (rows.dtype != np.uint8 or rows.shape[1:] != (3 * size * size,)
                    or ids.shape != rows.shape[:1] or ids.dtype.kind not in "iu"
                    or ids.min(initial=1) < 1):
                raise DataError(f"{path} must hold `data` uint8 [N, {3 * size * size}] and "
                                f"`labels` 1-based integers [N], found data {rows.dtype} "
                                f"{rows.shape} and labels {ids.dtype} {ids.shape}; is it the "
                                f"{size}x{size} npz version? {fix} again.")
            images.append(np.ascontiguousarray(  # channel-major rows -> [N, S, S, 3]
                rows.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)))
            labels.append(ids.astype(np.int64) - 1)
        out[split], out[f"{split}_labels"] = np.concatenate(images), np.concatenate(labels)
    return out


def _load_npz(path: str) -> dict[str, np.ndarray]:
    fix = "Write it with np.savez(path, train=..., test=..., train_labels=..., test_labels=...)."
    if not os.path.isfile(path):
        raise DataError(f"npz dataset {path} does not exist. {fix}")
    arrays, out = _read_npz(path, ("train", "test", "train_labels", "test_labels"), fix), {}
    for split in ("train", "test"):
        images = arrays.get(split, np.zeros(0))
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"{path}: array `{split}` must be uint8 [N, H, W, C], found "
                            f"{images.dtype} {images.shape} (empty if missing); convert it with "
                            f".astype(np.uint8) and add a channel axis if needed.")
        out[split] = np.ascontiguousarray(images)
        if f"{split}_labels" not in arrays:  # labels are optional: only --conditional needs them
            continue
        labels = arrays[f"{split}_labels"]
        if labels.shape != images.shape[:1] or labels.dtype.kind not in "iu":
            raise DataError(f"{path}: array `{split}_labels` must be integers [{len(images)}] "
                            f"like `{split}`, found {labels.dtype} {labels.shape}.")
        out[f"{split}_labels"] = labels.astype(np.int64)
    if out["train"].shape[1:] != out["test"].shape[1:]:
        raise DataError(f"{path}: `train` images are {out['train'].shape[1:]} (H, W, C) but `test` "
                        f"images are {out['test'].shape[1:]}; both splits need the same shape.")
    return out


# ------------------------------------------------------------------------------------------------
# Synthetic data for smoke tests.

def _synthetic() -> dict[str, np.ndarray]:
    """640 16x16 RGB images: a two-colour gradient under a Gaussian blob coloured by the label."""
    rng = np.random.default_rng(2412_15129)  # fixed seed: identical data on every call
    n, size = 640, 16
    y, x = np.mgrid[0:size, 0:size] / (size - 1) - 0.5  # [S, S] each, in [-0.5, 0.5]
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    t = 0.5 + (np.cos(angle) * x + np.sin(angle) * y) / np.sqrt(2)  # [n, S, S], in [0, 1]
    start, end = rng.uniform(0, 255, (2, n, 1, 1, 3))
    labels, palette = rng.integers(0, 10, n), rng.uniform(0, 255, (10, 3))
    centre, radius = rng.uniform(-0.3, 0.3, (2, n, 1, 1)), rng.uniform(0.1, 0.25, (n, 1, 1))
    blob = np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / (2 * radius**2))[..., None]
    background = start + (end - start) * t[..., None]  # [n, S, S, 3]
    images = background * (1 - blob) + palette[labels, None, None] * blob
    images = np.round(images).astype(np.uint8)  # a convex mix of colours in [0, 255]: no clipping
    return {"train": images[:512], "train_labels": labels[:512],
            "test": images[512:], "test_labels": labels[512:]}


# ------------------------------------------------------------------------------------------------
# Public API.

def load(name: str, data_dir: str | None = None, *, url: str | None = None,
         md5: str | None = None) -> dict[str, np.ndarray]:
    """Returns {"train": uint8 [N, H, W, C], "train_labels": int64 [N], "test": uint8 [M, H, W, C],
    "test_labels": int64 [M]}.

    `data_dir` defaults to DEFAULT_DATA_DIR. `url` replaces the download URL (cifar10: of the
    archive; mnist, fashion_mnist: of the folder holding the four files). `md5` replaces the
    expected md5 of the cifar10 archive, to load an archive you trust (e.g. a subset).
    """
    data_dir = os.path.expanduser(os.fspath(data_dir or DEFAULT_DATA_DIR))
    if md5 is not None and name != "cifar10":
        raise DataError(f"md5= only applies to the cifar10 archive, not to {name!r}; drop it.")
    if url is not None and name not in ("cifar10", *_IDX_SOURCES):
        raise DataError(f"{name!r} is never downloaded, so url= does not apply; drop it.")
    if name == "cifar10":
        return _load_cifar10(data_dir, url or CIFAR10_URL, (md5 or CIFAR10_MD5).lower())
    if name in _IDX_SOURCES:
        return _load_idx(name, data_dir, url)
    if name in ("imagenet32", "imagenet64"):
        return _load_imagenet(data_dir, int(name[len("imagenet"):]))
    if name.startswith("npz:"):
        return _load_npz(os.path.expanduser(name[len("npz:"):]))
    if name == "synthetic":
        return _synthetic()
    raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(NAMES)}.")


def digest(dataset: dict[str, np.ndarray]) -> str:
    """A short sha256 of a loaded dataset's arrays (names, then bytes): the same name with other
    pixels (CIFAR-10 decoded from a JPEG copy, say) gets another digest."""
    h = hashlib.sha256()
    for name in sorted(dataset):
        h.update(name.encode() + np.ascontiguousarray(dataset[name]).tobytes())
    return h.hexdigest()[:16]


NUM_CLASSES = {"cifar10": 10, "mnist": 10, "fashion_mnist": 10, "imagenet32": 1000,
               "imagenet64": 1000, "synthetic": 10}
IMAGE_SHAPES = {"cifar10": (32, 32, 3), "mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1),
                "imagenet32": (32, 32, 3), "imagenet64": (64, 64, 3), "synthetic": (16, 16, 3)}


def image_shape(name: str) -> tuple[int, int, int]:
    """(H, W, C) of a dataset's images without loading it: the published size, or for an npz
    file the shape in the header of its `train` array (nothing else is read)."""
    if name in IMAGE_SHAPES:
        return IMAGE_SHAPES[name]
    if not name.startswith("npz:"):
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(NAMES)}.")
    path = os.path.expanduser(name[len("npz:"):])
    try:
        with zipfile.ZipFile(path) as archive, archive.open("train.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                           np.lib.format.read_array_header_2_0)
            shape = read_header(f)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"npz dataset {path}: no readable `train` array ({e}). Write it with "
                        "np.savez(path, train=..., test=...).") from e
    if len(shape) != 4:
        raise DataError(f"{path}: array `train` must be uint8 [N, H, W, C], found shape {shape}.")
    return tuple(shape[1:])


def check_labels(name: str, dataset: dict[str, np.ndarray]) -> int:
    """A class-conditional run's number of classes, after checking that every image has a
    label in range."""
    if "train_labels" not in dataset or "test_labels" not in dataset:
        missing = "train" if "train_labels" not in dataset else "test"
        raise DataError(f"--conditional needs labels, but dataset {name} has none for "
                        f"{missing}; for an npz file, add integer arrays train_labels and "
                        "test_labels.")
    K = num_classes(name, dataset)
    for split in ("train", "test"):
        labels = dataset[f"{split}_labels"]
        if len(labels) and not 0 <= labels.min() <= labels.max() < K:
            raise DataError(f"--conditional: {split} labels of {name} lie in [{labels.min()}, "
                            f"{labels.max()}], outside the {K} classes 0 .. {K - 1}.")
    return K


def num_classes(name: str, dataset: dict[str, np.ndarray]) -> int:
    """Classes of a dataset: the published count, or for an npz file 1 + its largest label."""
    if name in NUM_CLASSES:
        return NUM_CLASSES[name]
    return 1 + int(max(dataset[k].max(initial=0) for k in ("train_labels", "test_labels")))


VALIDATION_SEED = 2412_15129  # fixed, whatever the run's --seed: every run holds out the same set


def validation_split(dataset: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Holds out n training examples: the last n of a fixed permutation of the training set
    become "validation" / "validation_labels"; "train" / "train_labels" keep the others, in
    their original order. Test arrays are unchanged. For tuning without touching the test set."""
    count = len(dataset["train"])
    if not 1 <= n < count:
        raise DataError(f"a validation split of {n} examples needs 1 <= n < {count} (the "
                        f"training set's size); choose a smaller --validation.")
    order = np.random.default_rng(VALIDATION_SEED).permutation(count)
    keep, held = np.sort(order[:-n]), order[-n:]
    out = dict(dataset)
    for name in ("train", "train_labels")[:1 + ("train_labels" in dataset)]:
        out[name.replace("train", "validation")] = dataset[name][held]
        out[name] = dataset[name][keep]
    return out


def load_for_run(f: dict, image_shape) -> tuple[dict[str, np.ndarray], int | None]:
    """The arrays a training run with settings f uses: load(f["dataset"], ...), its images
    checked against `image_shape` (the model's), with --validation's split; and for a
    --conditional run the number of classes, after checking every label (check_labels)."""
    dataset = load(f["dataset"], f.get("data_dir"), url=f.get("data_url"), md5=f.get("data_md5"))
    if tuple(dataset["train"].shape[1:]) != tuple(image_shape):
        raise DataError(f"dataset {f['dataset']} has images {dataset['train'].shape[1:]}, the "
                        f"model (its checkpoint) expects {tuple(image_shape)}.")
    K = check_labels(f["dataset"], dataset) if f.get("conditional") else None
    dataset = validation_split(dataset, f["validation"]) if f.get("validation") else dataset
    return (first_images(dataset, f["train_images"]) if f.get("train_images") else dataset), K


def first_images(dataset: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Keeps the first n training examples (after validation_split, so the held-out set is the
    same whatever n): a fixed small training set, for studying overfitting."""
    if not 1 <= n <= len(dataset["train"]):
        raise DataError(f"--train_images {n} needs 1 <= N <= {len(dataset['train'])}, the "
                        f"training images left after any --validation; choose a smaller N.")
    return dataset | {k: dataset[k][:n] for k in ("train", "train_labels") if k in dataset}


def histogram_bpd(train: np.ndarray, held: np.ndarray) -> float:
    """Bits/dim of the uint8 images `held` under a per-pixel histogram of `train`: each position
    (row, column, channel) gets its own 256-bin histogram with add-one smoothing, and positions
    are independent. The trivial baseline: a model that does not beat it has learnt nothing
    about how pixels go together."""
    D = math.prod(train.shape[1:])
    counts = np.ones(D * 256)
    offsets = np.arange(D) * 256  # position d's bins: d*256 .. d*256 + 255
    for i in range(0, len(train), 4096):  # in chunks: the index array is 8 bytes a value
        counts += np.bincount((train[i:i + 4096].reshape(-1, D) + offsets).ravel(),
                              minlength=D * 256)
    log_p = np.log2(counts.reshape(D, 256) / counts.reshape(D, 256).sum(1, keepdims=True))
    bits = sum(float(-log_p[np.arange(D), held[i:i + 4096].reshape(-1, D)].sum())
               for i in range(0, len(held), 4096))
    return bits / (len(held) * D)


def histogram_baselines(dataset: dict[str, np.ndarray], name: str, data_dir: str | None,
                        validation: int | None, train_images: int | None = None
                        ) -> dict[str, float]:
    """histogram_bpd of the held-out sets ("validation" if there is one, "test") under the
    training set's histogram, cached in <data_dir>/baselines.json by dataset, split and
    --train_images (an npz file also by its size and modification time). The synthetic set, which lives on no disk,
    is computed every time (milliseconds) and writes nothing."""
    if name == "synthetic":
        return {split: histogram_bpd(dataset["train"], dataset[split])
                for split in ("validation", "test") if split in dataset}
    key = f"{name} validation={validation or 0}" + (f" train_images={train_images}"
                                                     if train_images else "")
    if name.startswith("npz:"):
        stat = os.stat(os.path.expanduser(name[len("npz:"):]))
        key += f" size={stat.st_size} mtime={stat.st_mtime_ns}"
    path = os.path.join(os.path.expanduser(data_dir or DEFAULT_DATA_DIR), "baselines.json")
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = {split: histogram_bpd(dataset["train"], dataset[split])
                      for split in ("validation", "test") if split in dataset}
        with contextlib.suppress(OSError):  # a read-only data directory: computed every time
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(f"{path}.{os.getpid()}.tmp", "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(f"{path}.{os.getpid()}.tmp", path)
    return cache[key]


def padded_batches(arrays: tuple[np.ndarray, ...], batch_size: int, limit: int | None = None):
    """Batches of batch_size rows of each array (their first `limit` rows, default all), the
    last one padded with zeros, with a float32 mask [batch_size] of the real rows."""
    n = min(limit or len(arrays[0]), len(arrays[0]))
    for i in range(0, n, batch_size):
        real = min(batch_size, n - i)
        padded = [np.concatenate([a[i:i + real], np.zeros((batch_size - real, *a.shape[1:]),
                                                          a.dtype)]) for a in arrays]
        yield padded, (np.arange(batch_size) < real).astype(np.float32)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of full batches in one pass over the data; the remainder is dropped."""
    if not 1 <= batch_size <= num_examples:
        raise DataError(f"batch_size={batch_size} must be between 1 and the number of training "
                        f"examples ({num_examples}); use a smaller --batch_size.")
    return num_examples // batch_size


@functools.lru_cache(maxsize=2)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    # Cached: every step of an epoch needs the same permutation (1.28M entries for ImageNet).
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.flags.writeable = False  # shared by all calls, so no caller may change it
    return order


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices [batch_size] of the training batch used at global step `step`.

    Epoch e = step // steps_per_epoch is a fresh permutation from np.random.default_rng([seed, e])
    and its last incomplete batch is dropped. A pure function of its arguments, so the
    data-iterator state is just (seed, step) and a resumed run sees exactly the batches an
    uninterrupted one would.
    """
    if seed < 0 or step < 0:
        raise DataError(f"seed ({seed}) and step ({step}) must be non-negative.")
    epoch, index = divmod(int(step), steps_per_epoch(num_examples, batch_size))
    order = _epoch_order(int(num_examples), int(seed), epoch)
    return order[index * batch_size:(index + 1) * batch_size].copy()

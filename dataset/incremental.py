"""The one incremental-dataset base class shared by VOC, ADE20k and Cityscapes-domain.

It does what the reference's ``dataset/utils.py`` ``filter_images`` and the ``__init__`` of its
``VOCSegmentationIncremental``, ``AdeSegmentationIncremental`` and
``CityscapesSegmentationIncrementalDomain`` do. A raw reader per dataset only lists
``(image_path, label_path)`` pairs. This module does the rest:

* label bookkeeping: background 0 is stripped from ``labels``/``labels_old``, which must be disjoint;
* per-step filtering of the split (``filter_images``), overlap or disjoint, from the set of values of
  each mask; the scan runs in a process pool and its result is cached as the reference's
  ``train-{step}.npy`` files, guarded by a JSON sidecar so that a cache made for another data root or
  list is not reused;
* the ``test_on_val`` 80/20 hold-out (``VOCSegmentationIncremental.__init__``);
* class reordering and masking (``inverted_order`` and the target transforms of the VOC and ADE
  classes) as a 256-entry ``uint8`` lookup table applied after the joint transform:
  ``label = lut[label]``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.distributed import is_main_process, main_process_first
from utils.errors import DatasetError, OptionsError, TaskError
from utils.files import write_atomically, write_text_atomically
from utils.logger import get_logger

from .transform import ToTensor, label_to_tensor

logger = get_logger("dataset")

#: Bumped whenever the meaning of a cached index file changes. 2: the scan also refuses masks whose size
#: differs from their image's, so splits cached before that check are scanned again.
CACHE_FORMAT = 2
#: Masks per task handed to a scan worker.
SCAN_CHUNK = 64
#: Below this many masks the scan runs in-process: starting a pool would cost more than it saves.
MIN_PARALLEL_SCAN = 512
#: Plain-log progress period (the reference printed every 1000 images).
LOG_EVERY = 1000
IGNORE = 255

Sample = tuple[str, str]


def strip_background(labels: Iterable[int] | None) -> list[int]:
    """``labels`` as ints without background 0 (the reference removes every 0)."""
    return [int(label) for label in (labels or []) if int(label) != 0]


def inverted_order(order: Sequence[int]) -> dict[int, int]:
    """Map raw class id -> model class index (its position in ``order``); 255 stays 255.

    Identity for ascending tasks, a real permutation for the random-order VOC tasks (15-5s_b..w).
    """
    inv = {int(label): position for position, label in enumerate(order)}
    inv[IGNORE] = IGNORE
    return inv


def build_label_lut(inv: Mapping[int, int], allowed: Iterable[int], fallback: int) -> np.ndarray:
    """256-entry table: ``x`` in ``allowed`` -> ``inv[x]``, every other value -> ``fallback``."""
    lut = np.full(256, fallback, dtype=np.uint8)
    for value in allowed:
        lut[value] = inv[value]
    return lut


#: ``--data_masking`` values, the reference's choices (``all`` is among them but not implemented).
DATA_MASKINGS = ("current", "current+old", "all", "new")


def check_data_masking(data_masking: str) -> None:
    """Refuse a ``--data_masking`` that :func:`voc_masking_lut` cannot build; the one place the rule is
    written (``argparser.validate_options`` applies it before any work, the datasets before their scan).

    Raises:
        OptionsError: ``all`` (the reference raises NotImplementedError for it) or an unknown mode.
    """
    if data_masking == "all":
        raise OptionsError(
            "--data_masking all is not implemented (the reference raises NotImplementedError for it). "
            "Use --data_masking current (default: old and future classes become background), "
            "current+old (old classes keep their labels) or new (old and future classes are ignored)."
        )
    if data_masking not in DATA_MASKINGS:
        raise OptionsError(
            f"Unknown --data_masking {data_masking!r}; choose one of current, current+old or new."
        )


def voc_masking_lut(labels: Sequence[int], labels_old: Sequence[int], data_masking: str) -> np.ndarray:
    """VOC target mapping for background-stripped ``labels`` / ``labels_old``.

    Reference: ``VOCSegmentationIncremental.__init__`` (its ``data_masking`` branches).

    * ``current``: old and future classes -> 0, 255 kept;
    * ``current+old``: old classes keep their (reordered) index, future -> 0;
    * ``new``: old and future classes -> 255 (ignored).

    Raises:
        OptionsError: ``all`` (not implemented by the reference) or an unknown mode.
    """
    check_data_masking(data_masking)
    inv = inverted_order([0, *labels_old, *labels])
    if data_masking == "current":
        return build_label_lut(inv, [0, *labels, IGNORE], fallback=0)
    if data_masking == "current+old":
        return build_label_lut(inv, [*labels_old, 0, *labels, IGNORE], fallback=0)
    return build_label_lut(inv, [0, *labels], fallback=IGNORE)  # new


def ade_masking_lut(
    labels: Sequence[int], labels_old: Sequence[int], masking: bool = True, ignore_test_bg: bool = False
) -> np.ndarray:
    """ADE20k target mapping for background-stripped ``labels`` / ``labels_old``.

    Reference behaviour (``AdeSegmentationIncremental.__init__``): no 0 is prepended to the kept labels,
    so background/void 0, old and future classes and even 255 all become the masking value (0, or 255
    with ``ignore_test_bg``). Without masking (``--no_mask``) every class of
    ``[0] + labels_old + labels`` is only reordered.
    """
    inv = inverted_order([0, *labels_old, *labels])
    masking_value = 0
    if ignore_test_bg:
        masking_value = IGNORE
        inv[0] = IGNORE
    allowed = list(labels) if masking else list(inv)
    return build_label_lut(inv, allowed, fallback=masking_value)


def identity_lut() -> np.ndarray:
    return np.arange(256, dtype=np.uint8)


def select_indices(
    presence: np.ndarray, labels: Sequence[int], labels_old: Sequence[int], overlap: bool
) -> np.ndarray:
    """Indices of the images kept at this step.

    Args:
        presence: ``(N, 256)`` bool, ``presence[i, v]`` = value ``v`` occurs in mask ``i``.
        labels: classes of the current step (0 is ignored).
        labels_old: classes of the previous steps.
        overlap: overlapped setting; otherwise disjoint.

    Returns:
        int64 array of kept indices, ascending. Overlap keeps images with at least one current class;
        disjoint additionally drops images containing any class outside ``labels ∪ labels_old ∪ {0, 255}``.
    """
    current = np.zeros(256, dtype=bool)
    current[strip_background(labels)] = True
    keep = presence[:, current].any(axis=1)
    if not overlap:
        seen = current.copy()
        seen[list(labels_old)] = True
        seen[[0, IGNORE]] = True
        keep &= ~presence[:, ~seen].any(axis=1)
    return np.flatnonzero(keep).astype(np.int64)


def _unreadable(exc: BaseException) -> str:
    """How a file that PIL could not open or decode is described in an error."""
    if isinstance(exc, FileNotFoundError):
        return "is missing"
    # PIL reports damaged files with OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error ...
    return f"cannot be read ({type(exc).__name__}: {exc})"


def _image_size(path: str) -> tuple[int, int]:
    """``(width, height)`` from the file header: PIL's ``open`` is lazy and decodes no pixel."""
    with Image.open(path) as image:
        return image.size


def _scan_chunk(chunk: Sequence[Sample]) -> tuple[np.ndarray, tuple[str, str, str] | None]:
    """Value presence of each mask of ``chunk``: ``(n, 256)`` bool, plus the first problem found.

    Each image's header is read for its size (no decoding), which must equal its mask's: a mask of another
    size would be cropped and flipped out of step with its image. Runs in a pool worker; problems come
    back as ``(what, path, detail)`` so the parent raises the :class:`DatasetError` with the dataset's
    download hint.
    """
    presence = np.zeros((len(chunk), 256), dtype=bool)
    for i, (image_path, mask_path) in enumerate(chunk):
        try:
            image_size = _image_size(image_path)
        except Exception as exc:  # whatever PIL raises on this file is reported as the file's
            return presence[:i], ("image", image_path, _unreadable(exc))
        try:
            with Image.open(mask_path) as mask:
                if mask.mode not in ("L", "P"):
                    return presence[:i], ("mask", mask_path, f"has PIL mode {mask.mode!r}, not 8-bit L/P")
                if mask.size != image_size:
                    detail = _size_mismatch(mask.size, image_path, image_size)
                    return presence[:i], ("mask", mask_path, detail)
                # histogram() of an L/P image counts each of the 256 values in C, much faster than np.unique.
                presence[i] = np.asarray(mask.histogram(), dtype=np.int64) > 0
        except Exception as exc:
            return presence[:i], ("mask", mask_path, _unreadable(exc))
    return presence, None


def _size_mismatch(mask_size: tuple[int, int], image_path: str, image_size: tuple[int, int]) -> str:
    (mw, mh), (iw, ih) = mask_size, image_size
    return (
        f"is {mw}x{mh} pixels but its image {image_path} is {iw}x{ih}, so its labels would not line up with "
        "the pixels (a mask of another image, or a resized or rotated copy)"
    )


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork keeps start-up free (no re-import of torch in every worker); the workers only use PIL/numpy.
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


class _Progress:
    """Rank 0 only: a tqdm bar when allowed and stderr is a terminal, plain log lines otherwise."""

    def __init__(self, total: int, desc: str, bar: bool) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.active = is_main_process()
        self.bar = None
        if bar and self.active and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="mask", leave=False, dynamic_ncols=True)

    def update(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
        elif self.active and self.done // LOG_EVERY > before // LOG_EVERY:
            logger.info("%s: %d/%d masks", self.desc, self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def scan_masks(
    samples: Sequence[Sample], workers: int = 0, progress: bool = True, desc: str = "Filtering"
) -> tuple[np.ndarray, tuple[str, str, str] | None]:
    """Read every mask once and record which values it contains.

    Args:
        samples: ``(image_path, mask_path)`` pairs; images are only checked for existence.
        workers: pool processes; 0 (or a small split) scans in-process.
        progress: allow a tqdm bar (rank 0, terminal only); otherwise plain log lines every
            LOG_EVERY masks (``--no_progress``).
        desc: label of the progress output.

    Returns:
        ``(presence, problem)``: ``(N, 256)`` bool presence matrix, and the first problem found as
        ``(what, path, detail)`` or None (the presence rows after a problem are left False).
    """
    presence = np.zeros((len(samples), 256), dtype=bool)
    chunks = [samples[i : i + SCAN_CHUNK] for i in range(0, len(samples), SCAN_CHUNK)]
    bar = _Progress(len(samples), desc, progress)
    pool = None
    try:
        if workers > 0 and len(samples) >= MIN_PARALLEL_SCAN:
            pool = _pool_context().Pool(min(workers, len(chunks)))
            results: Iterable = pool.imap(_scan_chunk, chunks)
        else:
            results = map(_scan_chunk, chunks)
        start = 0
        for chunk, (rows, problem) in zip(chunks, results):
            presence[start : start + len(rows)] = rows
            if problem is not None:
                return presence, problem
            start += len(chunk)
            bar.update(len(chunk))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return presence, None


def _digest(idxs: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(idxs, dtype="<i8").tobytes()).hexdigest()


class IndexCache:
    """Kept-index file of the reference (``train-{step}.npy``) plus a JSON sidecar ``<file>.json``.

    Reference behaviour (RN-27) fixed: the reference reused any existing file, even one made for another
    data root or split list. Here the sidecar records what the indices were computed from and a
    checksum of the file; any difference means recompute and overwrite.
    """

    def __init__(self, path: str | os.PathLike, signature: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.sidecar = self.path.with_name(self.path.name + ".json")
        # Round-trip through JSON so tuples/lists compare equal to what a file holds.
        self.signature = json.loads(json.dumps(signature))

    def load(self, num_samples: int) -> tuple[np.ndarray | None, str]:
        """Cached indices, or ``(None, why they cannot be used)``."""
        if not self.path.is_file():
            return None, "no cached index file"
        try:
            meta = json.loads(self.sidecar.read_text())
        except FileNotFoundError:
            return None, f"no sidecar {self.sidecar.name} (made by the reference code or interrupted)"
        except (OSError, ValueError) as exc:
            return None, f"unreadable sidecar ({exc})"
        stored = meta.get("signature") if isinstance(meta, dict) else None
        if not isinstance(stored, dict):
            return None, "sidecar without a signature"
        keys = self.signature.keys() | stored.keys()
        changed = sorted(k for k in keys if stored.get(k) != self.signature.get(k))
        if changed:
            return None, "computed for other inputs (" + ", ".join(
                f"{k}: {stored.get(k)!r} -> {self.signature.get(k)!r}" for k in changed
            ) + ")"
        try:
            idxs = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            return None, f"unreadable index file ({exc})"
        idxs = np.asarray(idxs).astype(np.int64).reshape(-1)
        if meta.get("sha256") != _digest(idxs):
            return None, "index file does not match its sidecar checksum"
        if idxs.size and (idxs.min() < 0 or idxs.max() >= num_samples):
            return None, f"indices out of range for a split of {num_samples} images"
        return idxs, "ok"

    def save(self, idxs: np.ndarray) -> None:
        """Atomically write the index file, then its sidecar (a stale sidecar is removed first)."""
        idxs = np.asarray(idxs, dtype=np.int64)
        self.sidecar.unlink(missing_ok=True)
        write_atomically(self.path, lambda f: np.save(f, idxs))
        meta = {"signature": self.signature, "num_kept": int(idxs.size), "sha256": _digest(idxs)}
        text = json.dumps(meta, indent=1, sort_keys=True) + "\n"
        write_text_atomically(self.sidecar, text)


def base_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The base-class options among a reference constructor's ``**kwargs``.

    The reference passes extra keywords (``step``, ``disable_background``, ``ignore_test_bg`` ...) to
    every dataset and each one swallows those it does not use; so do the subclasses here.
    """
    return {k: kwargs[k] for k in ("scan_workers", "progress") if k in kwargs}


def holdout_split(idxs: Sequence[int], train: bool) -> list[int]:
    """Shuffle with ``RandomState(1)`` and keep the first 80 % (train) or the remaining 20 %."""
    idxs = [int(i) for i in idxs]
    np.random.RandomState(1).shuffle(idxs)
    train_len = int(0.8 * len(idxs))
    return idxs[:train_len] if train else idxs[train_len:]


def load_image_and_label(image_path: str, label_path: str, hint: str = "") -> tuple[Image.Image, Image.Image]:
    """Decode an RGB image and its label (palette/grey values untouched), both checked.

    Any failure of PIL on a file (a truncated JPEG, a damaged PNG ...) becomes a :class:`DatasetError` that
    names the file. In a ``DataLoader`` worker that error reaches the user as this message alone (see
    :class:`utils.errors.UserError`), instead of the worker's traceback of a PIL exception.

    Raises:
        DatasetError: a file is missing or cannot be decoded, or the two differ in size (checked here too
            because cached splits and the Cityscapes domains are not scanned).
    """
    try:
        image = Image.open(image_path).convert("RGB")
    except Exception as exc:  # whatever PIL raises on this file is reported as the file's
        raise DatasetError(f"The image file {image_path} {_unreadable(exc)}. {hint}".rstrip()) from exc
    try:
        label = Image.open(label_path)
        label.load()
    except Exception as exc:
        raise DatasetError(f"The label mask {label_path} {_unreadable(exc)}. {hint}".rstrip()) from exc
    if label.size != image.size:
        raise DatasetError(
            f"The label mask {label_path} {_size_mismatch(label.size, image_path, image.size)}. Every entry "
            f"of the split needs a mask of its image's size. {hint}".rstrip()
        )
    return image, label


class ImageLabelPairs:
    """Base of the raw split readers: ``self.images`` lists (image path, label path) pairs.

    ``__getitem__`` opens the image as RGB and the label as stored (palette/grey values untouched), then
    applies the optional joint ``self.transform``.
    """

    images: list[tuple[str, str]]
    transform: Callable[[Any, Any], tuple[Any, Any]] | None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = load_image_and_label(*self.images[index])
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


class IncrementalSegmentationDataset(Dataset):
    """Images of one split that matter at one incremental step, with remapped labels.

    Subclasses set :attr:`num_classes` and :attr:`download_hint`, list the samples with a raw reader and
    implement :meth:`build_lut`; Cityscapes-domain also overrides :meth:`compute_indices`.

    Args:
        samples: ``(image_path, label_path)`` of the full split, in the reference's order.
        labels: classes of the current step (0 is stripped); None = no filtering and no remapping.
        labels_old: classes of the previous steps (0 is stripped).
        transform: joint transform ending in a tensor conversion; None = :class:`ToTensor` only.
        idxs_path: cache file of kept indices (None = always filter).
        overlap: overlapped (True) or disjoint (False) filtering.
        train: which part of the hold-out split to keep.
        holdout: shuffle with ``RandomState(1)`` and keep 80 % (train) / 20 % (else) of the indices.
        scan_workers: processes for the filtering scan (0 = in-process).
        progress: allow a tqdm bar during the scan (False: plain log lines only).
        data_root: the dataset root, recorded in the cache sidecar.
        split_signature: identity of the split list (path, size, mtime, or listing summary).
    """

    num_classes: ClassVar[int] = 255
    download_hint: ClassVar[str] = ""
    #: Whether class 0 is background and removed from the label lists (not for Cityscapes domains).
    strip_zero: ClassVar[bool] = True

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        labels: Sequence[int] | None,
        labels_old: Sequence[int] | None = None,
        transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
        idxs_path: str | os.PathLike | None = None,
        overlap: bool = True,
        train: bool = True,
        holdout: bool = False,
        scan_workers: int = 0,
        progress: bool = True,
        data_root: str | os.PathLike = ".",
        split_signature: Mapping[str, Any] | None = None,
    ) -> None:
        self.samples = [(str(i), str(m)) for i, m in samples]
        self.transform = transform if transform is not None else ToTensor()
        self.train, self.overlap = train, overlap
        self.scan_workers, self.progress = max(0, int(scan_workers or 0)), progress
        self.data_root = str(Path(data_root).resolve())
        self.split_signature = dict(split_signature or {})
        self.idxs_path = None if idxs_path is None else Path(idxs_path)

        if labels is None:
            self.labels, self.labels_old = None, None
            self.order = None
            self.indices = list(range(len(self.samples)))
        else:
            self.labels, self.labels_old = self._check_labels(labels, labels_old)
            self.order = [0, *self.labels_old, *self.labels]
            self.inverted_order = inverted_order(self.order)
            idxs = self._load_or_compute_indices()
            if holdout:
                # Reference behaviour (RN-25; ``VOCSegmentationIncremental.__init__``): a fixed RandomState(1)
                # shuffle, 80/20.
                self.indices = holdout_split(idxs, train)
            else:
                self.indices = [int(i) for i in idxs]
        self.lut = self.build_lut()
        self._lut = torch.from_numpy(self.lut)

    def _check_labels(
        self, labels: Sequence[int], labels_old: Sequence[int] | None
    ) -> tuple[list[int], list[int]]:
        if self.strip_zero:
            new, old = strip_background(labels), strip_background(labels_old)
        else:
            new, old = [int(x) for x in labels], [int(x) for x in (labels_old or [])]
        both = sorted(set(new) & set(old))
        if both:
            raise TaskError(
                f"Classes {both} are listed both as current and as previous classes of this step; a task "
                "step must only introduce new classes. Check the task definition in tasks.py."
            )
        return new, old

    def build_lut(self) -> np.ndarray:
        """The 256-entry ``uint8`` label mapping applied after the transform."""
        raise NotImplementedError

    def cache_signature(self) -> dict[str, Any]:
        """What the kept indices depend on (written to and compared with the sidecar)."""
        return {
            "format": CACHE_FORMAT,
            "dataset": type(self).__name__,
            "data_root": self.data_root,
            "split": self.split_signature,
            "num_samples": len(self.samples),
            "overlap": bool(self.overlap),
            "labels": self.labels,
            "labels_old": self.labels_old,
        }

    def _load_or_compute_indices(self) -> np.ndarray:
        if self.idxs_path is None:
            return self.compute_indices()
        cache = IndexCache(self.idxs_path, self.cache_signature())
        # Rank 0 fills the cache first; the other ranks then read the finished file instead of racing.
        with main_process_first():
            idxs, reason = cache.load(len(self.samples))
            if idxs is not None:
                logger.debug("Reusing kept indices %s (%d images).", cache.path, idxs.size)
                return idxs
            if is_main_process() and reason != "no cached index file":
                logger.info("Recomputing %s: %s.", cache.path, reason)
            idxs = self.compute_indices()
            if is_main_process():
                try:
                    cache.save(idxs)
                except OSError as exc:
                    logger.warning(
                        "Could not write the index cache %s (%s); continuing without it.", cache.path, exc
                    )
        return idxs

    def compute_indices(self) -> np.ndarray:
        """Filter the split from the values of every mask (reference ``dataset/utils.py``
        ``filter_images``)."""
        name = self.idxs_path.stem if self.idxs_path is not None else "split"
        presence, problem = scan_masks(
            self.samples,
            workers=self.scan_workers,
            progress=self.progress,
            desc=f"Filtering {type(self).__name__} {name}",
        )
        if problem is not None:
            what, path, detail = problem
            raise DatasetError(
                f"The {what} file {path} {detail}. Every entry of the split must have a readable RGB image "
                f"and an 8-bit single-channel mask of the same size with values 0..{self.num_classes - 1} or "
                f"255. {self.download_hint}"
            )
        invalid = presence[:, self.num_classes : IGNORE].any(axis=1)
        if invalid.any():
            i = int(np.flatnonzero(invalid)[0])
            values = np.flatnonzero(presence[i, self.num_classes : IGNORE]) + self.num_classes
            raise DatasetError(
                f"The mask {self.samples[i][1]} contains values {values.tolist()}, outside the "
                f"{self.num_classes} classes of this dataset (0..{self.num_classes - 1}, and 255 = ignore). "
                f"It is not a label mask of this dataset (colour-coded or from another dataset?). "
                f"{self.download_hint}"
            )
        idxs = select_indices(presence, self.labels, self.labels_old, self.overlap)
        if is_main_process():
            logger.info(
                "%s %s: kept %d of %d images.", type(self).__name__, name, idxs.size, len(self.samples)
            )
        return idxs

    def __len__(self) -> int:
        return len(self.indices)

    def load_pair(self, index: int) -> tuple[Image.Image, Image.Image]:
        """The raw (RGB image, label) of the full split's entry ``index``.

        Raises:
            DatasetError: a file is missing, damaged or of another size than its partner.
        """
        return load_image_and_label(*self.samples[index], hint=self.download_hint)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image (3, H, W), label uint8 (H, W))`` after the joint transform and the LUT.

        The image is ``uint8`` with the presets (normalised on the device later), float with ``ToTensor``.
        """
        image, label = self.transform(*self.load_pair(self.indices[index]))
        if isinstance(label, Image.Image):
            label = label_to_tensor(label)
        elif isinstance(label, np.ndarray):
            label = torch.from_numpy(label)
        return image, self._lut[label.long()]

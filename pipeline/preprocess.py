"""Real inputs for the MNIST model: image files of any size and mode, .npy arrays and IDX files, each turned into
28x28 float32 intensities in [0, 1], white digit on black, the way MNIST itself was made.

MNIST's recipe (LeCun et al.): the digit's bounding box is size-normalised to fit a 20x20 box keeping its aspect
ratio (anti-aliased, hence grey levels), then placed in a 28x28 field so that its centre of mass lands at the
centre. For a photo or a scan the steps before that are: grey, ink made bright (inverted when the background is
light, judged from the border), background level removed, contrast stretched, a small threshold to find the
digit's bounding box. PIL and numpy only.
"""

from __future__ import annotations

import gzip
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from struct import error as struct_error

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

SIZE = 28  # output field
BOX = 20  # the digit's longer side after size normalisation
CENTRE = 14.0  # MNIST's mean centre of mass (row, column) is (14.0, 14.0) in pixel-index coordinates
INK_THRESHOLD = 0.1  # fraction of the ink range that counts as ink when finding the bounding box
DEFAULT_MAX_PIXELS = 50_000_000  # larger images are refused before decoding (decompression bombs)
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049
NPY_MAGIC = b"\x93NUMPY"


class InputError(ValueError):
    """One input cannot be used; the message says what is wrong with it (the caller names the file)."""


@dataclass
class Sample:
    """One model input: where it came from (``source``, and ``index`` inside an array or IDX file) and its
    pixels, (28, 28) float32 in [0, 1], white digit on black."""

    source: str
    index: int | None
    pixels: np.ndarray

    @property
    def name(self) -> str:
        return self.source if self.index is None else f"{self.source}[{self.index}]"


# ----------------------------------------------------------------------------------------------- images


def open_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file (first frame of animations), refusing more than ``max_pixels`` pixels before any
    pixel data is decoded. Raises InputError for anything that is not a complete, readable image."""
    saved_limit, saved_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    image = None
    with warnings.catch_warnings():
        # PIL's own global limit is replaced by ours, checked on the header's size before any decoding.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = None
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a half-grey digit
        try:
            image = Image.open(path)
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InputError(f"empty image ({width}x{height} pixels)")
            if width * height > max_pixels:
                raise _bomb(width, height, max_pixels)
            image.seek(0)
            if image.size[0] * image.size[1] > max_pixels:  # the first frame of a multi-size file
                raise _bomb(*image.size, max_pixels)
            image.load()
            return image
        except InputError:
            if image is not None:
                image.close()
            raise
        except UnidentifiedImageError:
            raise InputError("not an image PIL can read, nor a .npy or IDX file") from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError, struct_error) as exc:
            kind = image.format if image is not None and image.format else "image"
            if image is not None:
                image.close()
            raise InputError(f"corrupt or truncated {kind} data ({exc})") from None
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved_limit, saved_truncated


def _bomb(width: int, height: int, max_pixels: int) -> InputError:
    return InputError(f"{width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
                      f"(decompression bomb?); raise --max-pixels if the image is genuine")


WORKING_SIDE = 1024  # large photos are reduced to this longer side before the (full-precision) digit search


def normalise_mode(image: Image.Image) -> Image.Image:
    """Any PIL mode -> one of L, RGB, RGBA (only when there is transparency) or F (16/32-bit grey, scaled to
    [0, 1]); EXIF orientation applied; reduced (anti-aliased) to at most WORKING_SIDE pixels per side."""
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
        if image.getextrema()[3][0] == 255:  # nothing is actually transparent
            image = image.convert("RGB")
    elif mode.startswith("I;16"):
        image = Image.fromarray(np.asarray(image, dtype=np.float32) / 65535.0)
    elif mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        image = Image.fromarray(np.nan_to_num(np.clip(scaled, 0.0, 1.0)).astype(np.float32))
    elif mode == "1":
        image = image.convert("L")
    elif mode not in ("L", "RGB"):
        image = image.convert("RGB")
    if max(image.size) > WORKING_SIDE:
        image = image.copy()
        image.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BOX)
    return image


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, as PIL's convert('L'), of float RGB in [0, 1]."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def to_grey(image: Image.Image) -> np.ndarray:
    """Grey levels in [0, 1] (float32, H x W) of an image in any PIL mode (see normalise_mode).

    With transparency, the image is composited on a background that contrasts with its visible pixels: dark ink
    on white, light ink on black. A digit drawn in one flat colour whose shape lives only in the alpha channel
    thus becomes its alpha (as ink), and a transparent background never decides the digit's colour.
    """
    image = normalise_mode(image)
    if image.mode == "F":
        return np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32)), 0.0, 1.0)
    if image.mode == "L":
        return np.asarray(image, dtype=np.float32) / 255.0
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    grey = _luminance(pixels[..., :3])
    if image.mode == "RGBA":
        alpha = pixels[..., 3]
        weight = float(alpha.sum())
        if weight <= 0:  # fully transparent: nothing visible
            return np.zeros_like(alpha)
        ink_level = float((grey * alpha).sum()) / weight
        background = 0.0 if ink_level > 0.5 else 1.0
        grey = grey * alpha + background * (1.0 - alpha)
    return np.clip(grey, 0.0, 1.0).astype(np.float32)


def _border(grey: np.ndarray) -> np.ndarray:
    """The outer ring of pixels, about 2% of the shorter side wide (at least one pixel)."""
    h, w = grey.shape
    k = max(1, min(h, w) // 50)
    if h <= 2 * k or w <= 2 * k:
        return grey.ravel()
    return np.concatenate([grey[:k].ravel(), grey[-k:].ravel(), grey[k:-k, :k].ravel(), grey[k:-k, -k:].ravel()])


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the level that best splits them into two classes."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def background_map(grey: np.ndarray, blocks: int = 8, percentile: float = 25.0) -> np.ndarray:
    """Smooth estimate of the background (paper and its uneven lighting) of a photo-sized grey image with bright
    ink: a low percentile of each of about ``blocks`` x ``blocks`` tiles, interpolated back to full size. Ink
    covers well under three quarters of a tile, so the percentile sees paper."""
    h, w = grey.shape
    tile = max(4, max(h, w) // blocks)
    rows, cols = max(1, h // tile), max(1, w // tile)
    trimmed = grey[: rows * tile, : cols * tile].reshape(rows, tile, cols, tile)
    medians = np.percentile(trimmed.transpose(0, 2, 1, 3).reshape(rows, cols, tile * tile), percentile, axis=2)
    smooth = Image.fromarray(medians.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(smooth, dtype=np.float32)


def ink_image(grey: np.ndarray) -> np.ndarray:
    """Ink intensity in [0, 1] with a zero background.

    Inverted when the border is lighter than the middle of the image's range (dark digit on light paper). On
    photo-sized images (64 px and more) a tile-percentile background map is subtracted first (uneven lighting). The
    background level is then estimated from the border robustly (median + 4 x the MAD-based standard deviation,
    so a digit touching the border does not count, but sensor noise does), capped at Otsu's threshold between
    paper and ink; what lies below falls to zero, the rest is stretched so that the strongest ink is 1."""
    grey = np.nan_to_num(np.asarray(grey, dtype=np.float32))
    low, high = float(grey.min()), float(grey.max())
    if high - low < 1e-6:
        return np.zeros_like(grey)
    grey = (grey - low) / (high - low)
    if float(np.median(_border(grey))) > 0.5:
        grey = 1.0 - grey
    if min(grey.shape) >= 64:
        grey = np.clip(grey - background_map(grey), 0.0, 1.0)
        if float(grey.max()) <= 1e-6:
            return np.zeros_like(grey)
        grey = grey / float(grey.max())
    border = _border(grey)
    centre = float(np.median(border))
    spread = 1.4826 * float(np.median(np.abs(border - centre)))  # robust std of the background
    floor = min(centre + 4.0 * spread, otsu_threshold(grey))
    peak = float(grey.max())
    if peak - floor < 1e-6:
        return np.zeros_like(grey)
    return np.clip((grey - floor) / (peak - floor), 0.0, 1.0).astype(np.float32)


def centre_of_mass(ink: np.ndarray) -> tuple[float, float]:
    total = float(ink.sum())
    if total <= 0:
        return (ink.shape[0] - 1) / 2, (ink.shape[1] - 1) / 2
    rows = float((ink.sum(axis=1) * np.arange(ink.shape[0])).sum()) / total
    cols = float((ink.sum(axis=0) * np.arange(ink.shape[1])).sum()) / total
    return rows, cols


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """Number of True pixels in each pixel's 3x3 neighbourhood (itself included)."""
    padded = np.pad(mask.astype(np.int16), 1)
    h, w = mask.shape
    return sum(padded[1 + dr:1 + dr + h, 1 + dc:1 + dc + w] for dr in (-1, 0, 1) for dc in (-1, 0, 1))


def mnist_format(ink: np.ndarray, threshold: float = INK_THRESHOLD) -> np.ndarray:
    """Ink (H, W, zero background) -> MNIST's format: the bounding box of the ink (pixels above ``threshold``
    of the peak) fitted into 20x20 keeping the aspect ratio (anti-aliased), placed in 28x28 with its centre of
    mass at MNIST's centre. (28, 28) float32 in [0, 1]; all zeros when there is no ink."""
    ink = np.asarray(ink, dtype=np.float32)
    out = np.zeros((SIZE, SIZE), np.float32)
    peak = float(ink.max()) if ink.size else 0.0
    if peak <= 0:
        return out
    mask = ink > threshold * peak
    if min(ink.shape) >= 100:
        # Photo-sized: specks do not count. Ink pixels with 3 or more ink pixels in their 3x3 are solid; the ink
        # within 2 pixels of solid ink is kept (stroke edges and tips), isolated specks are not.
        solid = _neighbours(mask) >= 3
        if solid.any():
            mask &= _neighbours(_neighbours(solid) > 0) > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    new_w, new_h = max(1, min(BOX, round(w * scale))), max(1, min(BOX, round(h * scale)))
    if (new_h, new_w) != (h, w):
        # LANCZOS on float data: anti-aliased when shrinking (MNIST's grey edges), smooth when enlarging.
        resized = Image.fromarray(crop).resize((new_w, new_h), Image.Resampling.LANCZOS)
        crop = np.clip(np.asarray(resized, dtype=np.float32), 0.0, None)
    top_peak = float(crop.max())
    if top_peak <= 0:
        return out
    crop = np.clip(crop / top_peak, 0.0, 1.0)  # strokes reach full intensity, as in MNIST
    com_r, com_c = centre_of_mass(crop)
    top = int(np.clip(round(CENTRE - com_r), 0, SIZE - new_h))
    left = int(np.clip(round(CENTRE - com_c), 0, SIZE - new_w))
    out[top:top + new_h, left:left + new_w] = crop
    return out


def preprocess_image(image: Image.Image | np.ndarray) -> np.ndarray:
    """A PIL image (any size and mode) or a grey array in [0, 1] -> (28, 28) float32 MNIST-style pixels."""
    grey = to_grey(image) if isinstance(image, Image.Image) else np.asarray(image, dtype=np.float32)
    if grey.ndim != 2 or grey.size == 0:
        raise InputError(f"expected a 2-D grey image, got shape {grey.shape}")
    return mnist_format(ink_image(grey))


# ------------------------------------------------------------------------------------- arrays and IDX


def as_model_pixels(array: np.ndarray) -> np.ndarray:
    """Arrays that already are MNIST digits: (28, 28), (N, 28, 28) or (N, 1, 28, 28), uint8 0-255 or float
    0-1 -> (N, 28, 28) float32 in [0, 1]. Raises InputError naming the problem."""
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (SIZE, SIZE):
        raise InputError(f"array of shape {array.shape}; expected (28, 28), (N, 28, 28) or (N, 1, 28, 28)")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError("array holds NaN or infinite values")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise InputError(f"float values from {array.min():.4g} to {array.max():.4g}; floats must be "
                             f"intensities in [0, 1] (or save uint8 0-255)")
        return array.astype(np.float32)
    raise InputError(f"dtype {array.dtype} is not supported; use uint8 (0-255) or float (0-1)")


def read_npy(path: str | os.PathLike) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise InputError(f"not a plain numeric .npy array ({exc})") from None
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read .npy ({exc})") from None
    return as_model_pixels(array)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX image file (magic 2051, unsigned bytes, optionally gzipped) -> (N, 28, 28) float32 in [0, 1]."""
    opener = gzip.open if _head(path, 2) == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read IDX data ({exc})") from None
    magic = int(np.frombuffer(raw[:4], dtype=">i4")[0]) if len(raw) >= 4 else -1
    if magic == IDX_LABELS_MAGIC:
        raise InputError("an IDX label file (magic 2049), not images (magic 2051)")
    if magic != IDX_IMAGES_MAGIC:
        raise InputError(f"IDX magic {magic}, expected {IDX_IMAGES_MAGIC} (unsigned-byte images)")
    if len(raw) < 16:
        raise InputError(f"IDX file too short ({len(raw)} bytes) for its header")
    n, rows, cols = (int(v) for v in np.frombuffer(raw[4:16], dtype=">i4"))
    if (rows, cols) != (SIZE, SIZE):
        raise InputError(f"IDX images of {rows}x{cols}; the model takes 28x28")
    expected = 16 + n * rows * cols
    if n < 0 or len(raw) != expected:
        raise InputError(f"IDX header says {n} images ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols).astype(np.float32) / 255.0


def _head(path: str | os.PathLike, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _is_idx(head: bytes) -> bool:
    return len(head) >= 4 and head[:2] == b"\x00\x00" and head[2] == 0x08 and head[3] in (1, 2, 3)


def load_samples(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Sample]:
    """The model inputs in one file, recognised by content (not by name): an image (one sample, MNIST-style
    preprocessing), a .npy array or an IDX image file (one sample per row, taken as they are). Raises
    InputError saying what is wrong; the caller adds the file name."""
    path = Path(path)
    if path.is_dir():
        raise InputError("is a directory")
    try:
        head = _head(path, 8)
    except FileNotFoundError:
        raise InputError("no such file") from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}") from None
    if not head:
        raise InputError("empty file (0 bytes)")
    source = str(path)
    if head.startswith(NPY_MAGIC):
        return [Sample(source, i, row) for i, row in enumerate(read_npy(path))]
    if _is_idx(head) or (head[:2] == b"\x1f\x8b" and _is_idx(_gunzip_head(path))):
        return [Sample(source, i, row) for i, row in enumerate(read_idx(path))]
    if path.suffix.lower() == ".npy":
        raise InputError("named .npy but has no NumPy header")
    with open_image(path, max_pixels) as image:
        pixels = preprocess_image(image)
    if not pixels.any():
        raise InputError("no digit found: the image is blank (one uniform colour)")
    return [Sample(source, None, pixels)]


def _gunzip_head(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read(4)
    except (OSError, EOFError):
        return b""


def expand_inputs(inputs: list[str]) -> Iterator[str]:
    """Input arguments as files: a directory stands for its regular, non-hidden files in name order."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from (str(p) for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith("."))
        else:
            yield item

"""Reading images the way a user sees them.

Every stage goes through here, so EXIF rotation, palette/grayscale/CMYK/16-bit/alpha images and
broken files are handled once: pixels come out as 8-bit RGB in display orientation, and a file
that cannot be decoded is an ``InputError`` naming it.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Pillow's default guard (about 179 megapixels) is the right order: a bigger "photo" is far more
# likely a decompression bomb than a real training image. Keep the guard, but as an error.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def open_rgb(path: Path) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB image in display orientation."""
    return _decode(Path(path), keep_bytes=False)[0]


def open_rgb_checked(path: Path) -> tuple[Image.Image, str]:
    """``open_rgb``, and the SHA-256 of the bytes it decoded.

    A later stage that finds the same digest for the file knows it decodes without decoding it
    again (``encode_for_record``): the digest is of exactly the bytes that were decoded.
    """
    image, data = _decode(Path(path), keep_bytes=True)
    return image, hashlib.sha256(data).hexdigest()


def _decode(path: Path, keep_bytes: bool) -> tuple[Image.Image, bytes]:
    """The decoded image, with one-line errors naming ``path``, and the bytes read when kept."""
    try:
        if keep_bytes:
            data = path.read_bytes()
            size, source = len(data), io.BytesIO(data)
        else:
            data, size, source = b"", path.stat().st_size, path
        if size == 0:
            raise InputError(f"{path}: empty file (0 bytes); replace it or remove it from the annotations")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise InputError(
                        f"{path}: {img.width}x{img.height} pixels is over the {MAX_PIXELS} pixel "
                        "limit (possible decompression bomb); resize the image"
                    )
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img), data
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: image not found; check the path in the annotations") from None
    except UnidentifiedImageError:
        raise InputError(
            f"{path}: not an image Pillow can read; supported: {', '.join(IMAGE_EXTENSIONS)}"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path}: cannot decode image ({exc}); re-export or remove it") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale to 8 bits rather than clip (Pillow's convert clips at 255).
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        return Image.fromarray((arr * (255.0 / top)).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def display_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as displayed, read from the header alone; None if it cannot be read.

    Formats that give boxes as fractions of the image (YOLO) need the size before the split
    decodes the image; an unreadable file is left for the split to report.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated a quarter turn
                width, height = height, width
            return width, height
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        return None


def load_rgb(path: Path) -> np.ndarray:
    """``open_rgb`` as an HxWx3 uint8 array."""
    return np.asarray(open_rgb(path))


def encode_for_record(path: Path, sha256: str | None = None) -> tuple[bytes, str, int, int]:
    """(bytes, format, width, height) for a TFRecord.

    An 8-bit RGB JPEG or PNG with no EXIF rotation is stored byte for byte (no quality loss, no
    work); anything else is decoded through ``open_rgb`` and re-encoded, so every record decodes
    to what the user sees, in any TFRecord reader. A stored file is decoded once to check it,
    unless its bytes have the ``sha256`` of bytes an earlier stage decoded (``open_rgb_checked``)
    or wrote itself.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        with Image.open(io.BytesIO(raw)) as img:
            fmt = (img.format or "").lower()
            upright = img.getexif().get(0x0112, 1) == 1
            if upright and img.mode == "RGB" and fmt in ("jpeg", "png"):
                if sha256 is None or hashlib.sha256(raw).hexdigest() != sha256:
                    img.load()  # so a truncated file fails here, not in training
                return raw, fmt, img.width, img.height
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        pass  # open_rgb below raises the user-facing error
    rgb = open_rgb(path)
    return encode_jpeg(rgb), "jpeg", rgb.width, rgb.height


def encode_jpeg(img: Image.Image | np.ndarray, quality: int = 95) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()

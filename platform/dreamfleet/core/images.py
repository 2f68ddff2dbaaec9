"""Reading subject photos: every accepted image comes out as an 8-bit RGB PIL image.

Used by the trainers (a folder of 3-5 photos) and by the manifest builder (thousands of
them). Photos are normalised, not rejected, where a conversion is well defined: EXIF
rotation is applied; RGBA, CMYK, greyscale, palette and 16-bit images become 8-bit RGB;
an animated GIF gives its first frame. What cannot be used (a zero-byte file, a text file
named ``.jpg``, a truncated JPEG, a decompression bomb, a tiny image) raises a
:class:`DataError` that names the file and says what to do.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dreamfleet.core.errors import DataError

log = logging.getLogger("dreamfleet")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MASK_SUFFIX = ".mask.png"  # NN.mask.png beside NN.jpg: the subject's mask of that photo (white = subject)
RECOMMENDED_MIN_IMAGES = 3


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent areas become white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit or float greyscale: PIL's own convert clips instead of scaling.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "F" and arr.max(initial=0) > 255 else max(arr.max(initial=0), 255.0)
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, *, name: str, min_side: int = 0) -> Image.Image:
    """Decode and normalise one image from bytes; ``name`` is used in error messages."""
    if len(data) == 0:
        raise DataError(f"{name}: the file is empty (0 bytes); remove it or replace it with the photo")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            n_frames = getattr(img, "n_frames", 1)
            if n_frames > 1:
                img.seek(0)
                log.warning("%s: animated image with %d frames; using the first frame", name, n_frames)
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DataError(
                f"{name}: refused as a possible decompression bomb ({e}); downscale the image "
                f"below {Image.MAX_IMAGE_PIXELS} pixels"
            ) from None
        except UnidentifiedImageError:
            raise DataError(
                f"{name}: not a readable image (the content is not JPEG/PNG/WebP/...); "
                "remove it or replace it with the photo"
            ) from None
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(
                f"{name}: not a readable image ({e}; the file may be truncated or corrupt); "
                "re-export or re-download it"
            ) from None
    img = ImageOps.exif_transpose(img) or img
    img = _to_rgb(img)
    if min_side and min(img.size) < min_side:
        raise DataError(
            f"{name}: image is {img.width}x{img.height} px, below the minimum side of {min_side} px; "
            "use a larger photo"
        )
    return img


def open_image(path: str | Path, *, min_side: int = 0) -> Image.Image:
    """Read and normalise one image file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    return decode_image(data, name=str(path), min_side=min_side)


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, by extension, in name order (hidden files skipped)."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: folder does not exist; pass the folder that holds the subject's photos")
    if not folder.is_dir():
        raise DataError(f"{folder}: is a file, not a folder; pass the folder that holds the subject's photos")
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        and not p.name.lower().endswith(MASK_SUFFIX)
    )


def mask_path(photo: Path) -> Path:
    """Where a photo's mask lives: ``NN.mask.png`` beside ``NN.jpg``."""
    return photo.with_name(photo.stem + MASK_SUFFIX)


def fit_mask(mask: Image.Image, photo_size: tuple[int, int], *, name: str) -> Image.Image:
    """A subject mask as 8-bit grey (255 = subject; an alpha channel is the mask when there is
    one) at its photo's size: the photo as shown (upright), or a scaled copy of it."""
    grey = mask.getchannel("A") if mask.mode in ("RGBA", "LA") else mask.convert("L")
    if grey.size == photo_size:
        return grey
    (w, h), (pw, ph) = grey.size, photo_size
    if abs(w * ph - h * pw) > max(w, h, pw, ph):  # another aspect ratio: not drawn on this photo
        raise DataError(f"{name}: the mask is {w}x{h} px and its photo {pw}x{ph} px; draw the mask on the photo as "
                        "it is shown (upright), at its size or scaled")
    return grey.resize(photo_size, Image.Resampling.BILINEAR)


def open_mask(path: Path, photo_size: tuple[int, int]) -> Image.Image:
    """Read the mask file of a photo of ``photo_size`` (see :func:`fit_mask`)."""
    try:
        with Image.open(path) as m:
            m.load()
            return fit_mask(m, photo_size, name=str(path))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable mask ({e}); re-export it as an 8-bit PNG") from None


@dataclass(frozen=True)
class SubjectImage:
    path: Path
    image: Image.Image
    mask: Image.Image | None = None  # from NN.mask.png beside the photo, when there is one


def load_subject_images(
    folder: str | Path, *, min_images: int = 1, min_side: int = 0, skip_bad: bool = False
) -> list[SubjectImage]:
    """Load every photo of one subject, reporting all bad files at once.

    Raises :class:`DataError` when the folder holds no image, when any image is bad (unless
    ``skip_bad``: then bad images are skipped with a warning), or when fewer than
    ``min_images`` usable images remain. Warns below 3 images, the paper's minimum.
    """
    folder = Path(folder)
    files = list_image_files(folder)
    if not files:
        others = [p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")][:5]
        hint = f" (found only: {', '.join(others)})" if others else ""
        raise DataError(
            f"{folder}: no images found{hint}; put 3-5 photos of the subject there "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    good: list[SubjectImage] = []
    problems: list[str] = []
    for path in files:
        try:
            img = open_image(path, min_side=min_side)
            mask = open_mask(mask_path(path), img.size) if mask_path(path).is_file() else None
            good.append(SubjectImage(path, img, mask))
        except DataError as e:
            problems.append(str(e))
    if problems and not skip_bad:
        raise DataError(
            f"{folder}: {len(problems)} of {len(files)} images cannot be used:\n  - "
            + "\n  - ".join(problems)
            + "\nFix or remove them (or pass --skip-bad-images to train on the rest)."
        )
    for p in problems:
        log.warning("skipping %s", p)
    if len(good) < max(min_images, 1):
        raise DataError(
            f"{folder}: only {len(good)} usable image(s), at least {max(min_images, 1)} needed; add more photos"
        )
    if len(good) < RECOMMENDED_MIN_IMAGES:
        log.warning(
            "%s: only %d image(s); DreamBooth expects 3-5 photos of the subject, so identity may not be learned",
            folder, len(good),
        )
    return good


def image_grid(images: list[Image.Image], rows: int, cols: int, *, pad: int = 2) -> Image.Image:
    """Tile equally sized images row by row on a white background."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), "white")
    for i, img in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        grid.paste(img.convert("RGB").resize((w, h)), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid

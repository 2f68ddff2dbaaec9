"""Bad and unusual subject photos: converted where well defined, clear errors otherwise."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from helpers import picture, subject_folder
from PIL import Image

from dreamfleet.core.errors import DataError
from dreamfleet.core.images import decode_image, load_subject_images, open_image


def test_empty_folder_names_folder_and_what_to_do(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError) as e:
        load_subject_images(tmp_path)
    assert str(tmp_path) in str(e.value) and "no images" in str(e.value) and "3-5 photos" in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_subject_images(tmp_path / "nope")


def test_one_image_warns_below_three(tmp_path, caplog):
    folder = subject_folder(tmp_path, n=1)
    with caplog.at_level(logging.WARNING, logger="dreamfleet"):
        images = load_subject_images(folder)
    assert len(images) == 1
    assert "only 1 image" in caplog.text and "3-5" in caplog.text


def test_unreadable_and_truncated_are_all_reported(tmp_path):
    folder = subject_folder(tmp_path, n=3)
    (folder / "text.jpg").write_text("this is not a photo")
    (folder / "empty.png").write_bytes(b"")
    data = (folder / "00.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        load_subject_images(folder)
    msg = str(e.value)
    assert "3 of 6 images cannot be used" in msg
    assert "text.jpg: not a readable image" in msg
    assert "empty.png: the file is empty" in msg
    assert "truncated.jpg" in msg and "truncated" in msg.split("truncated.jpg")[1]
    # skip_bad trains on the rest
    assert len(load_subject_images(folder, skip_bad=True)) == 3


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "L", "LA", "P", "1"])
def test_modes_are_converted_to_rgb(tmp_path, mode):
    img = picture(1).convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    out = open_image(path)
    assert out.mode == "RGB" and out.size == img.size


def test_rgba_transparency_becomes_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    img.save(tmp_path / "t.png")
    assert open_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    arr = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    out = np.asarray(open_image(tmp_path / "g16.png"))
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255 and 100 < out[32, 32, 0] < 160


def test_exif_rotation_is_applied(tmp_path):
    img = picture(2, size=(60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert open_image(tmp_path / "r.jpg").size == (30, 60)


def test_animated_gif_takes_first_frame(tmp_path, caplog):
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING, logger="dreamfleet"):
        out = open_image(tmp_path / "a.gif")
    assert out.getpixel((0, 0))[0] > 200 and "first frame" in caplog.text


def test_decompression_bomb_is_refused(monkeypatch):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (200, 200)).save(buf, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="decompression bomb"):
        decode_image(buf.getvalue(), name="bomb.png")


def test_min_side(tmp_path):
    picture(3, size=(40, 40)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match=r"small\.png: image is 40x40 px, below the minimum side of 64"):
        open_image(tmp_path / "small.png", min_side=64)

"""read_image on real files of every awkward kind, crop_face and check_box."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from painwatch.data import ImageReadError, centre_square, check_box, crop_face, eval_transform, read_image


def _pattern(height: int = 30, width: int = 40) -> np.ndarray:
    """An RGB test card whose orientation is recognisable: red top-left, blue bottom-right."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)
    image[height // 2 :, width // 2 :] = (0, 0, 255)
    image[: height // 2, width // 2 :] = (0, 255, 0)
    return image


def test_rgb_png_round_trip_from_path_bytes_and_file_object(tmp_path: Path) -> None:
    card = _pattern()
    path = tmp_path / "card.png"
    Image.fromarray(card).save(path)
    for source in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        image = read_image(source)
        assert image.dtype == np.uint8 and image.shape == (30, 40, 3) and image.flags.c_contiguous
        np.testing.assert_array_equal(image, card)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    card = _pattern()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored pixels are the card turned 90 degrees CCW
    stored = np.rot90(card, k=1)  # CCW
    path = tmp_path / "rotated.jpg"
    Image.fromarray(np.ascontiguousarray(stored)).save(path, quality=100, exif=exif)
    image = read_image(path)
    assert image.shape == card.shape
    # JPEG is lossy: compare the quadrant colours.
    assert np.abs(image.astype(int) - card.astype(int)).mean() < 8
    without_exif = np.asarray(Image.open(path).convert("RGB"))
    assert without_exif.shape == (40, 30, 3)


def test_greyscale_and_bilevel_become_three_equal_channels(tmp_path: Path) -> None:
    grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1))
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    image = read_image(tmp_path / "grey.png")
    assert image.shape == (5, 25, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], grey)
    Image.fromarray(grey > 100).convert("1").save(tmp_path / "bilevel.png")
    bilevel = read_image(tmp_path / "bilevel.png")
    assert set(np.unique(bilevel)) <= {0, 255}


def test_sixteen_bit_png_is_scaled_to_eight_bit(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), values)
    assert Image.open(path).mode.startswith("I")
    image = read_image(path)
    np.testing.assert_array_equal(image[0, :, 0], [0, 1, 128, 255])
    sixteen_rgb = np.zeros((4, 4, 3), np.uint16)
    sixteen_rgb[..., 2] = 65535  # BGR in OpenCV: red
    cv2.imwrite(str(tmp_path / "deep_rgb.png"), sixteen_rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "deep_rgb.png")[0, 0], [255, 0, 0])


def test_sixteen_bit_tiff(tmp_path: Path) -> None:
    values = np.full((3, 3), 65535 // 2, dtype=np.uint16)
    path = tmp_path / "deep.tif"
    Image.fromarray(values).save(path)
    assert read_image(path)[0, 0, 0] == 127


def test_float_tiff_in_unit_range_and_nan(tmp_path: Path) -> None:
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "unit.tif")[0, :, 1], [0, 128, 255])
    Image.fromarray(np.array([[0.0, 100.0, 300.0]], np.float32), mode="F").save(tmp_path / "byte.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "byte.tif")[0, :, 0], [0, 100, 255])
    Image.fromarray(np.array([[np.nan, 0.2]], np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match=r"nan\.tif: .*NaN"):
        read_image(tmp_path / "nan.tif")


def test_cmyk_jpeg(tmp_path: Path) -> None:
    card = _pattern()
    path = tmp_path / "print.jpg"
    Image.fromarray(card).convert("CMYK").save(path, quality=100)
    assert Image.open(path).mode == "CMYK"
    image = read_image(path)
    assert image.shape == card.shape
    assert np.abs(image.astype(int) - card.astype(int)).mean() < 10


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent black: must come out white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black: mid grey
    rgba[1, 1] = (0, 0, 255, 255)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    image = read_image(tmp_path / "alpha.png")
    np.testing.assert_array_equal(image[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(image[0, 1], [255, 255, 255])
    assert 120 <= image[1, 0, 0] <= 130
    grey_alpha = Image.fromarray(rgba[..., 3], mode="L").convert("LA")
    grey_alpha.putalpha(Image.fromarray(rgba[..., 3]))
    grey_alpha.save(tmp_path / "la.png")
    assert read_image(tmp_path / "la.png")[0, 1].tolist() == [255, 255, 255]


def test_palette_with_transparency(tmp_path: Path) -> None:
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.putpixel((2, 0), 1)
    palette.info["transparency"] = 1
    palette.save(tmp_path / "palette.png", transparency=1)
    image = read_image(tmp_path / "palette.png")
    np.testing.assert_array_equal(image[0], [[255, 0, 0], [255, 255, 255], [255, 255, 255]])


def test_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.jpg: file is empty"):
        read_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    with pytest.raises(ImageReadError, match=r"notes\.png: not an image"):
        read_image(text)
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageReadError, match=r"cut\.jpg: .*truncated"):
        read_image(cut)
    with pytest.raises(ImageReadError, match=r"missing\.png: file does not exist"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="is a folder"):
        read_image(tmp_path)
    with pytest.raises(ImageReadError, match=r"upload\.jpg: not an image"):
        read_image(b"GIF89a-but-not-really", name="upload.jpg")
    with pytest.raises(TypeError):
        read_image(12)  # type: ignore[arg-type]


def test_pixel_limit_refuses_decompression_bombs(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("L", (400, 300)).save(path)
    assert read_image(path, max_pixels=120_000).shape == (300, 400, 3)
    with pytest.raises(ImageReadError, match=r"wide\.png: image is 400x300 = 120000 pixels, above the limit"):
        read_image(path, max_pixels=119_999)
    with pytest.raises(ValueError, match="max_pixels"):
        read_image(path, max_pixels=0)


def test_check_box() -> None:
    assert check_box(("1", 2.0, 10, 20)) == (1, 2, 10, 20)
    assert check_box([0, 0, 40, 30], (30, 40, 3)) == (0, 0, 40, 30)
    with pytest.raises(ValueError, match="outside the 40x30 image"):
        check_box([0, 0, 41, 30], (30, 40, 3))
    with pytest.raises(ValueError, match="empty"):
        check_box([5, 5, 5, 9])
    with pytest.raises(ValueError, match=r"x1='a' is not a number"):
        check_box([0, 0, "a", 9])
    with pytest.raises(ValueError, match="whole number"):
        check_box([0, 0, 1.5, 9])
    with pytest.raises(ValueError, match="4 coordinates"):
        check_box([0, 0, 1])


def test_crop_face_margin_and_clamping() -> None:
    image = np.arange(100 * 200 * 3, dtype=np.uint8).reshape(100, 200, 3)
    crop = crop_face(image, (50, 20, 150, 70), margin=0.1)  # 100 x 50 box, +10 px / +5 px each side
    np.testing.assert_array_equal(crop, image[15:75, 40:160])
    assert crop_face(image, (50, 20, 150, 70), margin=0).shape == (50, 100, 3)
    clamped = crop_face(image, (0, 0, 200, 100), margin=0.5)
    np.testing.assert_array_equal(clamped, image)
    edge = crop_face(image, (190, 90, 240, 130), margin=0)  # partly outside: clamped, not padded
    assert edge.shape == (10, 10, 3)
    with pytest.raises(ValueError, match="does not overlap"):
        crop_face(image, (300, 10, 320, 30))
    with pytest.raises(ValueError, match="margin"):
        crop_face(image, (0, 0, 10, 10), margin=-0.1)


def test_probe_image_agrees_with_read_image(tmp_path: Path) -> None:
    from painwatch.data import probe_image

    exif = Image.Exif()
    exif[0x0112] = 6
    photo = np.random.default_rng(1).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "rotated.jpg", exif=exif, quality=90)
    Image.fromarray(photo).save(tmp_path / "plain.jpg", quality=90)
    Image.fromarray(photo).save(tmp_path / "plain.png")
    for name in ("rotated.jpg", "plain.jpg", "plain.png"):
        assert probe_image(tmp_path / name) == read_image(tmp_path / name).shape[:2]
    assert probe_image(tmp_path / "rotated.jpg") == (200, 120)
    # Reduced-scale JPEG decoding still reads the whole stream: truncation is caught.
    data = (tmp_path / "plain.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError, match=r"cut\.jpg: .*truncated"):
        probe_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageReadError, match=r"cut\.jpg: .*truncated"):
        read_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageReadError, match="above the limit"):
        probe_image(tmp_path / "plain.png", max_pixels=100)


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (120, 480, (0, 180, 120)),  # landscape
        (480, 120, (180, 0, 120)),  # portrait
        (64, 64, (0, 0, 64)),  # square: the whole frame
        (41, 100, (0, 29, 41)),  # odd leftover: the extra pixel goes right
        (100, 41, (29, 0, 41)),  # and to the bottom
        (1, 2, (0, 0, 1)),
    ],
)
def test_centre_square(height: int, width: int, expected: tuple[int, int, int]) -> None:
    top, left, side = centre_square(height, width)
    assert (top, left, side) == expected
    assert side == min(height, width) and 0 <= top <= height - side and 0 <= left <= width - side
    assert height - side - 2 * top in (0, 1) and width - side - 2 * left in (0, 1)


@pytest.mark.parametrize("shape", [(40, 71), (71, 40), (40, 40)])
def test_centre_square_is_what_the_eval_transform_keeps(shape: tuple[int, int]) -> None:
    # At size = the shorter side nothing is resized, so the transform's output is exactly the square.
    image = np.random.default_rng(0).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    top, left, side = centre_square(*shape)
    kept = eval_transform(side)(image)
    expected = image[top : top + side, left : left + side].transpose(2, 0, 1) / 255.0
    assert np.allclose(kept.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize(("height", "width", "bad"), [(0, 5, "height"), (5, -1, "width"), (2.5, 4, "height")])
def test_centre_square_names_a_bad_size(height, width, bad: str) -> None:
    with pytest.raises(ValueError, match=f"{bad} must be a whole number of pixels >= 1"):
        centre_square(height, width)


"""The one image loader: the picture the model receives is the one a viewer shows (orientation, bit depth,
transparency), for a file or embedded bytes, and its header gives the size it is loaded at."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers import AutoProcessor
from transformers.image_transforms import convert_to_rgb

from vlsi.data import read_dataset
from vlsi.data.encode import encode
from vlsi.data.images import UnusableImage, image_header, image_identity, load_image
from vlsi.toy import write_toy


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


def _portrait() -> Image.Image:
    """A 20 x 40 (w x h) picture whose top half is red and bottom half blue: orientation is visible."""
    pixels = np.zeros((40, 20, 3), np.uint8)
    pixels[:20, :, 0] = 255
    pixels[20:, :, 2] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_a_viewer_shows_it(tmp_path, orientation):
    # Stored as a camera stores it: the pixels turned by the inverse of the tag, the tag saying how to turn them back.
    shown = _portrait()
    inverse = {2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}
    stored = shown if orientation == 1 else ImageOps.exif_transpose(_tagged(shown, inverse[orientation]))
    path = tmp_path / "photo.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif)
    viewer = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert viewer.size == shown.size == (20, 40)
    assert np.array_equal(_pixels(load_image(path)), _pixels(shown))
    assert image_header(path) == (20, 40)
    jpeg = tmp_path / "photo.jpg"
    stored.save(jpeg, exif=exif, quality=95)
    assert image_header(jpeg) == (20, 40)
    assert load_image(jpeg).size == (20, 40)
    assert np.abs(_pixels(load_image(jpeg)) - _pixels(shown)).mean() < 8


def _tagged(image: Image.Image, orientation: int) -> Image.Image:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))  # [8, 64]
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    loaded = _pixels(load_image(tmp_path / "g16.png"))[..., 0]
    assert np.array_equal(loaded, np.round(gradient / 257).astype(np.int64))
    assert (loaded > 250).mean() < 0.05  # a plain conversion clips it almost all white

    unit = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (8, 1))
    Image.fromarray(unit, mode="F").save(tmp_path / "f.tiff")
    loaded = _pixels(load_image(tmp_path / "f.tiff"))[..., 0]
    assert np.array_equal(loaded, np.round(unit.astype(np.float64) * 255).astype(np.int64))
    assert loaded.max() == 255  # a plain conversion gives 0 and 1: all black

    eight_in_32 = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.int32), (8, 1)), mode="I")
    eight_in_32.save(tmp_path / "i32.tiff")
    assert Image.open(tmp_path / "i32.tiff").mode == "I"
    assert np.array_equal(_pixels(load_image(tmp_path / "i32.tiff"))[..., 0], _pixels(eight_in_32))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_onto_white_as_the_processors_do(mode):
    pixels = np.zeros((16, 16, 4), np.uint8)
    pixels[..., 0] = 200
    pixels[:, 8:, 3] = 255  # left half fully transparent (its stored colour is dark red)
    image = Image.fromarray(pixels, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.convert("P")
        image.info["transparency"] = image.getpixel((0, 0))
    source = _png(image)
    loaded = load_image(source)
    expected = convert_to_rgb(Image.open(io.BytesIO(source)), return_numpy=True)
    assert np.array_equal(_pixels(loaded), expected.astype(np.int64))
    assert (_pixels(loaded)[:, :8] == 255).all()


def test_images_of_several_frames_are_refused_by_the_loader_and_the_check(tmp_path):
    frames = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(UnusableImage, match="3 frames"):
        load_image(tmp_path / "anim.gif")
    with pytest.raises(UnusableImage):
        image_header(tmp_path / "anim.gif")
    record = {
        "id": "gif",
        "image": "anim.gif",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}],
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(Exception, match=r"record gif \(line 1\): image 'anim.gif': 3 frames"):
        read_dataset(tmp_path / "d.jsonl")


def test_embedded_images_load_like_files_and_reach_the_model(tmp_path, qwen2vl_processor):
    image = _portrait()
    image.save(tmp_path / "p.png")
    uri = "data:image/png;base64," + base64.b64encode((tmp_path / "p.png").read_bytes()).decode()
    records = [
        {"id": "file", "messages": [_user({"type": "image", "image": "p.png"}), _answer()]},
        {"id": "uri", "messages": [_user({"type": "image", "image": uri}), _answer()]},
        {"id": "url", "messages": [_user({"type": "image_url", "image_url": {"url": uri}}), _answer()]},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    samples, _ = read_dataset(tmp_path / "d.jsonl")
    assert [type(s.images[0]).__name__ for s in samples] == ["PosixPath", "bytes", "bytes"]
    assert [s.sizes for s in samples] == [[(20, 40)]] * 3
    encoded = [encode(s, qwen2vl_processor) for s in samples]
    for item in encoded[1:]:
        assert torch_equal(item["pixel_values"], encoded[0]["pixel_values"])
        assert item["input_ids"].tolist() == encoded[0]["input_ids"].tolist()
    assert image_identity(samples[1].images[0]) == image_identity(samples[2].images[0])


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def _user(item: dict) -> dict:
    return {"role": "user", "content": [item, {"type": "text", "text": "Which colour is on top?"}]}


def _answer() -> dict:
    return {"role": "assistant", "content": "red"}


@pytest.fixture(scope="module")
def qwen2vl_processor(tmp_path_factory):
    _, student, _ = write_toy(tmp_path_factory.mktemp("toy"), 2)
    return AutoProcessor.from_pretrained(student)

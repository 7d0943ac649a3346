"""ADM center crop against a direct PIL implementation of the released algorithm, on real photos."""
import io

import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_sample_images

from dit_jax import preprocessing


def _reference_center_crop(pil_image: Image.Image, image_size: int) -> np.ndarray:
  """Written from the release's description: box-halve while short side >= 2x, bicubic, numpy crop."""
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def _photos() -> list[np.ndarray]:
  """Real photos (427x640) and crops of them with other sizes and aspect ratios (odd sides included)."""
  china, flower = load_sample_images().images
  return [
      china,                      # 427 x 640, landscape
      flower[:, 101:400],         # 427 x 299, portrait
      china[10:311, 50:351],      # 301 x 301, square
      flower[:97, :411],          # 97 x 411, very wide and small
      china[:255, :129],          # 255 x 129, tall
  ]


@pytest.mark.parametrize("size", [32, 64, 100, 256])
def test_center_crop_matches_reference(size):
  for photo in _photos():
    image = Image.fromarray(photo)
    want = _reference_center_crop(image, size)
    got = np.asarray(preprocessing.center_crop(image, size))
    assert got.shape == want.shape == (size, size, 3)
    np.testing.assert_array_equal(got, want, err_msg=f"photo {photo.shape} size {size}")


def test_halving_path_differs_from_plain_bicubic():
  # Guards against a reference and an implementation that both forgot the box-halving stage.
  image = Image.fromarray(load_sample_images().images[0])
  plain = np.asarray(image.resize((96, 64), resample=Image.BICUBIC))[:, 16:80].astype(int)
  assert np.abs(np.asarray(preprocessing.center_crop(image, 64)).astype(int) - plain).max() > 10


def test_preprocess_decodes_and_scales(tmp_path):
  photo = _photos()[1]
  buf = io.BytesIO()
  Image.fromarray(photo).save(buf, format="PNG")  # lossless, so decoding is exact
  path = tmp_path / "photo.png"
  path.write_bytes(buf.getvalue())
  want = _reference_center_crop(Image.fromarray(photo), 64).astype(np.float32) / 255.0
  want = (want - 0.5) / 0.5  # ToTensor + Normalize(0.5, 0.5)
  for source in (buf.getvalue(), str(path), Image.fromarray(photo)):
    x = preprocessing.preprocess(source, 64)
    assert x.dtype == np.float32 and x.shape == (64, 64, 3)
    np.testing.assert_allclose(x, want, atol=1e-6)
  assert x.min() >= -1.0 and x.max() <= 1.0


def test_grayscale_becomes_rgb():
  gray = Image.fromarray(_photos()[2][..., 0])
  x = preprocessing.preprocess(gray, 32)
  assert x.shape == (32, 32, 3)
  np.testing.assert_array_equal(x[..., 0], x[..., 2])


def test_corrupt_data_raises(tmp_path):
  buf = io.BytesIO()
  Image.fromarray(_photos()[0]).save(buf, format="JPEG")
  with pytest.raises(OSError):
    preprocessing.preprocess(buf.getvalue()[: len(buf.getvalue()) // 2], 32)
  with pytest.raises(OSError):
    preprocessing.preprocess(b"not an image", 32)
  with pytest.raises(ValueError, match="size"):
    preprocessing.center_crop(Image.fromarray(_photos()[0]), 0)

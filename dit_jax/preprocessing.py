"""Image preprocessing of the released DiT/ADM code: the ADM center crop, scaled to [-1, 1].

The released training script (PyTorch ImageFolder + PIL) does, for every image:
  1. decode with PIL and convert to RGB;
  2. while the short side is at least twice the target, halve both sides (integer division) with a
     BOX filter; this anti-aliases large downscales the way a plain bicubic resize would not;
  3. bicubic resize so that the short side equals the target (long side rounded to nearest);
  4. center crop to target x target (offsets rounded down);
  5. map uint8 [0, 255] to float [-1, 1] (x / 127.5 - 1, i.e. ToTensor then Normalize(0.5, 0.5)).
Random horizontal flips happen at training time; `prepare_latents` stores both orientations.

PIL is used on purpose: its BOX and BICUBIC filters are what the released latents were made with.
"""
import io
from typing import BinaryIO

import numpy as np
from PIL import Image


def open_rgb(source: str | bytes | BinaryIO | Image.Image) -> Image.Image:
  """Decodes a file path, encoded bytes, file object or PIL image into an RGB PIL image.

  Raises OSError (PIL's UnidentifiedImageError or a truncated-file error) for unreadable data.
  """
  if isinstance(source, Image.Image):
    image = source
  else:
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()  # decode now, so corrupt data fails here and not later
  return image.convert("RGB")


def center_crop(image: Image.Image, size: int) -> Image.Image:
  """ADM center crop of a PIL image to size x size (steps 2-4 above)."""
  if size <= 0:
    raise ValueError(f"center_crop: size must be positive, got {size}")
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
  w, h = image.size
  left, top = (w - size) // 2, (h - size) // 2
  return image.crop((left, top, left + size, top + size))


def to_float(image: Image.Image | np.ndarray) -> np.ndarray:
  """uint8 RGB image -> float32 [H, W, 3] in [-1, 1]."""
  return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


def preprocess(source: str | bytes | BinaryIO | Image.Image, size: int) -> np.ndarray:
  """Decode, ADM center crop and scale: returns float32 [size, size, 3] in [-1, 1] (HWC, RGB)."""
  return to_float(center_crop(open_rgb(source), size))

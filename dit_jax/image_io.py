"""Image files: PNG grids and ADM-layout .npz sample files, local or gs://.

Writes are atomic (a local temporary file, then a rename or copy), so a reader never sees a
partial file; .npz arrays are read in batches along axis 0 from their .npy headers, so a 50K
x 256 x 256 x 3 sample file (9.8 GB) is never loaded whole.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import zipfile
from typing import Any, Iterator

import numpy as np
import tensorflow as tf
from PIL import Image


def make_grid(images: np.ndarray, columns: int | None = None, upscale: int = 1) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 [rows*H, cols*W, C] grid (1-pixel gaps)."""
  n, h, w, c = images.shape
  cols = columns or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.uint8)
  for i, im in enumerate(images):
    r, q = divmod(i, cols)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = im
  if upscale > 1:
    grid = grid.repeat(upscale, 0).repeat(upscale, 1)
  return grid


def _publish(local_tmp: str, path: str) -> None:
  """Moves a finished local file to `path` (local or gs://) so readers never see a partial file."""
  if "://" in path:
    tf.io.gfile.copy(local_tmp, path + ".tmp", overwrite=True)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
    os.remove(local_tmp)
  else:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    os.replace(local_tmp, path)


def _local_tmp(path: str, suffix: str) -> str:
  if "://" in path:
    fd, tmp = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    return tmp
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  return path + ".tmp" + suffix


def save_png(path: str, grid: np.ndarray) -> None:
  """uint8 [H, W, C] (C = 1, 3, 4) -> PNG at a local or gs:// path, atomically."""
  tmp = _local_tmp(path, ".png")
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp)
  _publish(tmp, path)


def save_npz(path: str, **arrays: np.ndarray) -> None:
  """np.savez to a local or gs:// path, atomically."""
  tmp = _local_tmp(path, ".npz")
  np.savez(tmp, **arrays)
  _publish(tmp, path)


def merge_npz_parts(parts: list[str], path: str, keys: tuple[str, ...] = ("arr_0", "arr_1"),
                    rows_per_read: int = 1024) -> None:
  """Concatenates the arrays `keys` of several .npz files (local or gs://) along axis 0 into
  one .npz at `path`, streaming: memory holds `rows_per_read` rows, not the whole set (50K
  images at 256 px are 9.8 GB). Written to a local temporary file, then published atomically."""
  infos = {k: [npz_array_info(p, k) for p in parts] for k in keys}
  tmp = _local_tmp(path, ".npz")
  with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
    for k in keys:
      shapes, dtypes = zip(*infos[k])
      if len(set(s[1:] for s in shapes)) > 1 or len(set(dtypes)) > 1:
        raise ValueError(f"{k}: the parts {parts} have different shapes or dtypes: "
                         f"{list(zip(shapes, dtypes))}")
      shape = (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
      with archive.open(f"{k}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(f, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtypes[0])),
            "fortran_order": False, "shape": shape})
        for part in parts:
          for rows in iter_npz_array(part, k, batch_size=rows_per_read):
            f.write(np.ascontiguousarray(rows).tobytes())
  _publish(tmp, path)


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype] | None:
  """(shape, fortran_order, dtype) of an open .npy stream; None for formats read whole."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  return None


@contextlib.contextmanager
def _open_npz(path: str) -> Iterator[zipfile.ZipFile]:
  """An .npz (local or gs://, through tf.io.gfile) as a zip archive; errors name the path."""
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  with tf.io.gfile.GFile(path, "rb") as f:
    try:
      archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, tf.errors.InvalidArgumentError) as e:  # TF: seek before start
      raise ValueError(f"{path}: not an .npz file ({e}); expected np.savez output with arr_0 "
                       "(uint8 images [N, H, W, 3])") from None
    with archive:
      yield archive


def _load_npz_array(path: str, key: str) -> np.ndarray:
  with tf.io.gfile.GFile(path, "rb") as f, np.load(f) as data:
    return data[key]


def _open_member(archive: zipfile.ZipFile, path: str, key: str) -> Any:
  if f"{key}.npy" not in archive.namelist():
    names = [n[:-4] for n in archive.namelist()]
    raise KeyError(f"{path} has no array {key!r} (arrays: {names})")
  return archive.open(f"{key}.npy")


def iter_npz_array(path: str, key: str = "arr_0", batch_size: int = 256) -> Iterator[np.ndarray]:
  """Streams one array of an .npz in batches along axis 0, without loading it whole.

  A 50K x 256 x 256 x 3 sample file is 9.8 GB; this reads batch_size rows at a time.
  """
  with _open_npz(path) as archive, _open_member(archive, path, key) as f:
    header = _read_npy_header(f)
    if header is None or header[1] or header[2].hasobject or not header[0]:
      array = _load_npz_array(path, key)
      for start in range(0, len(array), batch_size):
        yield array[start:start + batch_size]
      return
    shape, _, dtype = header
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    for start in range(0, shape[0], batch_size):
      rows = min(batch_size, shape[0] - start)
      data = f.read(rows * row_bytes)
      if len(data) != rows * row_bytes:
        raise ValueError(f"{path}: {key} is truncated at row {start}")
      yield np.frombuffer(data, dtype).reshape((rows,) + tuple(shape[1:]))


def npz_array_info(path: str, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of one array of an .npz, read from its header only."""
  with _open_npz(path) as archive, _open_member(archive, path, key) as f:
    header = _read_npy_header(f)
  if header is None:
    array = _load_npz_array(path, key)
    return array.shape, array.dtype
  return tuple(header[0]), header[2]


def check_images(path: str, key: str = "arr_0", channels: tuple[int, ...] = (3,)) -> int:
  """Validates that `key` in an .npz is uint8 images [N, H, W, C], C in `channels`: an ADM
  sample batch is RGB, [N, H, W, 3] (the in-job evaluation of grayscale data also takes
  [N, H, W, 1] references); returns N."""
  shape, dtype = npz_array_info(path, key)
  if len(shape) != 4 or shape[-1] not in channels or dtype != np.uint8 or not shape[0]:
    want = "RGB images [N, H, W, 3]" if channels == (3,) else \
        f"images [N, H, W, C], C in {list(channels)},"
    raise ValueError(f"{path}: {key} must be uint8 {want} with N > 0 (ADM's sample batch "
                     f"layout), got {dtype} {list(shape)}")
  return shape[0]

"""tf.data pipeline streaming precomputed latent records (see `records.py`).

Each process reads its own subset of shards (`files[process_index::process_count]`) and
yields host-local batches `{label [B], mean [B, 2, h, w, c], std [B, 2, h, w, c], NAME ...}`
with B = global_batch / process_count, one array under its own name for each of the
manifest's extras (`records.batch_spec` gives every shape and dtype). The random flip and the
posterior sample are drawn on device in the train step, from keys folded from the step, so
they are reproducible.

Order is a pure function of (seed, process, epoch): epoch e permutes this process's
shards and shuffles records with seeds derived from (seed, e). Batches run across epoch
boundaries of the infinite stream, so the stream position after `step` steps is
`step * B` records, i.e. epoch `step * B // n_local` at offset `step * B % n_local`.
Resuming rebuilds the stream at that epoch and skips the offset on serialized records
(no parsing), which costs at most one pass over this process's share of the data.
"""

from __future__ import annotations

import os
import threading
from typing import Iterator

import numpy as np
import tensorflow as tf

from dit_jax import records
from dit_jax.data_info import DataInfo


def get_info(data_dir: str, process_index: int = 0, process_count: int = 1,
             verify_checksums: bool = False) -> DataInfo:
  m = records.read_manifest(data_dir)
  names = sorted(s["file"] for s in m["shards"])
  if len(names) < process_count:
    raise ValueError(
        f"{data_dir}: {len(names)} shard(s) cannot be split over {process_count} processes; "
        "write at least one shard per process (prepare_latents --shard_size)")
  mine = names[process_index::process_count]
  records.check_shards(data_dir, m, mine, verify_checksums=verify_checksums)
  counts = {s["file"]: s["count"] for s in m["shards"]}
  return DataInfo(
      latent_shape=tuple(m["latent_shape"]), num_classes=int(m["num_classes"]),
      scale_factor=float(m["scale_factor"]), count=int(m["count"]),
      local_count=sum(counts[f] for f in mine),
      files=tuple(os.path.join(data_dir, f) for f in mine), manifest=m)


def stream_position(step: int, local_batch_size: int, local_count: int) -> tuple[int, int]:
  """(epoch, offset in records) of this process's stream after `step` steps."""
  consumed = int(step) * int(local_batch_size)
  return consumed // local_count, consumed % local_count


def create_dataset(info: DataInfo, *, local_batch_size: int, seed: int, process_index: int = 0,
                   start_step: int = 0, shuffle_buffer: int = 10_000,
                   cycle_length: int = 8) -> tf.data.Dataset:
  """Infinite, deterministic dataset of host-local batches, starting after `start_step` steps."""
  if info.local_count < 1:
    raise ValueError(f"no records for process {process_index} in {info.files}")
  start_epoch, offset = stream_position(start_step, local_batch_size, info.local_count)
  files = tf.constant(list(info.files))
  decode = records.decode_fn(info.manifest)
  base = np.int64(seed) * 1_000_003 + process_index * 7919

  def epoch(e):
    order = tf.random.experimental.stateless_shuffle(
        files, seed=tf.stack([tf.constant(base, tf.int64), e]))
    ds = tf.data.Dataset.from_tensor_slices(order).interleave(
        lambda f: tf.data.TFRecordDataset(f).map(lambda r: (r, f)),
        cycle_length=cycle_length, block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)
    return ds.shuffle(shuffle_buffer, seed=base + 104729 * (e + 1), reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch)
  ds = ds.skip(offset)
  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = 16
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def iterate(ds: tf.data.Dataset, files: tuple[str, ...] = ()) -> Iterator[dict[str, np.ndarray]]:
  """numpy iterator that re-raises tf.data errors with the dataset's files named."""
  it = ds.as_numpy_iterator()
  while True:
    try:
      yield next(it)
    except StopIteration:
      return
    except tf.errors.DataLossError as e:
      # The reader's CRC error does not say which of the interleaved shards failed: find it.
      culprit = next((f for f in files if not _readable(f)), None)
      where = culprit or f"one of {list(files)}"
      raise ValueError(
          f"{where}: corrupt TFRecord shard ({e.message.splitlines()[0]}); write it again with "
          "dit_jax.prepare_latents (--config.data.verify_checksums=True checks every shard "
          "against the manifest's sha256 at start-up)") from None
    except tf.errors.InvalidArgumentError as e:  # decode_fn's size checks name field and file
      # tf.debugging.Assert prints string tensors with their quotes escaped.
      message = e.message.replace("\\'", "'")
      raise ValueError(f"Mis-shaped latent record: {message}") from None


def _readable(path: str) -> bool:
  """Whether every record of a TFRecord file passes its CRC checks (one pass over the file)."""
  try:
    tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1).numpy()
    return True
  except tf.errors.DataLossError:
    return False


def close_in_background(batches: Iterator) -> None:
  """Closes an `iterate` generator on a daemon thread. Destroying a tf.data iterator waits for
  the reads and shuffle-buffer fills it has in flight: 0.6 s on an idle 2-core host, 9-10 s
  on a busy one, after the last checkpoint was committed; the process may exit meanwhile."""
  threading.Thread(target=batches.close, name="close-input-pipeline", daemon=True).start()

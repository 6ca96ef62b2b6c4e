"""Frozen-encoder outputs per clip on disk, read back instead of running the encoders again.

Both speech encoders are frozen in both stages, so what they output for a clip is a pure function of
the clip's samples, the encoders' weights and their settings. ``EncoderCache`` stores those outputs
once and serves them to training, validation and decoding (``task.encoder_cache=DIR``, filled on first
use, or ``wavllm-cache-encoders`` ahead of time).

Layout of ``DIR`` (one folder per encoder fingerprint, so other backbones or settings never read it)::

    DIR/<fingerprint>/data-<writer>.bin     records appended back to back (raw little-endian arrays)
    DIR/<fingerprint>/index-<writer>.jsonl  one line per record: key, offset, nbytes, crc32, arrays, time
    DIR/<fingerprint>/encoders.json         what the fingerprint was made of (for people, not read)

``<writer>`` is one process (host, pid and a random part): DDP ranks and concurrent jobs each append to their own
pair of files, and every reader loads every index, so nothing is locked. A record holds named
arrays (``whisper``: (T, D) valid frames; ``wavlm``: (L+1, T, D), all hidden states, because the
layer weights that mix them are trained); its key is the SHA-1 of the fingerprint and of the clip's
float32 samples as the encoders receive them, so a changed clip is another key. Reads are ``pread``s of
one record at a time: the cache may be far larger than RAM (about 4 GB per hour of audio in float16 at
the paper's sizes: Whisper-large-v2 128 kB/s, WavLM-base's 13 hidden states 998 kB/s).

A record whose bytes do not match their CRC-32, or that lies past the end of its data file (an
interrupted write), is a miss: it is reported once with its file and key, recomputed and written again
(the newest record of a key wins).
"""
import hashlib
import json
import logging
import os
import socket
import time
import uuid
import zlib
from typing import Dict, Optional, Tuple

import numpy as np

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the record layout changes: older folders are then never read
STORE_DTYPES = ("float16", "float32")


def clip_key(fingerprint: str, samples: np.ndarray) -> str:
    """The cache key of one clip.

    Args:
        fingerprint (str): the encoders' fingerprint (``models.encoders.encoder_fingerprint``).
        samples (np.ndarray): the clip's samples as the encoders receive them, shape (T,).

    Returns:
        str: a 40-character hex SHA-1.
    """
    h = hashlib.sha1(fingerprint.encode())
    h.update(np.ascontiguousarray(samples, dtype=np.float32).tobytes())
    return h.hexdigest()


class EncoderCache:
    """Frozen-encoder outputs per clip in a folder (see the module docstring for the layout).

    Args:
        root (str): the cache folder (created when writable).
        fingerprint (str): identifies the encoders, their weights and settings; a subfolder per value.
        dtype (str): ``float16`` (half the bytes; outputs rounded once) or ``float32`` (exact).
        writable (bool): False reads only (a miss is then computed but not stored).
        description (Optional[dict]): what the fingerprint stands for, written to ``encoders.json``.
    """

    def __init__(self, root: str, fingerprint: str, dtype: str = "float16", writable: bool = True,
                 description: Optional[dict] = None):
        if dtype not in STORE_DTYPES:
            raise ValueError(f"encoder cache dtype must be one of {STORE_DTYPES}, got {dtype!r}")
        self.root, self.fingerprint, self.dtype, self.writable = root, fingerprint, dtype, writable
        self.folder = os.path.join(root, f"v{FORMAT}-{fingerprint[:20]}")
        self.stats = {"hits": 0, "misses": 0, "corrupt": 0, "written": 0}
        self._index: Dict[str, dict] = {}
        self._data_path: Optional[str] = None
        self._index_file = None
        if writable:
            os.makedirs(self.folder, exist_ok=True)
            if description is not None:
                _write_json_atomic(os.path.join(self.folder, "encoders.json"),
                                   dict(description, fingerprint=fingerprint, format=FORMAT))
        self.reload()

    def key(self, samples: np.ndarray) -> str:
        """:func:`clip_key` under this cache's fingerprint.

        Args:
            samples (np.ndarray): the clip's samples as the encoders receive them, shape (T,).

        Returns:
            str: the record key.
        """
        return clip_key(self.fingerprint, samples)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def reload(self) -> None:
        """Read every writer's index again (records other processes appended since)."""
        if not os.path.isdir(self.folder):
            return
        for name in sorted(os.listdir(self.folder)):
            if name.startswith("index-") and name.endswith(".jsonl"):
                self._read_index(os.path.join(self.folder, name))

    def _read_index(self, path: str) -> None:
        data = os.path.join(self.folder, "data-" + os.path.basename(path)[len("index-"):-len(".jsonl")] + ".bin")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                    rec["file"] = data
                    old = self._index.get(rec["key"])
                    if old is None or rec.get("t", 0) >= old.get("t", 0):  # the newest record of a key wins
                        self._index[rec["key"]] = rec
                except (ValueError, KeyError):  # a line cut by an interrupted write: its record is a miss
                    logger.warning(f"encoder cache: unreadable line {n} of {path} ignored")

    def get(self, key: str) -> Optional[Dict[str, np.ndarray]]:
        """The arrays stored under ``key``, or None (a miss, or a corrupt record: logged and counted).

        Args:
            key (str): from :func:`clip_key`.

        Returns:
            Optional[Dict[str, np.ndarray]]: name -> array in the stored dtype.
        """
        rec = self._index.get(key)
        if rec is None:
            self.stats["misses"] += 1
            return None
        payload = self._read(rec)
        if payload is None or zlib.crc32(payload) != rec["crc32"]:
            self.stats["corrupt"] += 1
            logger.warning(f"encoder cache: record {key} in {rec['file']} (offset {rec['offset']}) is corrupt or "
                           "truncated; recomputing it")
            del self._index[key]
            return None
        self.stats["hits"] += 1
        out = {}
        for name, dtype, shape, start in rec["arrays"]:
            count = int(np.prod(shape))
            out[name] = np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<"), count=count,
                                      offset=start).reshape(shape)
        return out

    @staticmethod
    def _read(rec: dict) -> Optional[bytes]:
        try:
            fd = os.open(rec["file"], os.O_RDONLY)
        except OSError:
            return None
        try:
            payload = os.pread(fd, rec["nbytes"], rec["offset"])
        finally:
            os.close(fd)
        return payload if len(payload) == rec["nbytes"] else None

    def put(self, key: str, arrays: Dict[str, np.ndarray]) -> None:
        """Store ``arrays`` under ``key`` (a no-op when read-only).

        Args:
            key (str): from :func:`clip_key`.
            arrays (Dict[str, np.ndarray]): name -> array (any float dtype; stored as ``self.dtype``).
        """
        if not self.writable:
            return
        parts, meta, offset = [], [], 0
        for name, arr in arrays.items():
            b = np.ascontiguousarray(arr, dtype=np.dtype(self.dtype).newbyteorder("<")).tobytes()
            meta.append([name, self.dtype, list(arr.shape), offset])
            parts.append(b)
            offset += len(b)
        payload = b"".join(parts)
        data_path, index = self._writer()
        with open(data_path, "ab") as f:
            start = f.seek(0, os.SEEK_END)
            f.write(payload)
            f.flush()
        rec = {"key": key, "offset": start, "nbytes": len(payload), "crc32": zlib.crc32(payload), "arrays": meta,
               "t": time.time_ns()}
        index.write(json.dumps(rec, separators=(",", ":")) + "\n")
        index.flush()
        rec["file"] = data_path
        self._index[key] = rec
        self.stats["written"] += 1

    def _writer(self) -> Tuple[str, object]:
        if self._index_file is None:
            # host, pid and a random part: processes in containers may all have the same pid
            writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self._data_path = os.path.join(self.folder, f"data-{writer}.bin")
            self._index_file = open(os.path.join(self.folder, f"index-{writer}.jsonl"), "a", encoding="utf-8")
        return self._data_path, self._index_file

    def close(self) -> None:
        """Close this process's index file (records are flushed as they are written)."""
        if self._index_file is not None:
            self._index_file.close()
            self._index_file = None

    def summary(self) -> str:
        """One line for the log: records held, and this process's hits / misses / corrupt / written."""
        s = self.stats
        return (f"encoder cache {self.folder}: {len(self)} records ({self.dtype}); hits {s['hits']}, misses "
                f"{s['misses']}, corrupt {s['corrupt']}, written {s['written']}")


def attach_encoder_cache(model, folder: str, dtype: str = "float16", writable: bool = True) -> EncoderCache:
    """Give ``model`` (a ``WavLLMModel``) an encoder cache in ``folder`` keyed by its encoders' fingerprint.

    Args:
        model: the model; its ``encoder_cache`` is set.
        folder (str): the cache folder (relative paths resolve against the working directory).
        dtype (str): ``float16`` or ``float32`` storage.
        writable (bool): whether misses are stored.

    Returns:
        EncoderCache: the attached cache.
    """
    fingerprint, description = model.encoder_fingerprint()
    cache = EncoderCache(os.path.abspath(folder), fingerprint, dtype, writable=writable, description=description)
    model.encoder_cache = cache
    logger.info(f"encoder cache attached: {cache.summary()}")
    return cache


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)

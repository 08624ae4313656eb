"""Write checkpoints the way Python 2.7 + PyTorch 0.3 wrote the authors' released files.

The legacy (non-zip) format, byte for byte as PyTorch 0.3's ``torch.save`` laid it out: four
pickles (magic number, protocol version, system info, the object) then the list of storage keys
and the raw storages. Inside the object pickle, as Python 2 wrote it:

- every ``str`` is a Python 2 byte string (``SHORT_BINSTRING``/``BINSTRING``); bytes that are not
  UTF-8 need ``encoding='latin1'`` to load;
- an ``OrderedDict`` (every state dict) reduces to ``OrderedDict([[key, value], ...])``;
- a tensor reduces to ``torch._utils._rebuild_tensor(storage, offset, size, stride)`` and its
  storage is a persistent id ``('storage', torch.cuda.FloatStorage, key, 'cuda:0', numel, None)``:
  the released files were saved from a GPU.
"""

import pickle
import struct
from collections import OrderedDict

import torch

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
SYS_INFO = {
    "protocol_version": PROTOCOL_VERSION,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 8},
}
CUDA_STORAGES = {
    torch.float32: torch.cuda.FloatStorage,
    torch.float64: torch.cuda.DoubleStorage,
    torch.int64: torch.cuda.LongStorage,
    torch.uint8: torch.cuda.ByteStorage,
}


class _Storage:
    """One tensor's data, pickled as a persistent id and written after the pickles."""

    def __init__(self, key: str, tensor: torch.Tensor):
        self.key = key
        self.tensor = tensor.detach().contiguous().cpu()


class Py2Pickler(pickle._Pickler):
    """Protocol 2 with Python 2's byte strings and OrderedDict/tensor reductions."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, storages: dict | None = None):
        super().__init__(file, protocol=2)
        self.storages = {} if storages is None else storages

    def save_py2_str(self, obj: str):
        data = obj.encode("latin1")  # Python 2 str: bytes, here Latin-1 text (not valid UTF-8 if accented)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str

    def reducer_override(self, obj):
        if type(obj) is OrderedDict:
            return OrderedDict, ([[k, v] for k, v in obj.items()],)
        if isinstance(obj, torch.Tensor):
            storage = _Storage(str(140000000 + len(self.storages)), obj)
            self.storages[storage.key] = storage
            return torch._utils._rebuild_tensor, (storage, 0, tuple(obj.shape), tuple(storage.tensor.stride()))
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", CUDA_STORAGES[obj.tensor.dtype], obj.key, "cuda:0", obj.tensor.numel(), None)
        return None


def save_py2_torch03(obj, path) -> None:
    """``torch.save(obj, path)`` as Python 2.7 + PyTorch 0.3 did it (state dicts as OrderedDicts)."""
    with open(path, "wb") as f:
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO):
            Py2Pickler(f).dump(header)
        pickler = Py2Pickler(f)
        pickler.dump(obj)
        keys = sorted(pickler.storages)
        Py2Pickler(f).dump(keys)
        for key in keys:
            tensor = pickler.storages[key].tensor
            f.write(struct.pack("<q", tensor.numel()))
            f.write(tensor.numpy().tobytes())


def torch03_state_dict(state: dict, prefix: str = "", layer_names: bool = False) -> OrderedDict:
    """A state dict as 0.3 wrote it: no ``num_batches_tracked``, optional prefix and ``layer<N>`` keys."""
    out = OrderedDict()
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if layer_names:
            parts = key.split(".")
            if parts[0] == "blocks":
                key = ".".join([f"layer{int(parts[1]) + 1}", *parts[2:]])
            elif parts[0] == "ds":
                key = ".".join([f"layer{int(parts[1]) + 1}", "0", "downsample", *parts[2:]])
        out[prefix + key] = value.clone()
    return out

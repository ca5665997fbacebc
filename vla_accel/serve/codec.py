"""Wire formats and the observation a request carries.

msgpack-numpy as openpi's client packs it (`openpi_client.msgpack_numpy`; NOT the layout of the PyPI
package msgpack-numpy): an ndarray is the map {"__ndarray__": True, "data": raw bytes, "dtype": dtype.str,
"shape": [...]}, a numpy scalar {"__npgeneric__": True, "data": value, "dtype": dtype.str}; keys arrive as
bytes or str. json-numpy (OpenVLA-OFT's deploy.py): {"__numpy__": base64, "dtype": ..., "shape": [...]}.
Neither format ever unpickles; object / void / complex dtypes are refused.

Observation keys (first one present wins):
    third-person image  full_image | observation/image | image          uint8 [H, W, 3], upright
    wrist image         wrist_image | observation/wrist_image | the one key containing "wrist"
    state               state | observation/state                        8 floats (eef pos, axis-angle, gripper)
    instruction         instruction | prompt                             non-empty text
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np

IMAGE_KEYS = ("full_image", "observation/image", "image")
WRIST_KEYS = ("wrist_image", "observation/wrist_image")
STATE_KEYS = ("state", "observation/state")
TEXT_KEYS = ("instruction", "prompt")
BAD_KINDS = ("O", "V", "c")
MAX_TEXT = 2000


class BadRequest(ValueError):
    """The request cannot be served; the message names the field at fault and what was expected."""


# ---- msgpack-numpy (openpi) --------------------------------------------------------------------


def _pack_default(obj):
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in BAD_KINDS:
        raise TypeError(f"cannot send numpy dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot pack {type(obj).__name__}")


def _field(obj: dict, name: str):
    return obj[name.encode()] if name.encode() in obj else obj[name]


def _unpack_hook(obj: dict):
    for tag in ("__ndarray__", "__npgeneric__"):
        if tag.encode() in obj or tag in obj:
            try:
                dtype = np.dtype(_field(obj, "dtype"))
                if dtype.kind in BAD_KINDS:
                    raise BadRequest(f"numpy dtype {dtype} is not accepted (numbers and booleans only)")
                if tag == "__npgeneric__":
                    return dtype.type(_field(obj, "data"))
                shape = tuple(int(n) for n in _field(obj, "shape"))
                return np.frombuffer(_field(obj, "data"), dtype=dtype).reshape(shape)
            except BadRequest:
                raise
            except (KeyError, TypeError, ValueError) as err:
                raise BadRequest(f"malformed msgpack-numpy array ({type(err).__name__}: {err}); expected "
                                 "{'__ndarray__': True, 'data': bytes, 'dtype': str, 'shape': [...]}") from None
    return obj


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_pack_default, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """msgpack bytes -> python objects with numpy arrays; BadRequest on anything malformed."""
    try:
        return msgpack.unpackb(data, object_hook=_unpack_hook, raw=False, strict_map_key=False)
    except BadRequest:
        raise
    except Exception as err:  # noqa: BLE001 - msgpack raises many types for garbage; all are the client's fault
        raise BadRequest(f"the message is not valid msgpack ({type(err).__name__}: {err})") from None


# ---- json-numpy (OpenVLA-OFT deploy.py) ----------------------------------------------------------


def loads_json(body: bytes) -> tuple[Any, bool]:
    """JSON with json-numpy arrays -> (python objects, double_encoded); deploy.py's {"encoded": "<json-numpy
    text>"} is unwrapped (double_encoded=True: the response goes back the same way)."""
    import json_numpy

    double = False
    try:
        payload = json_numpy.loads(body)
        if isinstance(payload, dict) and "encoded" in payload:
            double = True
            if len(payload) != 1 or not isinstance(payload["encoded"], str):
                raise BadRequest("'encoded' must be the only key and hold the json-numpy text of the observation")
            payload = json_numpy.loads(payload["encoded"])
    except BadRequest:
        raise
    except Exception as err:  # noqa: BLE001 - any decoding failure is a malformed request
        raise BadRequest(f"the body is not valid JSON with json-numpy arrays ({type(err).__name__}: {err})") from None
    return payload, double


def dumps_json(obj: Any, double_encoded: bool = False) -> bytes:
    """deploy.py's response: the json-numpy encoding; a JSON string of it when the request came 'encoded'."""
    import json_numpy

    text = json_numpy.dumps(obj)
    return (json.dumps(text) if double_encoded else text).encode()


# ---- the observation -----------------------------------------------------------------------------


def _pick(payload: dict, keys: tuple[str, ...], what: str):
    for k in keys:
        if k in payload:
            return k, payload[k]
    raise BadRequest(f"missing key {' / '.join(repr(k) for k in keys)}: {what}")


def _image(name: str, value: Any, max_side: int) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise BadRequest(f"{name!r} must be a numpy array uint8 [H, W, 3], got {type(value).__name__}")
    if value.dtype != np.uint8:
        raise BadRequest(f"{name!r} must have dtype uint8 (0..255), got {value.dtype}")
    if value.ndim != 3 or value.shape[2] != 3 or min(value.shape[:2]) < 16:
        raise BadRequest(f"{name!r} must have shape [H, W, 3] with H, W >= 16, got {list(value.shape)}")
    if max(value.shape[:2]) > max_side:
        raise BadRequest(f"{name!r} is {value.shape[0]}x{value.shape[1]}; at most {max_side} per side "
                         "(serve.max_image_side)")
    return np.ascontiguousarray(value)


def observation(payload: Any, *, max_image_side: int, state_dim: int = 8) -> tuple[dict, str]:
    """A decoded request -> (obs {full_image, wrist_image, state}, instruction); BadRequest naming the field."""
    if not isinstance(payload, dict):
        raise BadRequest(f"the request must be a map of observation fields, got {type(payload).__name__}")
    k_img, img = _pick(payload, IMAGE_KEYS, "the third-person camera image, uint8 [H, W, 3]")
    wrist = [k for k in WRIST_KEYS if k in payload] or [k for k in payload if isinstance(k, str) and "wrist" in k]
    if len(wrist) != 1:
        raise BadRequest("missing key 'wrist_image' / 'observation/wrist_image': the wrist camera image, uint8 "
                         "[H, W, 3]" if not wrist else f"one wrist image expected, got keys {sorted(wrist)}")
    k_state, state = _pick(payload, STATE_KEYS, f"the robot state, {state_dim} floats")
    k_text, text = _pick(payload, TEXT_KEYS, "the task instruction, text")
    state = np.asarray(state) if isinstance(state, (list, tuple, np.ndarray)) else state
    if not isinstance(state, np.ndarray) or state.dtype.kind not in "fiu" or state.shape != (state_dim,):
        got = f"{state.dtype} {list(state.shape)}" if isinstance(state, np.ndarray) else type(state).__name__
        raise BadRequest(f"{k_state!r} must be {state_dim} numbers (eef pos 3, axis-angle 3, gripper 2), got {got}")
    if not np.all(np.isfinite(state)):
        raise BadRequest(f"{k_state!r} holds NaN or inf: {state.tolist()}")
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        shown = repr(text) if not isinstance(text, str) or len(text) <= MAX_TEXT else f"{len(text)} characters"
        raise BadRequest(f"{k_text!r} must be non-empty text of at most {MAX_TEXT} characters, got {shown}")
    obs = {"full_image": _image(k_img, img, max_image_side),
           "wrist_image": _image(wrist[0], payload[wrist[0]], max_image_side),
           "state": state}
    return obs, text

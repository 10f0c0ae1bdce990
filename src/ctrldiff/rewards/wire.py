"""The reward server's wire format: JSON over HTTP, tensors as raw little-endian bytes in base64.

Request  ``POST /score``, ``Content-Type: application/json``, ``Content-Length`` required::

    {"x":    {"dtype": "float32", "shape": [B, C, H, W], "data": "<base64 of the B*C*H*W values, C order>"},
     "cond": null | ["prompt 1", ..., "prompt B"] | {"dtype": "int64", "shape": [B, ...], "data": "..."}}

``x`` is a float tensor (float16 / float32 / float64; converted to float32, every value finite) of 1 to 8
dimensions, B >= 1; ``cond`` is absent/null, B strings (prompts), or a tensor whose first dimension is B (labels).
No other keys are allowed.

Response ``200``: ``{"rewards": [r_1, ..., r_B], "reward": NAME}``; any error: a status >= 400 and
``{"error": "one line", "reward": NAME}``: 400 malformed request, 404 unknown path, 405 wrong method, 411 no
Content-Length, 413 body or batch too large, 422 the reward cannot score this input (e.g. labels for a text-image
reward), 500 the reward failed (raised, NaN/inf, wrong shape), 503 every connection slot is busy (retry).
``GET /health`` answers ``{"status": "ok", "reward": NAME, "differentiable": bool, "max_batch": N, "max_bytes": M,
"max_connections": K}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math

import numpy as np
import torch
from torch import Tensor

MAX_DIMS = 8
X_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
COND_DTYPES = {**X_DTYPES, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool}
_NP = {"float16": "<f2", "float32": "<f4", "float64": "<f8", "int32": "<i4", "int64": "<i8", "uint8": "u1", "bool": "?"}
_NAMES = {v: k for k, v in COND_DTYPES.items()}
MAX_PROMPT_CHARS = 10_000


class WireError(ValueError):
    """A malformed request or response; ``status`` is the HTTP status to answer with."""

    def __init__(self, msg: str, status: int = 400):
        super().__init__(msg)
        self.status = status


# ---- tensors ------------------------------------------------------------------------------------------------
def encode_tensor(t: Tensor) -> dict:
    t = t.detach().cpu().contiguous()
    if t.dtype not in _NAMES:
        t = t.float()
    name = _NAMES[t.dtype]
    arr = t.numpy().astype(_NP[name], copy=False)
    return {"dtype": name, "shape": list(t.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_tensor(obj, field: str, dtypes: dict, max_elements: int) -> Tensor:
    """Validate and decode a tensor object; WireError names the field and what is wrong."""
    if not isinstance(obj, dict):
        raise WireError(f"{field} must be an object with dtype, shape and data, got {_kind(obj)}")
    keys = set(obj)
    if keys != {"dtype", "shape", "data"}:
        extra, missing = sorted(keys - {"dtype", "shape", "data"}), sorted({"dtype", "shape", "data"} - keys)
        raise WireError(f"{field}: " + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                                 + ([f"unknown key(s) {', '.join(map(repr, extra))[:200]}"]
                                                    if extra else [])))
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise WireError(f"{field}.dtype must be one of {', '.join(dtypes)}, got {_short(dtype)}")
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_DIMS:
        raise WireError(f"{field}.shape must be a list of 1 to {MAX_DIMS} sizes, got {_short(shape)}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise WireError(f"{field}.shape must hold positive integers, got {_short(shape)}")
    numel = math.prod(shape)
    if numel > max_elements:
        raise WireError(f"{field} has {numel} elements, more than this server's limit of {max_elements}", 413)
    if not isinstance(data, str):
        raise WireError(f"{field}.data must be a base64 string, got {_kind(data)}")
    itemsize = np.dtype(_NP[dtype]).itemsize
    if len(data) > 4 * ((numel * itemsize + 2) // 3) + 4:  # reject before decoding an oversized string
        raise WireError(f"{field}.data is longer than {numel} {dtype} values")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"{field}.data is not valid base64") from None
    if len(raw) != numel * itemsize:
        raise WireError(f"{field}.data holds {len(raw)} bytes, shape {shape} of {dtype} needs {numel * itemsize}")
    arr = np.frombuffer(raw, dtype=_NP[dtype]).reshape(shape)
    if dtype == "bool":
        return torch.from_numpy(arr.copy())
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))


# ---- requests -----------------------------------------------------------------------------------------------
def encode_request(x: Tensor, cond) -> bytes:
    if cond is None:
        c = None
    elif isinstance(cond, Tensor):
        c = encode_tensor(cond)
    elif isinstance(cond, (list, tuple)) and all(isinstance(s, str) for s in cond):
        c = list(cond)
    else:
        raise WireError(f"cond must be None, a tensor or a list of prompts to be sent to a reward server, "
                        f"got {type(cond).__name__}")
    return json.dumps({"x": encode_tensor(x.float() if x.dtype not in X_DTYPES.values() else x), "cond": c}).encode()


def decode_request(body: bytes, max_batch: int, max_elements: int) -> tuple[Tensor, Tensor | list[str] | None]:
    """Parse and validate a /score body -> (x float32 [B, ...], cond); WireError (status 400/413) otherwise."""
    try:
        req = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise WireError("the request body is not UTF-8 text") from None
    except RecursionError:
        raise WireError("the request JSON is nested too deeply") from None
    except ValueError as e:
        raise WireError(f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(req, dict):
        raise WireError(f"the request must be a JSON object with 'x' and 'cond', got {_kind(req)}")
    extra = sorted(set(req) - {"x", "cond"})
    if extra:
        raise WireError(f"unknown request key(s) {', '.join(map(repr, extra))[:200]}; allowed: x, cond")
    if "x" not in req:
        raise WireError("the request has no 'x' (the samples to score)")
    x = decode_tensor(req["x"], "x", X_DTYPES, max_elements)
    b = x.shape[0]
    if b > max_batch:
        raise WireError(f"batch of {b} exceeds this server's max batch {max_batch}; send at most {max_batch} "
                        "samples per request (client option max_batch)", 413)
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise WireError("x holds non-finite values (NaN/inf, or outside the float32 range)")
    cond = req.get("cond")
    if cond is None:
        return x, None
    if isinstance(cond, list):
        if len(cond) != b or not all(isinstance(s, str) for s in cond):
            raise WireError(f"cond as a list must hold {b} prompt strings (one per sample), got {_short(cond)}")
        if any(len(s) > MAX_PROMPT_CHARS for s in cond):
            raise WireError(f"cond: a prompt is longer than {MAX_PROMPT_CHARS} characters")
        return x, cond
    c = decode_tensor(cond, "cond", COND_DTYPES, max_elements)
    if c.shape[0] != b:
        raise WireError(f"cond has first dimension {c.shape[0]}, x has batch {b}")
    if c.dtype.is_floating_point:
        c = c.float()
        if not bool(torch.isfinite(c).all()):
            raise WireError("cond holds non-finite values")
    return x, c


# ---- responses ----------------------------------------------------------------------------------------------
def encode_response(rewards: Tensor, name: str) -> bytes:
    return json.dumps({"rewards": [float(v) for v in rewards.detach().double().cpu().tolist()], "reward": name}).encode()


def decode_response(body: bytes, batch: int) -> tuple[Tensor, str | None]:
    """A /score answer -> (rewards float32 [batch], served reward name); WireError says what is wrong."""
    try:
        resp = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError(f"the answer is not JSON (starts {body[:60]!r})") from None
    if not isinstance(resp, dict) or "rewards" not in resp:
        raise WireError(f"the answer has no 'rewards' (got {_short(resp)})")
    r = resp["rewards"]
    if not isinstance(r, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r):
        raise WireError(f"'rewards' must be a list of numbers, got {_short(r)}")
    if len(r) != batch:
        raise WireError(f"the answer holds {len(r)} rewards for {batch} samples")
    out = torch.tensor(r, dtype=torch.float64, device="cpu")
    if not bool(torch.isfinite(out).all()):
        raise WireError(f"the answer holds {int((~torch.isfinite(out)).sum())} non-finite reward(s) (NaN/inf)")
    name = resp.get("reward")
    return out.float(), name if isinstance(name, str) else None


def error_body(msg: str, name: str | None) -> bytes:
    return json.dumps({"error": " ".join(str(msg).split())[:1000], "reward": name}).encode()


def _no_constant(c: str):
    raise ValueError(f"{c} is not allowed in JSON")


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), type(v).__name__)


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else str(v)
    return s if len(s) <= 60 else s[:57] + "..."

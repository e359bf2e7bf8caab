"""Type stubs for the Rust extension module (src/python/mod.rs)."""

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

#: activations: float32, or bfloat16 bits as uint16 (`t.view(torch.int16).numpy().view(np.uint16)`)
Act = Union[npt.NDArray[np.float32], npt.NDArray[np.uint16]]

def kernel_info() -> dict: ...
def f32_to_half(src: npt.NDArray[np.float32], out: npt.NDArray[np.uint16], bf16: bool = False) -> None: ...
def half_to_f32(src: npt.NDArray[np.uint16], out: npt.NDArray[np.float32], bf16: bool = False) -> None: ...
def quantize_int8(
    w: npt.NDArray[np.float32], symmetric: bool = True, kernel: str = "auto"
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32], npt.NDArray[np.int8]]: ...
def dequantize_int8(
    q: npt.NDArray[np.int8], scales: npt.NDArray[np.float32], zero_points: npt.NDArray[np.int8]
) -> npt.NDArray[np.float32]: ...
def quantize_int4(
    w: npt.NDArray[np.float32], group_size: int, symmetric: bool = False, kernel: str = "auto"
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], npt.NDArray[np.uint8]]: ...
def dequantize_int4(
    packed: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    zeros: npt.NDArray[np.uint8],
    group_size: int,
    in_features: int,
) -> npt.NDArray[np.float32]: ...
def linear_half(
    x: Act,
    w: npt.NDArray[np.uint16],
    out: npt.NDArray[np.float32],
    bias: Optional[npt.NDArray[np.float32]] = None,
    bf16: bool = False,
    kernel: str = "auto",
) -> None: ...
def linear_int8(
    x: Act,
    q: npt.NDArray[np.int8],
    scales: npt.NDArray[np.float32],
    zero_points: npt.NDArray[np.int8],
    out: npt.NDArray[np.float32],
    bias: Optional[npt.NDArray[np.float32]] = None,
    kernel: str = "auto",
) -> None: ...
def linear_int4(
    x: Act,
    packed: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    zeros: npt.NDArray[np.uint8],
    group_size: int,
    in_features: int,
    out: npt.NDArray[np.float32],
    bias: Optional[npt.NDArray[np.float32]] = None,
    kernel: str = "auto",
) -> None: ...
def quantize_act_int8(
    x: Act, q: npt.NDArray[np.int8], scales: npt.NDArray[np.float32], static_scale: Optional[float] = None,
    kernel: str = "auto",
) -> None: ...
def linear_w8a8(
    xq: npt.NDArray[np.int8],
    x_scales: npt.NDArray[np.float32],
    q: npt.NDArray[np.int8],
    scales: npt.NDArray[np.float32],
    zero_points: npt.NDArray[np.int8],
    out: npt.NDArray[np.float32],
    bias: Optional[npt.NDArray[np.float32]] = None,
    kernel: str = "auto",
) -> None: ...

# --- GGML block formats and the GGUF container (src/python/gguf.rs) ---

def ggml_types() -> List[Tuple[str, int, int, int, bool]]: ...
def ggml_quantize(
    w: npt.NDArray[np.float32], qtype: str, imatrix: Optional[npt.NDArray[np.float32]] = None, mode: str = "search",
    kernel: str = "auto", reference: bool = False,
) -> npt.NDArray[np.uint8]: ...
def ggml_dequantize(
    data: npt.NDArray[np.uint8], qtype: str, n: int, kernel: str = "auto", reference: bool = False,
) -> npt.NDArray[np.float32]: ...
# the packed-format registry (src/formats/registry.rs)
def packed_formats() -> List[Dict[str, Any]]: ...
def packed_row_bytes(name: str, cols: int) -> int: ...
def packed_quantize(
    name: str, w: npt.NDArray[np.float32], importance: Optional[npt.NDArray[np.float32]] = None, kernel: str = "auto",
    reference: bool = False,
) -> npt.NDArray[np.uint8]: ...
def packed_dequantize(
    name: str, packed: npt.NDArray[np.uint8], cols: int, kernel: str = "auto", reference: bool = False,
) -> npt.NDArray[np.float32]: ...
def packed_first_non_finite(name: str, packed: npt.NDArray[np.uint8], cols: int) -> Optional[Tuple[int, int]]: ...
def packed_linear(
    name: str, x: Act, packed: npt.NDArray[np.uint8], in_features: int, out: npt.NDArray[np.float32],
    bias: Optional[npt.NDArray[np.float32]] = None, kernel: str = "auto",
) -> None: ...
def gguf_read_header(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]: ...
def gguf_layout(metadata: Sequence[Tuple[str, Sequence[int], Any]], tensors: Sequence[Tuple[str, Sequence[int], int]]
                ) -> Tuple[bytes, List[int], List[int], int]: ...
def gguf_write(
    path: Union[str, "os.PathLike[str]"], metadata: List[Tuple[str, List[int], Any]],
    tensors: List[Tuple[str, List[int], int, npt.NDArray[np.uint8]]],
) -> None: ...

class GGUFStreamWriter:
    """A GGUF file written tensor by tensor: created with the metadata and
    ``[(name, gguf_dims, ggml_type_id)]``, then ``write_tensor`` in that order, then ``finish``
    (the file appears at `path` complete). ``abort``, or dropping it unfinished, discards it."""

    def __init__(
        self, path: Union[str, "os.PathLike[str]"], metadata: List[Tuple[str, List[int], Any]],
        tensors: List[Tuple[str, List[int], int]],
    ) -> None: ...
    def write_tensor(self, name: str, data: npt.NDArray[np.uint8]) -> None: ...
    def next_tensor(self) -> Optional[str]: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...

# --- calibration statistics (src/python/calib.rs) ---
def calib_accumulate(
    x: npt.NDArray[np.float32], sum_sq: npt.NDArray[np.float64], absmax: npt.NDArray[np.float32],
    min: npt.NDArray[np.float32], max: npt.NDArray[np.float32], reference: bool = False,
) -> None: ...
def calib_histogram_bins() -> int: ...
def calib_histogram(x: npt.NDArray[np.float32], hist: npt.NDArray[np.uint64]) -> None: ...
def calib_histogram_clip(
    hist: npt.NDArray[np.uint64], absmax: float, method: str, percentile: float = 99.99, qmax: float = 127.0,
    steps: int = 256,
) -> float: ...
def weight_column_absmax(w: npt.NDArray[np.float32], out: npt.NDArray[np.float32]) -> None: ...
def smoothquant_scales(
    act_absmax: npt.NDArray[np.float32], weight_absmax: npt.NDArray[np.float32], alpha: float
) -> npt.NDArray[np.float32]: ...
def quantize_int4_weighted(
    w: npt.NDArray[np.float32], group_size: int, importance: npt.NDArray[np.float32], symmetric: bool = False,
    reference: bool = False, kernel: str = "auto",
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], npt.NDArray[np.uint8]]: ...

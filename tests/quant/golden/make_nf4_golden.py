"""Regenerate nf4_bitsandbytes.npz, the NF4 golden vectors of tests/quant/test_nf4.py, with
bitsandbytes (written with bitsandbytes 0.50.2 on CPU): ``python tests/quant/golden/make_nf4_golden.py``."""

from pathlib import Path

import numpy as np
import torch
from bitsandbytes import functional as F

rng = np.random.default_rng(20261207)
# 260 blocks of 64: two absmax groups (256 + 4); float16-representable values so they store exactly
x = (rng.standard_normal((1, 64 * 260)) * np.exp(rng.standard_normal((1, 64 * 260)) * 0.5)).astype(np.float16)
q, st = F.quantize_4bit(torch.from_numpy(x.astype(np.float32)), blocksize=64, quant_type="nf4", compress_statistics=True)
np.savez_compressed(
    Path(__file__).with_name("nf4_bitsandbytes.npz"), x=x, packed=q.numpy().reshape(-1), absmax_codes=st.absmax.numpy(),
    group_scales=st.state2.absmax.numpy(), offset=np.float32(st.offset.item()),
    dequantized=F.dequantize_4bit(q, st).numpy().reshape(-1), code=F.get_4bit_type("nf4", device="cpu").numpy(),
    dynamic_code=F.create_dynamic_map(signed=True).numpy(),
)

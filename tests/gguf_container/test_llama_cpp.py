"""llama.cpp itself loads and runs our GGUF exports (opt-in: set LLAMA_CPP_BIN_DIR to a llama.cpp
build's bin directory with llama-perplexity and llama-tokenize; see docs/gguf.md).

The trained tiny Llama in examples/tiny-llama-wikitext is exported; llama.cpp must tokenize like
the HF tokenizer, token for token, and its perplexity must match a PyTorch evaluation of the same
file's (dequantized) weights under the same protocol (`eval.llama_cpp_perplexity`).
"""

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

BIN = os.environ.get("LLAMA_CPP_BIN_DIR")
pytestmark = pytest.mark.skipif(not BIN, reason="set LLAMA_CPP_BIN_DIR to a llama.cpp build/bin directory")

MODEL = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama-wikitext"
CTX = 128

# wikitext-style text with the cases a pre-tokenizer regex separates differently: contractions,
# numbers of several lengths, punctuation runs, multiple spaces, newlines, non-ASCII letters
PARAGRAPHS = [
    " = Valkyria Chronicles III = \n",
    " The game 's battle system , the BliTZ system , is carried over directly from Valkyria Chronicles . "
    "During missions , players select each unit using a top @-@ down perspective of the battlefield map : "
    "once a character is selected , the player moves the character around the battlefield in third @-@ person . \n",
    " It was released in 2011 , sold 102 @,@ 000 copies in its first week and won't be ported ; they've said "
    "that 3 @.@ 5 million units would be needed . Café owners in Zürich — and São Paulo — disagreed !!  \n",
    "\n",
    " In 1945 , after the war ended , the team 's manager ( Joe Smith ) returned : \" We 'll see \" , he said . \n",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("llama_cpp")
    text = "".join(PARAGRAPHS[i % len(PARAGRAPHS)] for i in range(60))
    text_path = d / "text.txt"
    text_path.write_text(text, encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(MODEL)
    return d, text_path, model, tok


def tool(name):
    p = Path(BIN) / name
    if not p.exists():
        pytest.skip(f"{p} not built")
    return str(p)


def run(*cmd):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout + p.stderr


def text_ids(tok, text_path):
    """The text's token ids and the number of full CTX chunks the perplexities compare."""
    ids = torch.tensor(tok(text_path.read_text(encoding="utf-8"))["input_ids"])
    return ids, ids.numel() // CTX - 1


def llama_perplexity(path, text_path, chunks):
    """llama-perplexity's running PPL printed after chunk `chunks` (one more chunk is run: some
    builds lose the last chunk's line and the final estimate at exit, their logger is stopped
    undrained)."""
    out = run(tool("llama-perplexity"), "-m", str(path), "-f", str(text_path), "-c", str(CTX), "-b", str(CTX),
              "-t", "2", "--no-warmup", "--chunks", str(chunks + 1))
    vals = dict(re.findall(r"\[(\d+)\]([0-9.]+),", out))
    assert str(chunks) in vals, out[-2000:]
    return float(vals[str(chunks)])


def test_llama_cpp_tokenizes_like_hf(setup):
    from diffulex_edge.export import export_gguf

    d, text_path, model, tok = setup
    path = d / "F16.gguf"
    export_gguf(model, path, quant="F16", tokenizer=tok)
    out = run(tool("llama-tokenize"), "-m", str(path), "-f", str(text_path), "--ids", "--log-disable")
    ids = [int(v) for v in out.strip().splitlines()[-1].strip("[] ").split(",") if v.strip()]
    assert ids == tok(text_path.read_text(encoding="utf-8"))["input_ids"]


@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q4_K_M", "Q4_0"])
def test_llama_perplexity_matches_pytorch_on_the_same_weights(setup, quant):
    import copy

    from diffulex_edge.eval import llama_cpp_perplexity
    from diffulex_edge.export import export_gguf, load_gguf_weights

    d, text_path, model, tok = setup
    path = d / f"{quant}.gguf"
    export_gguf(model, path, quant=quant, tokenizer=tok)
    ids, chunks = text_ids(tok, text_path)
    assert chunks >= 10
    ppl_llama = llama_perplexity(path, text_path, chunks)
    ours = llama_cpp_perplexity(load_gguf_weights(copy.deepcopy(model), path), ids, n_ctx=CTX,
                                max_chunks=chunks).perplexity
    # Same weights, same tokens, same scored positions. What differs: llama.cpp stores K/V in f16
    # (relative rounding 2^-11 per element), rounds activations to f16 / Q8 for the matmuls
    # (2^-11 / about 2^-8 relative) and sums in another order; on WikiText-2 (200 chunks) the
    # two agree within 0.01% for every mix (docs/gguf.md); 0.5% leaves room for other builds and
    # kernels while still catching a file that llama.cpp computes differently.
    assert ppl_llama == pytest.approx(ours, rel=0.005), (ppl_llama, ours)


@pytest.mark.parametrize("fmt", ["q8_0", "q5_1", "q4_0", "iq4_nl"])
def test_model_quantized_in_pytorch_runs_in_llama_cpp_as_measured(setup, fmt):
    """quantize_ in PyTorch, then export: llama.cpp runs the bytes the PyTorch model computed with
    (no second quantization), so llama.cpp's perplexity of the file equals the perplexity of the
    quantized PyTorch model itself (not of a reload). quant="F32" keeps the tensors the model did
    not quantize (embeddings, norms) in float, as they are in the PyTorch model."""
    import copy

    from diffulex_edge.eval import llama_cpp_perplexity
    from diffulex_edge.export import export_gguf
    from diffulex_edge.quant import quantize_

    d, text_path, model, tok = setup
    q = copy.deepcopy(model)
    quantize_(q, fmt)
    path = d / f"pytorch-{fmt}.gguf"
    export_gguf(q, path, quant="F32", tokenizer=tok)
    ids, chunks = text_ids(tok, text_path)
    ppl_llama = llama_perplexity(path, text_path, chunks)
    ours = llama_cpp_perplexity(q, ids, n_ctx=CTX, max_chunks=chunks).perplexity
    # the tolerance of test_llama_perplexity_matches_pytorch_on_the_same_weights (same reasons)
    assert ppl_llama == pytest.approx(ours, rel=0.005), (ppl_llama, ours)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "linear", "factor": 4.0},
], ids=lambda r: r["rope_type"])
def test_llama_cpp_applies_rope_scaling_like_transformers(setup, rope):
    """The trained model with a RoPE scaling added to its config (original context 32 < the 128
    evaluated, so the scaling changes the outputs): llama.cpp must compute the exported file as
    transformers computes the model, and differently from the unscaled model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from diffulex_edge.eval import llama_cpp_perplexity
    from diffulex_edge.export import export_gguf

    d, text_path, model, tok = setup
    cfg = AutoConfig.from_pretrained(MODEL)
    cfg.rope_parameters = {**rope, "rope_theta": 10000.0}
    scaled = AutoModelForCausalLM.from_pretrained(MODEL, config=cfg, dtype=torch.float32).eval()
    path = d / f"rope-{rope['rope_type']}.gguf"
    export_gguf(scaled, path, quant="F32", tokenizer=tok)
    ids, chunks = text_ids(tok, text_path)
    ppl_llama = llama_perplexity(path, text_path, chunks)
    ours = llama_cpp_perplexity(scaled, ids, n_ctx=CTX, max_chunks=chunks).perplexity
    plain = llama_cpp_perplexity(model, ids, n_ctx=CTX, max_chunks=chunks).perplexity
    # F32 weights: only llama.cpp's f16 K/V cache and summation order differ (measured ~1e-6
    # relative); 0.2% is far below the scaled-vs-unscaled gap asserted first
    assert abs(ours / plain - 1) > 0.008, (ours, plain)
    assert ppl_llama == pytest.approx(ours, rel=0.002), (ppl_llama, ours, plain)


def ggml_quantizer():
    """llama.cpp's own row quantizer (`ggml_quantize_chunk` of the build's libggml-base)."""
    import ctypes

    path = Path(BIN) / "libggml-base.so"
    if not path.exists():
        pytest.skip(f"{path} not built")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


IQ_TYPES = ["IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]


@pytest.mark.parametrize("t", IQ_TYPES)
@pytest.mark.parametrize("kind", ["gauss", "student_t4"])
def test_iq_error_vs_ggml(t, kind):
    """Our lattice quantizers vs llama.cpp's on the same rows and importance matrix: the
    importance-weighted error is no larger (measured 5-8% lower on this data)."""
    import numpy as np
    from gguf import GGMLQuantizationType as GQT
    from gguf import quants as gq

    from diffulex_edge.gguf import GGML_TYPES, dequantize, quantize

    lib = ggml_quantizer()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 2048)) if kind == "gauss" else rng.standard_t(4, (32, 2048))
    x = x.astype(np.float32)
    imp = (rng.uniform(0.2, 3, 2048) ** 2).astype(np.float32)
    info = GGML_TYPES[t]
    lib.ggml_quantize_init(info.id)
    out = np.zeros(32 * info.row_bytes(2048), np.uint8)
    lib.ggml_quantize_chunk(info.id, x.ctypes.data, out.ctypes.data, 0, 32, 2048, imp.ctypes.data)
    theirs = gq.dequantize(out, GQT[t]).reshape(x.shape)
    ours = dequantize(quantize(x, t, imatrix=imp), t)
    werr = lambda y: float((((y - x) ** 2) * imp).sum())  # noqa: E731
    assert werr(ours) <= werr(theirs), (werr(ours), werr(theirs))


MIXES_TO_CHECK = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
                  "Q2_K", "Q3_K_M", "Q4_K_M", "IQ4_XS", "Q4_0"]


@pytest.mark.parametrize("n_kv", [1, 4])
def test_mix_plans_choose_llama_quantize_types(tmp_path, n_kv):
    """For every mix, `plan_gguf` picks the type llama-quantize picks for each tensor (same
    imatrix; grouped-query and plain attention; ffn_down rows of 576 exercise the fallbacks)."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from diffulex_edge.calib import compute_imatrix
    from diffulex_edge.export.gguf_export import export_gguf, plan_gguf

    quantize_tool = tool("llama-quantize")
    tok = AutoTokenizer.from_pretrained(MODEL)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=576, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=n_kv, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    export_gguf(model, tmp_path / "f32.gguf", quant="F32", tokenizer=tok)
    compute_imatrix(model, [torch.randint(0, len(tok), (1, 64)) for _ in range(4)]).save(tmp_path / "im.gguf")
    for mix in MIXES_TO_CHECK:
        run(quantize_tool, "--imatrix", str(tmp_path / "im.gguf"), str(tmp_path / "f32.gguf"), str(tmp_path / "o.gguf"),
            mix)
        theirs = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "o.gguf").tensors}
        ours = {t.gguf_name: t.ggml_type for t in plan_gguf(model, mix, imatrix=tmp_path / "im.gguf", tokenizer=tok).tensors}
        assert ours == theirs, (mix, {k: (ours.get(k), v) for k, v in theirs.items() if ours.get(k) != v})

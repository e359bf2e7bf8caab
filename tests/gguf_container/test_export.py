"""export_gguf on tiny randomly initialised HF models (nothing downloaded), read back with gguf-py."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf import quants as gq
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from diffulex_edge.errors import ConfigError, NonFiniteWeightError, UnsupportedFormatError
from diffulex_edge.export import export_gguf
from diffulex_edge.export.gguf_export import gguf_tensor_name, permute_qk
from diffulex_edge.gguf import GGUFFile, dequantize, quantize


def tiny_llama(hidden=256, inter=512, layers=2, tie=False, vocab=320):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, rms_norm_eps=1e-6)
    return LlamaForCausalLM(cfg).eval()


def fields(r):
    return {k: f.contents() for k, f in r.fields.items()}


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q8_0", "Q6_K", "Q2_K", "Q3_K_M", "Q4_K_S", "Q5_K_M", "IQ4_XS", "TQ1_0", "TQ2_0",
                                   "IQ1_S", "IQ2_M", "IQ3_XXS"])
def test_gguf_py_reads_export(tmp_path, quant):
    model = tiny_llama()
    p = tmp_path / f"m-{quant}.gguf"
    rep = export_gguf(model, p, quant=quant)
    r = GGUFReader(str(p))
    md = fields(r)
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == 2 and md["llama.embedding_length"] == 256
    assert md["llama.attention.head_count"] == 4 and md["llama.attention.head_count_kv"] == 2
    assert md["llama.rope.dimension_count"] == 64 and md["llama.context_length"] == 128
    assert abs(md["llama.attention.layer_norm_rms_epsilon"] - 1e-6) < 1e-12
    ours = GGUFFile.read(p)
    by_name = {t.name: t for t in r.tensors}
    assert set(by_name) == set(ours.tensors) == {t.name for t in rep.tensors}
    assert len(by_name) == 2 + 1 + 2 * 9  # embd, output_norm, output + 9 per layer
    state = model.state_dict()
    for hf_name, w in state.items():
        g = gguf_tensor_name(hf_name)
        t = by_name[g]
        info = ours.tensors[g]
        assert t.tensor_type.name == info.ggml_type
        assert tuple(int(d) for d in t.shape) == info.dims
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(raw, ours.tensor_bytes(g))
        ref = gq.dequantize(np.asarray(t.data), t.tensor_type).reshape(info.shape)
        np.testing.assert_array_equal(ref, ours.tensor(g))
        a = w.float().numpy()
        if g.endswith("attn_q.weight"):
            a = permute_qk(a, 4, 4)
        elif g.endswith("attn_k.weight"):
            a = permute_qk(a, 4, 2)
        np.testing.assert_array_equal(ours.tensor_bytes(g), quantize(a, info.ggml_type).reshape(-1))
    assert rep.bits_per_weight > 0
    types = rep.type_counts()
    if quant == "Q4_K_M":
        assert by_name["output.weight"].tensor_type.name == "Q6_K"
        assert by_name["blk.1.attn_v.weight"].tensor_type.name == "Q6_K"  # use_more_bits(1, 2)
        assert by_name["blk.0.attn_q.weight"].tensor_type.name == "Q4_K"
        assert by_name["output_norm.weight"].tensor_type.name == "F32"
    if quant in ("TQ1_0", "TQ2_0"):
        assert by_name["token_embd.weight"].tensor_type.name == "Q4_K"
        assert types[quant] == 14
    if quant == "IQ1_S":  # llama.cpp's low-bit rules (tests/gguf_container/test_llama_cpp.py checks all of them)
        assert by_name["output.weight"].tensor_type.name == "Q5_K"
        assert by_name["token_embd.weight"].tensor_type.name == "Q2_K"
        assert by_name["blk.0.attn_output.weight"].tensor_type.name == "IQ2_XXS"
        assert by_name["blk.1.attn_q.weight"].tensor_type.name == "IQ1_S"
    if quant == "IQ2_M":
        assert by_name["blk.1.ffn_up.weight"].tensor_type.name == "IQ2_S"
    assert md["general.file_type"] > 0


def test_low_bit_mix_without_imatrix_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        export_gguf(tiny_llama(), tmp_path / "m.gguf", quant="IQ2_XXS")
    assert "refuses this mix without" in caplog.text and "imatrix" in caplog.text


def test_permutation_matches_rope_conventions():
    """HF applies rotary to (i, i + d/2) pairs; llama.cpp to (2i, 2i+1). After permute_qk the
    attention scores must be identical."""
    rng = np.random.default_rng(0)
    n_head, d, hidden = 4, 16, 64
    wq = rng.standard_normal((n_head * d, hidden)).astype(np.float64)
    x = rng.standard_normal(hidden)
    theta = 10000.0 ** (-np.arange(d // 2) * 2 / d)
    pos = 7
    ang = pos * theta

    def rope_hf(q):
        q1, q2 = q[: d // 2], q[d // 2:]
        return np.concatenate([q1 * np.cos(ang) - q2 * np.sin(ang), q2 * np.cos(ang) + q1 * np.sin(ang)])

    def rope_ggml(q):
        a, b = q[0::2], q[1::2]
        out = np.empty_like(q)
        out[0::2] = a * np.cos(ang) - b * np.sin(ang)
        out[1::2] = b * np.cos(ang) + a * np.sin(ang)
        return out

    q_hf = (wq @ x).reshape(n_head, d)
    q_gg = (permute_qk(wq, n_head, n_head) @ x).reshape(n_head, d)
    for h in range(n_head):
        r1, r2 = rope_hf(q_hf[h]), rope_ggml(q_gg[h])
        np.testing.assert_allclose(r2[0::2], r1[: d // 2], atol=1e-12)
        np.testing.assert_allclose(r2[1::2], r1[d // 2:], atol=1e-12)


def test_fallback_overrides_and_tied(tmp_path):
    model = tiny_llama(hidden=96, inter=160, tie=True)  # rows not multiples of 256
    p = tmp_path / "fb.gguf"
    rep = export_gguf(model, p, quant="Q4_K_M", overrides={r"ffn_up": "Q8_0"})
    f = GGUFFile.read(p)
    types = {t.name: t.ggml_type for t in f}
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["token_embd.weight"] == "Q8_0"  # output rule, 96 % 256 != 0 -> Q8_0
    assert types["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K fallback
    assert types["blk.0.ffn_up.weight"] == "Q8_0"  # override
    assert types["blk.0.ffn_down.weight"] in ("Q8_0", "Q5_0")  # Q6_K/Q4_K fallbacks (row 160)
    assert any("fallback" in t.reason for t in rep.tensors)
    assert "bits/weight" in str(rep)
    GGUFReader(str(p))


def test_imatrix_changes_weighted_error(tmp_path):
    model = tiny_llama()
    rng = np.random.default_rng(0)
    imat = {"blk.0.ffn_gate.weight": np.exp(rng.standard_normal(256) * 2).astype(np.float32)}
    p1, p2 = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export_gguf(model, p1, quant="Q4_K_M")
    export_gguf(model, p2, quant="Q4_K_M", imatrix=imat)
    w = model.model.layers[0].mlp.gate_proj.weight.detach().numpy()
    imp = imat["blk.0.ffn_gate.weight"]
    err = lambda p: float((((GGUFFile.read(p).tensor("blk.0.ffn_gate.weight") - w) ** 2) * imp).sum())
    assert err(p2) < err(p1)


def test_qwen2_export(tmp_path):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).eval()
    p = tmp_path / "q.gguf"
    export_gguf(model, p, quant="Q8_0")
    r = GGUFReader(str(p))
    md = fields(r)
    assert md["general.architecture"] == "qwen2" and md["qwen2.block_count"] == 1
    names = {t.name for t in r.tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    # no permutation for qwen2
    f = GGUFFile.read(p)
    w = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(f.tensor_bytes("blk.0.attn_q.weight"), quantize(w, "Q8_0").reshape(-1))


def test_tokenizer_metadata(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4, "Ġ": 5}
    bpe = tokenizers.models.BPE(vocab=vocab, merges=[("a", "b")])
    tk = tokenizers.Tokenizer(bpe)
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    model = tiny_llama(vocab=8)
    p = tmp_path / "t.gguf"
    export_gguf(model, p, quant="Q8_0", tokenizer=tok)
    md = fields(GGUFReader(str(p)))
    assert md["tokenizer.ggml.model"] == "gpt2"
    assert md["tokenizer.ggml.tokens"][:5] == ["<s>", "</s>", "a", "b", "ab"]
    assert len(md["tokenizer.ggml.tokens"]) == 8 and md["tokenizer.ggml.tokens"][7] == "[PAD7]"
    assert md["tokenizer.ggml.merges"] == ["a b"]
    assert md["tokenizer.ggml.bos_token_id"] == 0 and md["tokenizer.ggml.eos_token_id"] == 1
    assert md["tokenizer.ggml.token_type"][0] == 3 and md["tokenizer.ggml.token_type"][2] == 1
    # llama.cpp splits text with the GPT-2 regex only under "gpt-2" ("default" uses other regexes)
    assert md["tokenizer.ggml.pre"] == "gpt-2"
    # this tokenizer adds no BOS/EOS; llama.cpp must be told so
    assert md["tokenizer.ggml.add_bos_token"] is False and md["tokenizer.ggml.add_eos_token"] is False


def test_bpe_pre_tokenizer_names():
    from diffulex_edge.export.gguf_tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT, bpe_pre_tokenizer

    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert bpe_pre_tokenizer({"pre_tokenizer": bl}) == "gpt-2"
    assert bpe_pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [bl]}}) == "gpt-2"
    for rx, name in ((_LLAMA3_SPLIT, "llama-bpe"), (_QWEN2_SPLIT, "qwen2")):
        seq = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False},
            dict(bl, use_regex=False)]}
        assert bpe_pre_tokenizer({"pre_tokenizer": seq}) == name
    for bad in (None, {"type": "Whitespace"}, dict(bl, add_prefix_space=True),
                {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "x+"}}, dict(bl, use_regex=False)]}):
        with pytest.raises(UnsupportedFormatError):
            bpe_pre_tokenizer({"pre_tokenizer": bad})


def test_bad_arguments(tmp_path):
    model = tiny_llama()
    with pytest.raises(ConfigError, match="Q4_K_M"):
        export_gguf(model, tmp_path / "x.gguf", quant="Q4_K_Z")
    with pytest.raises(ConfigError):
        export_gguf(model, tmp_path / "x.gguf", overrides={"attn": "Q9"})
    with pytest.raises(UnsupportedFormatError):
        export_gguf(torch.nn.Linear(2, 2), tmp_path / "x.gguf")


@pytest.mark.parametrize("tie", [False, True])
def test_load_gguf_weights_inverts_export(tmp_path, tie):
    from diffulex_edge.export import load_gguf_weights

    model = tiny_llama(tie=tie)  # 4 query heads, 2 KV heads: both permutations differ
    p = tmp_path / "m.gguf"
    export_gguf(model, p, quant="F32")
    other = tiny_llama(tie=tie)
    with torch.no_grad():
        for t in other.parameters():
            t.normal_()
    load_gguf_weights(other, p)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.arange(20).unsqueeze(0)
    assert torch.equal(model(ids).logits, other(ids).logits)
    # quantized: the loaded weights are the file's dequantized values
    export_gguf(model, p, quant="Q8_0")
    load_gguf_weights(other, p)
    w = other.model.layers[1].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_array_equal(w, GGUFFile.read(p).tensor("blk.1.ffn_down.weight"))
    with pytest.raises(UnsupportedFormatError):
        load_gguf_weights(torch.nn.Linear(2, 2), p)


def rope_llama(rope, theta=10000.0):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      rope_scaling={**rope, "rope_theta": theta}, rope_theta=theta)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("theta,orig", [(10000.0, 256), (500000.0, 8192)])
def test_llama3_rope_factors_match_transformers(tmp_path, theta, orig):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": orig}
    model = rope_llama(rope, theta)
    p = tmp_path / "m.gguf"
    rep = export_gguf(model, p, quant="Q8_0")
    assert rep.tensors[-1].name == "rope_freqs.weight" and rep.tensors[-1].ggml_type == "F32"
    ours = GGUFFile.read(p).tensor("rope_freqs.weight")
    # transformers' llama3 inverse frequencies vs the unscaled ones: their ratio is the divisor
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    plain = 1.0 / (theta ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    ref = (plain / scaled).numpy()
    assert ours.shape == (32,) and {1.0, 8.0} <= set(ours.tolist())  # both plateaus and the blend
    assert ((ours > 1) & (ours < 8)).any() or orig == 8192
    # float32 ratio of two float32 frequencies: a few ulp
    np.testing.assert_allclose(ours, ref, rtol=4 * np.finfo(np.float32).eps)
    md = fields(GGUFReader(str(p)))
    assert "llama.rope.scaling.type" not in md  # llama.cpp takes llama3 scaling from rope_freqs alone
    assert GGUFReader(str(p)).get_tensor(len(rep.tensors) - 1).name == "rope_freqs.weight"


def test_yarn_and_linear_rope_metadata(tmp_path):
    p = tmp_path / "m.gguf"
    export_gguf(rope_llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}), p, quant="F16")
    md = fields(GGUFReader(str(p)))
    assert md["llama.rope.scaling.type"] == "yarn" and md["llama.rope.scaling.factor"] == 4.0
    assert md["llama.rope.scaling.original_context_length"] == 256
    assert "rope_freqs.weight" not in GGUFFile.read(p).tensors
    export_gguf(rope_llama({"rope_type": "linear", "factor": 2.0}), p, quant="F16")
    md = fields(GGUFReader(str(p)))
    assert md["llama.rope.scaling.type"] == "linear" and md["llama.rope.scaling.factor"] == 2.0


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 16.0}, "beta_fast"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "attention_factor": 1.5},
     "attention_factor"),
    ({"rope_type": "dynamic", "factor": 2.0}, "dynamic"),
])
def test_rope_scaling_llama_cpp_cannot_run_is_refused(tmp_path, rope, match):
    p = tmp_path / "m.gguf"
    with pytest.raises(UnsupportedFormatError, match=match):
        export_gguf(rope_llama(rope), p, quant="F16")
    assert not p.exists()


def test_bad_llama3_rope_parameters(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256}
    model = rope_llama({"rope_type": "default"})
    model.config.rope_parameters = rope  # transformers would refuse it at construction; a hand edit
    with pytest.raises(ConfigError, match="high_freq_factor"):
        export_gguf(model, tmp_path / "m.gguf", quant="F16")


def test_export_streams_and_a_failure_leaves_the_old_file(tmp_path):
    model = tiny_llama()
    p = tmp_path / "m.gguf"
    rep = export_gguf(model, p, quant="Q8_0", show_progress=False)
    before = p.read_bytes()
    # tensors are written in the announced order, offsets follow the header (gguf-py agrees)
    r = GGUFReader(str(p))
    assert [t.name for t in r.tensors] == [t.name for t in rep.tensors]
    bad = tiny_llama()
    with torch.no_grad():
        bad.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")  # late in the stream
    with pytest.raises(NonFiniteWeightError) as ei:
        export_gguf(bad, p, quant="Q8_0", show_progress=False)
    assert ei.value.layer == "blk.1.ffn_up.weight" and "model.layers.1.mlp.up_proj.weight" in str(ei.value)
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left
    # the same error when the weight goes to a float type (F32 norms, or an F16 override)
    bad = tiny_llama()
    with torch.no_grad():
        bad.model.layers[0].input_layernorm.weight[7] = float("inf")
        bad.model.layers[1].self_attn.v_proj.weight[0, 1] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="as F32: .*first at index \\(7,\\) \\(value inf\\)") as ei:
        export_gguf(bad, p, quant="Q8_0", show_progress=False)
    assert ei.value.layer == "blk.0.attn_norm.weight"
    with torch.no_grad():
        bad.model.layers[0].input_layernorm.weight[7] = 1.0
    with pytest.raises(NonFiniteWeightError, match="as F16: .*first at index \\(0, 1\\) \\(value nan\\)"):
        export_gguf(bad, p, quant="Q8_0", overrides={"attn_v": "F16"}, show_progress=False)
    assert p.read_bytes() == before


def test_stream_writer_api(tmp_path):
    from diffulex_edge.gguf import GGUFWriter

    w = GGUFWriter(tmp_path / "s.gguf")
    w.add("general.architecture", "llama")
    a = np.arange(64, dtype=np.float32).reshape(2, 32)
    with w.stream([("a", a.shape, "Q8_0"), ("b", (3,), "F32")]) as s:
        assert s.next_tensor == "a"
        with pytest.raises(ConfigError, match="out of order"):
            s.write_tensor("b", np.zeros(3, np.float32))
        s.write_tensor("a", quantize(a, "Q8_0"))
        s.write_tensor("b", np.array([1, 2, 3], np.float32))
    f = GGUFFile.read(tmp_path / "s.gguf")
    np.testing.assert_array_equal(f.tensor("a"), dequantize(quantize(a, "Q8_0"), "Q8_0", shape=a.shape))
    np.testing.assert_array_equal(f.tensor("b"), [1, 2, 3])
    with pytest.raises(ConfigError, match="missing"):
        with w.stream([("a", a.shape, "Q8_0"), ("b", (3,), "F32")], path=tmp_path / "t.gguf") as s:
            s.write_tensor("a", quantize(a, "Q8_0"))
    assert not (tmp_path / "t.gguf").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s.gguf"]


def test_quantized_or_incomplete_models_are_refused(tmp_path):
    from diffulex_edge.quant import INT8Quantizer, QuantizationConfig, dequantize_model

    model = tiny_llama()
    q = INT8Quantizer().quantize(model, QuantizationConfig(dtype="int8")).model
    p = tmp_path / "m.gguf"
    with pytest.raises(UnsupportedFormatError, match="dequantize_model") as ei:
        export_gguf(q, p, quant="Q8_0")
    assert ei.value.layer == "model.layers.0.self_attn.q_proj" and not p.exists()
    rep = export_gguf(dequantize_model(q), p, quant="Q8_0")  # the documented fix works
    assert any(t.name == "blk.1.ffn_down.weight" for t in rep.tensors)
    # parameters under names llama.cpp does not know (an adapter wrapper): refused, naming both sides
    wrapped = tiny_llama()
    layer = wrapped.model.layers[1].mlp
    layer.up_proj = torch.nn.Sequential(layer.up_proj)
    with pytest.raises(ConfigError, match=r"blk\.1\.ffn_up\.weight.*model\.layers\.1\.mlp\.up_proj\.0\.weight"):
        export_gguf(wrapped, tmp_path / "w.gguf", quant="Q8_0")
    assert not (tmp_path / "w.gguf").exists()


@pytest.mark.parametrize("fmt", ["q4_K", "q6_K", "iq4_xs", "q8_0", "tq2_0", "fp16"])
def test_quantized_layers_export_their_bytes(tmp_path, fmt):
    """A model quantized in PyTorch to a GGUF type exports its layers' bytes unchanged (no second
    quantization): the file's tensor of each layer is the layer's storage (Q/K rows permuted as
    llama.cpp wants), and gguf-py decodes it to the weights the PyTorch model computes with."""
    from diffulex_edge.quant import QuantizedLinear, quantize_

    model = tiny_llama()
    quantize_(model, fmt)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 2 * 7 + 1  # every projection and the (untied) lm_head
    p = tmp_path / "m.gguf"
    rep = export_gguf(model, p, quant="Q4_K_M")
    tensors = {t.name: t for t in GGUFReader(p).tensors}
    n_head, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    for name, layer in layers.items():
        gname = gguf_tensor_name(f"{name}.weight")
        t = tensors[gname]
        want_type = {"fp16": "F16"}.get(fmt, fmt.upper())
        assert t.tensor_type.name == want_type, gname
        stored = layer._storage().view(torch.uint8).numpy()
        w = layer.dequantize_weight().numpy()
        if gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = n_head if gname.endswith("attn_q.weight") else n_kv
            stored, w = permute_qk(stored, n_head, heads), permute_qk(w, n_head, heads)
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(stored.shape), stored), gname
        np.testing.assert_array_equal(gq.dequantize(t.data, t.tensor_type).reshape(w.shape), w)
        assert "as stored" in next(r.reason for r in rep.tensors if r.name == gname)
    # tensors the model did not quantize (embeddings, norms) follow the mix
    assert tensors["token_embd.weight"].tensor_type.name != "F32"


def test_plan_edits_re_encode_stored_layers_and_other_formats_are_refused(tmp_path):
    from diffulex_edge.export import plan_gguf, write_gguf
    from diffulex_edge.quant import quantize_

    model = tiny_llama()
    quantize_(model, "q4_K")
    plan = plan_gguf(model, "Q4_K_M")
    i = next(i for i, t in enumerate(plan.tensors) if t.gguf_name == "blk.0.ffn_down.weight")
    plan.tensors[i] = plan.tensors[i]._replace(ggml_type="Q8_0", reason="mine")
    write_gguf(plan, tmp_path / "m.gguf")
    f = GGUFFile.read(tmp_path / "m.gguf")
    layer = model.model.layers[0].mlp.down_proj
    w = layer.dequantize_weight().numpy()
    np.testing.assert_array_equal(f.tensor("blk.0.ffn_down.weight"), dequantize(quantize(w, "Q8_0"), "Q8_0", w.shape))
    nf4 = tiny_llama()
    quantize_(nf4, "nf4")
    with pytest.raises(UnsupportedFormatError, match="nf4 has no GGUF tensor type") as ei:
        export_gguf(nf4, tmp_path / "n.gguf")
    assert ei.value.layer == "model.layers.0.self_attn.q_proj" and not (tmp_path / "n.gguf").exists()


def test_bare_tokenizers_tokenizer_gives_the_same_vocabulary():
    from pathlib import Path

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from diffulex_edge.export.gguf_tokenizer import tokenizer_metadata

    d = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama-wikitext"
    wrapped = {k: v for k, v, _ in tokenizer_metadata(AutoTokenizer.from_pretrained(d), 2048)}
    bare = {k: v for k, v, _ in tokenizer_metadata(Tokenizer.from_file(str(d / "tokenizer.json")), 2048)}
    assert set(bare) == {"tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.merges", "tokenizer.ggml.tokens",
                         "tokenizer.ggml.token_type"}
    for k, v in bare.items():
        assert wrapped[k] == v, k


def test_plan_then_write_is_export_and_plans_can_be_edited(tmp_path):
    from diffulex_edge.errors import ShapeError
    from diffulex_edge.export import plan_gguf, write_gguf

    model = tiny_llama()
    a, b, c = (tmp_path / n for n in ("a.gguf", "b.gguf", "c.gguf"))
    report = export_gguf(model, a, quant="Q4_K_M")
    plan = plan_gguf(model, "q4_k_m")
    assert [(p.gguf_name, p.ggml_type) for p in plan.tensors] == [(t.name, t.ggml_type) for t in report.tensors]
    assert plan.nbytes == sum(t.nbytes for t in report.tensors)  # the plan knows the size before encoding
    assert "Q4_K" in repr(plan) and sum(plan.type_counts().values()) == len(plan.tensors)
    write_gguf(plan, b)
    assert a.read_bytes() == b.read_bytes()
    # a hand-edited plan: one tensor in Q8_0 instead
    i = next(i for i, p in enumerate(plan.tensors) if p.gguf_name == "blk.0.ffn_down.weight")
    plan.tensors[i] = plan.tensors[i]._replace(ggml_type="Q8_0", reason="by hand")
    edited = write_gguf(plan, c)
    assert GGUFFile.read(c).tensors["blk.0.ffn_down.weight"].ggml_type == "Q8_0"
    assert [t.reason for t in edited.tensors if t.name == "blk.0.ffn_down.weight"] == ["by hand"]
    plan.tensors[i] = plan.tensors[i]._replace(ggml_type="Q9_9")
    with pytest.raises(UnsupportedFormatError, match="blk.0.ffn_down.weight: unknown GGML type 'Q9_9'"):
        write_gguf(plan, tmp_path / "d.gguf")  # the error gguf.quantize gives for an unknown type
    plan.tensors[i] = plan.tensors[i]._replace(ggml_type="Q4_K", shape=(4, 100))
    with pytest.raises(ShapeError, match="multiple of 256"):
        write_gguf(plan, tmp_path / "d.gguf")
    assert not (tmp_path / "d.gguf").exists()

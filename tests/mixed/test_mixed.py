"""Mixed precision: profiles (files, matching, application to PyTorch layers and to GGUF
tensors), the sensitivity analysis (measured KL, checkpoint/resume) and the solver (exact up to
its stated rounding, infeasible targets, quality targets), and the CLI flags."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import LlamaConfig, LlamaForCausalLM

from diffulex_edge import cli
from diffulex_edge.errors import ConfigError
from diffulex_edge.export import export_gguf
from diffulex_edge.mixed import InfeasibleTargetError, SensitivityReport, TensorSensitivity, analyze_sensitivity, solve
from diffulex_edge.mixed.solver import _options
from diffulex_edge.quant import (
    PRESETS,
    DynamicQuantizationProfile,
    LayerQuantizationConfig,
    QuantizedLinear,
    load_quantized,
    quantize_,
    save_quantized,
)


def tiny(hidden=256, inter=512, layers=2, vocab=320, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def windows(vocab=320, n=2, seq=32):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, seq), generator=g) for _ in range(n)]


PROFILE = DynamicQuantizationProfile(
    "test", [LayerQuantizationConfig("*.self_attn.v_proj", "q8_0"), LayerQuantizationConfig("*.self_attn.*", "q6_K"),
             LayerQuantizationConfig("lm_head", "float")], default="q4_K")


def test_first_matching_rule_wins_and_default_applies():
    m = tiny()
    a = PROFILE.assign(m)
    assert a["model.layers.0.self_attn.v_proj"] == "q8_0"
    assert a["model.layers.1.self_attn.q_proj"] == "q6_K"
    assert a["model.layers.0.mlp.down_proj"] == "q4_K"
    assert a["lm_head"] is None


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_profile_files_round_trip(tmp_path, suffix):
    p = tmp_path / f"plan{suffix}"
    PROFILE.save(p)
    back = DynamicQuantizationProfile.load(p)
    assert back.to_dict() == PROFILE.to_dict()
    assert back.assign(tiny()) == PROFILE.assign(tiny())


def test_bad_profiles_are_refused_with_the_rule_named(tmp_path):
    with pytest.raises(ConfigError, match="mlp"):
        LayerQuantizationConfig("*.mlp.*", "q9_X")
    with pytest.raises(ConfigError, match="unknown key"):
        DynamicQuantizationProfile.from_dict({"name": "x", "layers": [{"pattern": "a", "fmt": "q4_K"}]})
    with pytest.raises(ConfigError, match="unknown profile key"):
        DynamicQuantizationProfile.from_dict({"name": "x", "rules": []})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot parse"):
        DynamicQuantizationProfile.load(bad)


def test_apply_profile_quantizes_each_layer_to_its_format_and_round_trips(tmp_path):
    m = tiny()
    ids = windows()[0]
    res = quantize_(m, PROFILE)
    assert res.profile is PROFILE and "mixed" in repr(res)
    for name, fmt in PROFILE.assign(tiny()).items():
        mod = m.get_submodule(name)
        if fmt is None:
            assert isinstance(mod, torch.nn.Linear) and not isinstance(mod, QuantizedLinear)
        else:
            assert isinstance(mod, QuantizedLinear) and str(mod.qdtype) == fmt
    with torch.no_grad():
        want = m(ids).logits
    save_quantized(m, tmp_path / "m.safetensors")
    m2 = tiny(seed=5)
    load_quantized(tmp_path / "m.safetensors", m2)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, want, rtol=0, atol=0)


def test_a_format_that_does_not_fit_is_refused_before_any_change():
    m = tiny(inter=320)  # down_proj in_features 320: not a multiple of 256
    before = {n: type(x) for n, x in m.named_modules()}
    with pytest.raises(Exception, match="down_proj"):
        quantize_(m, DynamicQuantizationProfile("p", [LayerQuantizationConfig("*.mlp.down_proj", "q4_K")], "q8_0"))
    assert {n: type(x) for n, x in m.named_modules()} == before


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_apply(name):
    res = quantize_(tiny(), name)
    assert res.num_quantized_layers > 0


def test_export_gguf_writes_the_profile_types(tmp_path):
    m = tiny()
    prof = DynamicQuantizationProfile("g", [LayerQuantizationConfig("*.mlp.*", "iq2_xxs"),
                                            LayerQuantizationConfig("model.embed_tokens", "q8_0")], default=None)
    export_gguf(m, tmp_path / "m.gguf", quant="Q4_K_M", profile=prof)
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_up.weight"] == types["blk.1.ffn_down.weight"] == "IQ2_XXS"
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q4_K"  # not in the profile: the mix decides
    with pytest.raises(ConfigError, match="no GGUF type"):
        export_gguf(m, tmp_path / "x.gguf", profile=DynamicQuantizationProfile("n", [], default="nf4"))


def test_sensitivity_measures_kl_and_resumes_from_its_checkpoint(tmp_path):
    m = tiny()
    w = windows()
    ck = tmp_path / "sens.json"
    full = analyze_sensitivity(m, w, candidates=("Q8_0", "Q4_K", "Q2_K"), checkpoint=ck)
    names = [t.name for t in full.tensors]
    assert "model.embed_tokens" in names and "lm_head" in names and len(names) == 2 + 2 * 7
    for t in full.tensors:
        ref = t.measured["Q2_K"]
        assert ref > 0 and set(t.measured) == {"Q2_K"}
        assert t.kl["Q8_0"] < t.kl["Q4_K"] < t.kl["Q2_K"] == ref
    # an interrupted run: a checkpoint holding the first 5 tensors resumes to the same report
    d = json.loads(ck.read_text())
    d["tensors"] = d["tensors"][:5]
    ck.write_text(json.dumps(d))
    again = analyze_sensitivity(m, w, candidates=("Q8_0", "Q4_K", "Q2_K"), checkpoint=ck)
    assert again.to_dict()["tensors"] == full.to_dict()["tensors"]
    # the model is left as it was
    with torch.no_grad():
        torch.testing.assert_close(m(w[0]).logits, tiny()(w[0]).logits, rtol=0, atol=0)


def test_measure_all_measures_every_candidate():
    rep = analyze_sensitivity(tiny(layers=1), windows(n=1), candidates=("Q8_0", "Q2_K"), measure="all")
    assert all(set(t.measured) == {"Q8_0", "Q2_K"} for t in rep.tensors)


def random_report(n=6, seed=0):
    rng = np.random.default_rng(seed)
    tensors = []
    for i in range(n):
        cands = ["Q8_0", "Q4_K", "Q2_K", "IQ1_S"]
        size = int(rng.integers(1, 5)) * 256 * 64
        nbytes = {c: int(size * b / 8) for c, b in zip(cands, (8.5, 4.5, 2.625, 1.5625))}
        base = float(rng.uniform(0.01, 1))
        kl = {c: base * f for c, f in zip(cands, (0.001, 0.05, 0.4, 2.0))}
        t = TensorSensitivity(f"t{i}", (64, size // 64), cands, nbytes, dict(kl), kl, {"IQ1_S": kl["IQ1_S"]})
        tensors.append(t)
    return SensitivityReport(tensors, 100)


@pytest.mark.parametrize("seed", range(4))
def test_solver_is_optimal_up_to_its_rounding(seed):
    rep = random_report(seed=seed)
    opts = _options(rep)
    plans = []
    for picks in itertools.product(*[range(len(o[1])) for o in opts]):
        plans.append((sum(int(o[2][j]) for o, j in zip(opts, picks)), sum(float(o[3][j]) for o, j in zip(opts, picks))))
    lo, hi = min(p[0] for p in plans), max(p[0] for p in plans)
    resolution = 2000
    for budget in np.linspace(lo, hi, 7).astype(int):
        got = solve(rep, target_bytes=int(budget), resolution=resolution)
        assert got.bytes <= budget
        # every plan that fits with room for the per-tensor rounding (n units) is no better
        slack = len(opts) * budget / resolution
        best_with_slack = min((kl for b, kl in plans if b <= budget - slack), default=np.inf)
        assert got.est_kl <= best_with_slack + 1e-12
        assert got.est_kl >= min(kl for b, kl in plans if b <= budget) - 1e-12


def test_infeasible_and_quality_targets():
    rep = random_report()
    with pytest.raises(InfeasibleTargetError, match="smallest assignment") as e:
        solve(rep, target_bpw=1.0)
    assert e.value.nearest and e.value.nearest[0].bits_per_weight == pytest.approx(1.5625)
    with pytest.raises(InfeasibleTargetError) as e:
        solve(rep, max_kl=1e-9)
    plan = solve(rep, max_kl=0.5)
    assert plan.est_kl <= 0.5
    smaller = solve(rep, target_bytes=plan.bytes - 4096)
    assert smaller.est_kl > 0.5 - 1e-9 or smaller.bytes >= plan.bytes  # the smallest plan under the quality target
    assert plan.frontier and "bits/weight" in repr(plan) and "est. KL" in plan.table(3) and "<table>" in plan._repr_html_()
    prof = plan.to_profile("p")
    assert all(r.format == r.format.lower() or "K" in r.format for r in prof.layers)


def test_cli_quantize_with_a_plan_and_gguf_with_a_target(tmp_path):
    from pathlib import Path

    model_dir = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama-wikitext"
    out = tmp_path / "q"
    assert cli.main(["quantize", str(model_dir), "-o", str(out), "--plan", "int8-with-fp16-edges"]) == 0
    g = tmp_path / "m.gguf"
    assert cli.main(["gguf", str(model_dir), "-o", str(g), "--target-bpw", "5.0", "--calibration", "wikitext2-valid"]) == 0
    prof = DynamicQuantizationProfile.load(str(g) + ".plan.yaml")
    assert prof.layers and (tmp_path / "m.gguf.sensitivity.json").exists()
    types = {t.name: t.tensor_type.name for t in GGUFReader(g).tensors}
    assert {"Q8_0", "IQ4_NL"} & set(types.values())
    assert cli.main(["gguf", str(model_dir), "-o", str(g), "--target-bpw", "3.0", "--calibration", "wikitext2-valid"]) != 0


def test_a_low_bit_plan_gets_one_coherence_check():
    res = quantize_(tiny(), "dynamic-1bit")
    assert res.coherence is not None and res.coherence.tokens > 0
    assert quantize_(tiny(), "attention-high-precision").coherence is None


def test_compare_schemes_takes_plans_beside_uniform_schemes():
    from diffulex_edge.eval import compare_schemes

    m = tiny()
    ids = torch.cat(windows(n=4, seq=64), dim=1)[0]
    rep = compare_schemes(m, ["fp32", "q4_K", PROFILE, "attention-high-precision"], eval_text=ids, seq_len=64,
                          latency_repetitions=0)
    labels = [r.label for r in rep.rows]
    assert labels == ["fp32", "q4_K", "plan:test", "plan:attention-high-precision"]
    assert all(not isinstance(x, QuantizedLinear) for x in m.modules())  # the model itself is untouched
    by = {r.label: r for r in rep.rows}
    assert by["plan:test"].num_quantized_layers == 14 and by["plan:test"].kl_divergence > 0


def test_plots():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    rep = random_report()
    ax = rep.plot()
    assert len(ax.patches) == len(rep.tensors)
    plan = solve(rep, target_bpw=3.0)
    ax = plan.plot_frontier()
    assert len(ax.lines) == 2 and "<table>" in rep._repr_html_()


@pytest.mark.parametrize("mix", ["Q4_K_M", "IQ2_XS", "Q3_K_M"])
def test_a_llama_cpp_mix_as_a_profile_matches_the_export(tmp_path, mix):
    m = tiny(layers=8)
    prof = DynamicQuantizationProfile.from_llama_mix(m, mix)
    export_gguf(m, tmp_path / "a.gguf", quant=mix)
    export_gguf(m, tmp_path / "b.gguf", quant="F16", profile=prof)  # the profile alone decides the 2-D types
    a = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "a.gguf").tensors}
    b = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "b.gguf").tensors}
    assert a == b
    res = quantize_(m, prof)
    assert {r.format for r in res.layers} <= {"q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "iq2_xs", "iq3_s", "iq3_xxs", "q8_0"}


def test_a_profile_keeps_protected_super_weights_exact():
    m = tiny()
    w = m.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w[3, 7] = 40.0  # an outlier, as super weights are
    res = quantize_(m, "mlp-low-precision", protect={"model.layers.0.mlp.down_proj": [(3, 7)]})
    q = m.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantizedLinear) and str(q.qdtype) == "q3_K"
    assert float(q.dequantize_weight()[3, 7]) == 40.0 and res.num_quantized_layers == 15

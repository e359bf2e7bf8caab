"""`diffulex-quant`: quantize, evaluate and compare local Hugging Face models from the shell."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

EPILOG = """examples:
  diffulex-quant quantize examples/tiny-llama-wikitext --dtype int4 --group-size 32 -o /tmp/tiny-int4
  diffulex-quant eval /tmp/tiny-int4 --text wikitext2-test --reference examples/tiny-llama-wikitext
  diffulex-quant compare examples/tiny-llama-wikitext --text wikitext2-test --html report.html
  diffulex-quant info /tmp/tiny-int4
  diffulex-quant imatrix examples/tiny-llama-wikitext --text wikitext2-valid -o imatrix.gguf
  diffulex-quant gguf examples/tiny-llama-wikitext -o tiny-Q4_K_M.gguf --quant Q4_K_M --imatrix imatrix.gguf
"""


_BUILTIN_HELP = "; or wikitext2-test / wikitext2-valid: the WikiText-2 samples bundled with the package"


def _text_arg(value: str) -> str:
    """``--text`` / ``--calibration``: a file, or the name of a bundled text (resolved to its path)."""
    from .data import resolve_text

    return resolve_text(value)


def _add_eval_text_args(p: argparse.ArgumentParser) -> None:
    """MODEL_DIR and the held-out text options that `eval` and `compare` share."""
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--text", required=True, metavar="FILE", type=_text_arg, help="held-out text file (UTF-8)" + _BUILTIN_HELP)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffulex-quant",
        description="Quantize, evaluate and compare local Hugging Face causal LMs (a folder with config.json "
        "and safetensors weights). Nothing is downloaded.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    q = sub.add_parser("quantize", help="quantize a model folder and save it",
                       description="Quantize every nn.Linear of MODEL_DIR and write OUT (quantized.safetensors, "
                       "config and tokenizer files, quantization.json).",
                       epilog="examples:\n  diffulex-quant quantize MODEL_DIR --scheme int4-g32 -o OUT\n"
                       "  diffulex-quant quantize MODEL_DIR --dtype int4 --group-size 32 -o OUT",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face model folder")
    q.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (created; must differ from MODEL_DIR)")
    # defaults are applied after --config is read (see _QUANTIZE_DEFAULTS): a flag given on the
    # command line overrides the file, even when it names the default value
    from .export.gguf_mixes import MIXES
    from .quant.config import INT4_GROUP_SIZES, MODES, SCHEME_HELP, QuantizationDtype

    def dtype_arg(value: str) -> str:  # any case: Q4_K -> q4_K
        try:
            return QuantizationDtype.parse(value).value
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    q.add_argument("--scheme", default=None, metavar="NAME",
                   help=f"a scheme name, as compare --schemes takes: {SCHEME_HELP} (instead of --dtype/--group-size/--mode)")
    q.add_argument("--dtype", default=None, type=dtype_arg, choices=[d.value for d in QuantizationDtype],
                   help="weight format (default int8)")
    q.add_argument("--group-size", type=int, default=None, choices=list(INT4_GROUP_SIZES), help="INT4 group length (default 128)")
    q.add_argument("--mode", default=None, choices=list(MODES),
                   help="INT8 only: also quantize activations per token (dynamic) or with calibrated scales (static)")
    q.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep matching layers in float (name, prefix, glob, or re:REGEX); repeatable")
    q.add_argument("--calibration", metavar="TEXT_FILE", type=_text_arg, help="text for --mode static calibration" + _BUILTIN_HELP)
    q.add_argument("--config", metavar="YAML", help="a QuantizationConfig YAML file; command-line flags you pass override it")
    q.add_argument("--imatrix", metavar="FILE", help="INT4: importance matrix (llama.cpp GGUF or .dat) for a weighted scale search")
    q.add_argument("--plan", metavar="PLAN", help="mixed precision: a profile (.yaml/.json, per-layer formats) or a preset "
                   "(attention-high-precision, mlp-low-precision, dynamic-2bit, dynamic-1bit, int8-with-fp16-edges) "
                   "instead of one format")

    e = sub.add_parser("eval", help="perplexity (and agreement with a reference) on a text",
                       description="Measure perplexity of MODEL_DIR (float or quantized) on a text file; with "
                       "--reference, also KL divergence and top-1 agreement against that model.",
                       epilog="example:\n  diffulex-quant eval OUT --text test.txt --reference MODEL_DIR",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_eval_text_args(e)
    e.add_argument("--reference", metavar="DIR", help="reference model folder (e.g. the FP32 original)")
    e.add_argument("--json", metavar="FILE", help="also write the result as JSON")

    c = sub.add_parser("compare", help="compare quantization schemes (table, Pareto plot, HTML report)",
                       description="Quantize MODEL_DIR with each scheme in one process and compare size, "
                       "perplexity, KL, top-1 agreement and CPU latency.",
                       epilog="example:\n  diffulex-quant compare MODEL_DIR --text test.txt --schemes fp16,int8,int4-g32 --html report.html",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_eval_text_args(c)
    c.add_argument("--schemes", default="fp32,fp16,int8,w8a8-dynamic,int4-g128,int4-g32",
                   help="comma-separated: fp32 fp16 bf16 int8 w8a8-dynamic w8a8-static int4-gN[-sym] (default: %(default)s)")
    c.add_argument("--calibration", metavar="TEXT_FILE", type=_text_arg, help="calibration text (needed by w8a8-static)" + _BUILTIN_HELP)
    c.add_argument("--html", metavar="FILE", help="write a self-contained HTML report with plots")
    c.add_argument("--json", metavar="FILE", help="write the report as JSON")
    c.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")

    i = sub.add_parser("info", help="describe a model folder or a saved quantized file",
                       description="Print what is quantized in a folder written by `quantize`, a .safetensors/.pt file "
                       "written by save_quantized, or a float model folder.",
                       epilog="example:\n  diffulex-quant info OUT", formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("path", metavar="PATH")

    m = sub.add_parser("imatrix", help="compute an importance matrix (llama.cpp GGUF or legacy .dat)",
                       description="Run calibration text through MODEL_DIR and write the mean of x^2 per input column of "
                       "every Linear layer, in llama.cpp's imatrix format (a .dat suffix writes the legacy format).",
                       epilog="example:\n  diffulex-quant imatrix MODEL_DIR --text valid.txt -o imatrix.gguf",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("model_dir", metavar="MODEL_DIR")
    m.add_argument("--text", required=True, metavar="FILE", type=_text_arg, help="calibration text file (UTF-8)" + _BUILTIN_HELP)
    m.add_argument("-o", "--output", required=True, metavar="OUT", help="imatrix file to write (.gguf or .dat)")
    m.add_argument("--samples", type=int, default=128, help="calibration sequences, 128..1024 (default 128)")
    m.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    m.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    m.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoint after each block; rerun to resume")
    m.add_argument("--offload", action="store_true",
                   help="for models larger than memory: keep the decoder blocks on disk and load each only while it runs "
                   "(block by block, checkpointed in --checkpoint-dir, default OUT.ckpt)")

    t = sub.add_parser("train", help="quantization-aware training, or fine-tuning a quantized model",
                       description="Train MODEL_DIR on a text as a TrainingConfig says (QAT: quantization_mode qat; "
                       "fine-tuning a quantized model: quantization_mode ptq + enable_quantized_finetuning) and write OUT: "
                       "the quantized model (QAT converted; adapters merged) as `quantize` writes it, or the float model.",
                       epilog="examples:\n  diffulex-quant train MODEL_DIR --text train.txt --scheme int4-g128 --steps 200 -o OUT\n"
                       "  diffulex-quant train MODEL_DIR --text train.txt --config training.yaml -o OUT\n"
                       "training.yaml: quantization_mode: qat / quantization_bits: 4 / max_steps: 200 / learning_rate: 1e-4 ...",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("model_dir", metavar="MODEL_DIR")
    t.add_argument("--text", required=True, metavar="FILE", type=_text_arg, help="training text (UTF-8)" + _BUILTIN_HELP)
    t.add_argument("--eval-text", metavar="FILE", type=_text_arg, help="held-out text: perplexity before and after")
    t.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (must differ from MODEL_DIR)")
    t.add_argument("--config", metavar="YAML", help="a TrainingConfig YAML file (missing fields take their defaults)")
    t.add_argument("--scheme", metavar="NAME", help="QAT to this scheme/format (sets quantization_mode qat)")
    t.add_argument("--steps", type=int, help="training steps (max_steps)")
    t.add_argument("--lr", type=float, help="learning rate")
    t.add_argument("--checkpoint-dir", metavar="DIR",
                   help="save the trainer state here every 50 steps (and at the end); rerun to resume exactly")

    g = sub.add_parser("gguf", help="export to a GGUF file for llama.cpp / ollama / LM Studio",
                       description="Write MODEL_DIR (Llama, Mistral or Qwen2) as GGUF with one of llama.cpp's type mixes, "
                       "the tokenizer, and optionally an importance matrix; prints the type and bits per weight "
                       "of every tensor.",
                       epilog="examples:\n  diffulex-quant gguf MODEL_DIR -o model-Q4_K_M.gguf\n"
                       "  diffulex-quant gguf MODEL_DIR -o model.gguf --quant Q5_K_M --imatrix imatrix.gguf "
                       "--override 'attn_v=Q8_0'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("model_dir", metavar="MODEL_DIR")
    g.add_argument("-o", "--output", required=True, metavar="OUT", help="GGUF file to write (replaced atomically)")
    g.add_argument("--quant", default="Q4_K_M", metavar="MIX",
                   help=f"llama.cpp mix: {' '.join(MIXES)} (default Q4_K_M)")
    g.add_argument("--imatrix", metavar="FILE", help="importance matrix (llama.cpp GGUF or .dat)")
    g.add_argument("--plan", metavar="PLAN", help="per-tensor types from a profile (.yaml/.json) or preset, over the mix")
    g.add_argument("--target-bpw", type=float, metavar="BITS",
                   help="solve a mixed plan for this many bits per weight: measures each tensor's sensitivity on "
                   "--calibration text (checkpointed to OUT.sensitivity.json, resumable) and writes the plan to OUT.plan.yaml")
    g.add_argument("--calibration", metavar="TEXT_FILE", type=_text_arg, help="text for --target-bpw" + _BUILTIN_HELP)
    g.add_argument("--override", action="append", default=[], metavar="REGEX=TYPE",
                   help="type for GGUF tensors whose name matches REGEX (e.g. 'attn_v=Q8_0'); repeatable, first match wins")
    g.add_argument("--rtn", action="store_true",
                   help="round-to-nearest (gguf-py's bytes) where the type has it, instead of the scale search")
    g.add_argument("--name", help="general.name in the file (default: the folder name)")
    g.add_argument("--report", metavar="FILE", help="also write the per-tensor report as JSON")
    g.add_argument("--no-resume", action="store_true",
                   help="start over instead of continuing an interrupted export (OUT.partial)")
    g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="encode the tensors as Ray tasks: on a new local Ray instance, or on the cluster at ADDRESS "
                   "('auto' for the one this machine belongs to); needs pip install 'diffulex-edge[ray]'")
    return p


def _need_file(path: Optional[str], what: str) -> None:
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")


_QUANTIZE_DEFAULTS = {"dtype": "int8", "group_size": 128, "mode": "weight_only"}


def _cmd_quantize(a) -> int:
    from . import hf
    from .quant import QUANTIZERS, QuantizationConfig

    _need_file(a.calibration, "calibration text")
    base = QuantizationConfig.from_yaml(a.config).to_dict() if a.config else {}
    given = {k: v for k, v in {"dtype": a.dtype, "group_size": a.group_size, "mode": a.mode}.items() if v is not None}
    if a.scheme is not None:
        if given:
            raise ValueError(f"--scheme names the format; leave out --{'/--'.join(k.replace('_', '-') for k in given)}")
        scheme = QuantizationConfig.from_scheme(a.scheme).to_dict()
        given = {k: scheme[k] for k in ("dtype", "group_size", "mode", "symmetric") if scheme[k] is not None}
    # precedence: flags given on the command line, then the YAML file, then the CLI's defaults
    merged = {**_QUANTIZE_DEFAULTS, **base, **given}
    merged["exclude_layers"] = list(base.get("exclude_layers") or []) + a.exclude
    cfg = QuantizationConfig.from_dict(merged)
    _need_file(a.imatrix, "imatrix file")
    if a.plan is None and cfg.mode != "static" and _has_safetensors(a.model_dir) and not hf.is_quantized_dir(a.model_dir):
        # out of core: one tensor in memory at a time, resumable; the same files as below
        from .quant import quantize_checkpoint

        result = quantize_checkpoint(a.model_dir, a.output, cfg, imatrix=a.imatrix)
        print(result.summary(max_layers=8))
        print(f"wrote {a.output}")
        return 0
    model, tok = hf.load_model(a.model_dir)
    calib = None
    if cfg.mode == "static":
        if not a.calibration:
            raise ValueError("--mode static needs --calibration TEXT_FILE")
        from .eval.compare import _calibration_batches

        calib = _calibration_batches(a.calibration, tok, 256)
    if a.plan is not None:
        from .quant import apply_profile
        from .quant.profile import as_profile

        if a.scheme or a.dtype or a.group_size:
            raise ValueError("--plan gives every layer its format; leave out --scheme/--dtype/--group-size")
        profile = as_profile(a.plan)
        result = apply_profile(model, profile, imatrix=a.imatrix, calibration_data=calib)
    else:
        result = QUANTIZERS[cfg.dtype]().quantize(model, cfg, inplace=True, calibration_data=calib, imatrix=a.imatrix)
    print(result.summary(max_layers=8))
    hf.save_quantized_pretrained(result.model, a.output, a.model_dir, info=result.to_dict())
    print(f"wrote {a.output}")
    return 0


def _cmd_eval(a) -> int:
    from . import hf
    from .eval import perplexity

    _need_file(a.text, "text file")
    model, tok = hf.load_model(a.model_dir)
    ref = hf.load_model(a.reference)[0] if a.reference else None
    if tok is None:
        raise ValueError(f"{a.model_dir} has no tokenizer files (tokenizer.json)")
    r = perplexity(model, a.text, tok, seq_len=a.seq_len, max_tokens=a.max_tokens, reference_model=ref)
    print(r)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(r.to_dict(), fh, indent=2)
    return 0


def _cmd_compare(a) -> int:
    from . import hf
    from .eval import compare_schemes

    _need_file(a.text, "text file")
    _need_file(a.calibration, "calibration text")
    model, tok = hf.load_model(a.model_dir)
    if tok is None:
        raise ValueError(f"{a.model_dir} has no tokenizer files (tokenizer.json)")
    schemes = [s.strip() for s in a.schemes.split(",") if s.strip()]
    report = compare_schemes(model, schemes, a.text, tokenizer=tok, calibration=a.calibration, seq_len=a.seq_len,
                             max_eval_tokens=a.max_tokens)
    print(report.to_markdown())
    for path, write in ((a.html, report.to_html), (a.json, report.to_json), (a.markdown, report.to_markdown)):
        if path:
            write(path)
            print(f"wrote {path}")
    return 0


def _cmd_info(a) -> int:
    from . import hf

    path = a.path
    if os.path.isdir(path):
        if hf.is_quantized_dir(path):
            path = os.path.join(path, hf.QUANTIZED_WEIGHTS)
        else:
            model, _ = hf.load_model(path)
            n = sum(p.numel() for p in model.parameters())
            print(f"{a.path}: float model {type(model).__name__}, {n / 1e6:.2f}M parameters, not quantized")
            return 0
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not found: {path}")
    from .quant.serialization import read_quantized_metadata

    meta, tensors = read_quantized_metadata(path)
    layers = meta.get("layers", {})
    from collections import Counter

    kinds = Counter(
        f"{s['dtype']}" + (f" g{s['group_size']}" if s["dtype"] == "int4" else "")
        + ("" if s.get("act_mode", "weight_only") == "weight_only" else f" ({s['act_mode']} activations)")
        for s in layers.values()
    )
    print(f"{a.path}: diffulex-edge {meta.get('version')} file, {len(tensors)} tensors, "
          f"{os.path.getsize(path) / 2**20:.2f} MiB on disk")
    print(f"  {len(layers)} quantized layer(s): " + ", ".join(f"{n} x {k}" for k, n in kinds.items()))
    for name, s in list(layers.items())[:10]:
        print(f"    {name}: {s['out_features']}x{s['in_features']} {s['dtype']}")
    if len(layers) > 10:
        print(f"    ... {len(layers) - 10} more")
    return 0


def _cmd_imatrix(a) -> int:
    from . import hf
    from .calib import CalibrationDataset, compute_imatrix

    _need_file(a.text, "text file")
    if a.offload:
        from .calib.offload import load_offloaded

        model, tok = load_offloaded(a.model_dir)
        a.checkpoint_dir = a.checkpoint_dir or a.output + ".ckpt"
    else:
        model, tok = hf.load_model(a.model_dir)
    if tok is None:
        raise ValueError(f"{a.model_dir} has no tokenizer files (tokenizer.json)")
    calib = CalibrationDataset(a.text, tok, n_samples=a.samples, seq_len=a.seq_len, batch_size=a.batch_size)
    im = compute_imatrix(model, calib, checkpoint_dir=a.checkpoint_dir, dataset_name=os.path.basename(a.text))
    im.save(a.output)
    print(f"wrote {a.output}: {len(im)} layers, {calib.n_samples} x {a.seq_len} tokens")
    return 0


def _solve_for_gguf(a, model, tok):
    """--target-bpw: sensitivities on the calibration text (resumable), the solved plan (saved
    next to the output), and the imatrix both use."""
    import torch

    from .calib import compute_imatrix
    from .mixed import analyze_sensitivity, solve
    from .quant.importance import resolve_imatrix

    if not a.calibration:
        raise ValueError("--target-bpw measures how each tensor's quantization moves the output on text: "
                         "give --calibration TEXT_FILE")
    if a.plan:
        raise ValueError("--target-bpw solves a plan; leave out --plan")
    if tok is None:
        raise ValueError(f"--target-bpw needs the tokenizer of {a.model_dir} to read --calibration")
    model.float()
    with open(a.calibration, encoding="utf-8") as fh:
        ids = torch.tensor(tok(fh.read()[:400_000])["input_ids"])
    n = min(4, ids.numel() // 256)
    if n < 1:
        raise ValueError(f"--calibration {a.calibration} has {ids.numel()} tokens; --target-bpw needs at least 256")
    windows = [ids[i * 256:(i + 1) * 256].unsqueeze(0) for i in range(n)]
    imatrix = resolve_imatrix(a.imatrix, model) if a.imatrix else compute_imatrix(model, windows)
    report = analyze_sensitivity(model, windows, imatrix=imatrix, checkpoint=a.output + ".sensitivity.json")
    plan = solve(report, target_bpw=a.target_bpw)
    profile = plan.to_profile(f"target-{a.target_bpw:g}bpw")
    profile.save(a.output + ".plan.yaml")
    print(f"solved: {plan}; plan written to {a.output}.plan.yaml")
    return profile, imatrix


def _cmd_gguf(a) -> int:
    from . import hf
    from .export import export_gguf

    _need_file(a.imatrix, "imatrix file")
    overrides = {}
    for item in a.override:
        regex, sep, t = item.rpartition("=")
        if not sep or not regex or not t:
            raise ValueError(f"--override {item!r}: expected REGEX=TYPE, e.g. 'attn_v=Q8_0'")
        overrides[regex] = t
    from .errors import ConfigError
    from .export.gguf_mixes import MIXES, compile_overrides

    # argument errors before the (possibly long) model load
    if a.quant.upper() not in MIXES:
        raise ConfigError(f"unknown --quant {a.quant!r}; supported: {', '.join(MIXES)}")
    compile_overrides(overrides or None)
    if hf.is_quantized_dir(a.model_dir):
        raise ValueError(f"{a.model_dir} holds diffulex-edge quantized weights; export the float model folder "
                         "(GGUF applies its own quantization)")
    name = a.name or os.path.basename(os.path.normpath(a.model_dir))
    if a.target_bpw is None and _has_safetensors(a.model_dir):
        # out of core: one tensor in memory at a time, resumable, optionally on Ray
        from .export import export_gguf_checkpoint
        from .export.stream import load_folder_tokenizer

        tok = load_folder_tokenizer(a.model_dir)
        if tok is None:
            print(f"note: {a.model_dir} has no tokenizer files; the GGUF will lack a vocabulary "
                  "(llama.cpp needs one to run it)", file=sys.stderr)
        report = export_gguf_checkpoint(
            a.model_dir, a.output, quant=a.quant, imatrix=a.imatrix, tokenizer=tok, overrides=overrides or None,
            name=name, mode="rtn" if a.rtn else "search", profile=a.plan, resume=not a.no_resume,
            executor="ray" if a.ray else "local", ray_address=None if a.ray in (None, "local") else a.ray)
        if report.resumed_tensors:
            print(f"resumed: {report.resumed_tensors} tensors were already written by an interrupted run")
        print(f"encoded {report.input_bytes / 1e9:.2f} GB of weights in {report.seconds:.1f} s")
        return _print_gguf_report(a, report)
    if a.ray or a.no_resume:
        raise ValueError("--ray and --no-resume apply to safetensors model folders, exported tensor by tensor; "
                         f"{a.model_dir} {'is exported with --target-bpw in memory' if a.target_bpw else 'has no .safetensors'}")
    # the checkpoint's dtype (bf16 models stay bf16: half the memory); tensors are converted to
    # float32 one at a time during the export
    model, tok = hf.load_model(a.model_dir, dtype="auto")
    try:  # transformers' wrapper knows BOS/EOS handling; a bare tokenizer.json is the fallback
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError):
        pass
    if tok is None:
        print(f"note: {a.model_dir} has no tokenizer files; the GGUF will lack a vocabulary "
              "(llama.cpp needs one to run it)", file=sys.stderr)
    profile, imatrix = a.plan, a.imatrix
    if a.target_bpw is not None:
        profile, imatrix = _solve_for_gguf(a, model, tok)
    report = export_gguf(model, a.output, quant=a.quant, imatrix=imatrix, tokenizer=tok, overrides=overrides or None,
                         name=name, mode="rtn" if a.rtn else "search", profile=profile)
    return _print_gguf_report(a, report)


def _has_safetensors(folder: str) -> bool:
    return os.path.isdir(folder) and any(f.endswith(".safetensors") for f in os.listdir(folder))


def _print_gguf_report(a, report) -> int:
    counts = ", ".join(f"{n} x {t}" for t, n in sorted(report.type_counts().items(), key=lambda kv: -kv[1]))
    print(f"wrote {a.output}: {a.quant.upper()}, {len(report.tensors)} tensors ({counts}), {report.n_params:,} weights, "
          f"{report.nbytes / 2**20:.2f} MiB, {report.bits_per_weight:.3f} bits/weight")
    if a.report:
        rows = [{"name": t.name, "shape": list(t.shape), "type": t.ggml_type, "bytes": t.nbytes,
                 "bits_per_weight": t.bits_per_weight, "reason": t.reason} for t in report.tensors]
        from ._io import atomic_write

        doc = {"path": report.path, "quant": report.quant, "bits_per_weight": report.bits_per_weight, "tensors": rows}

        def dump(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=2)

        atomic_write(a.report, dump)
        print(f"wrote {a.report}")
    return 0


def _cmd_train(a) -> int:
    from . import hf
    from .qat import Trainer, TrainingConfig

    _need_file(a.text, "training text")
    if a.config:
        _need_file(a.config, "training config")
    cfg = TrainingConfig.from_yaml(a.config).to_dict() if a.config else {}
    if a.scheme:
        cfg.update(quantization_mode="qat", quantization_scheme=a.scheme)
    if a.steps is not None:
        cfg["max_steps"] = a.steps
    if a.lr is not None:
        cfg["learning_rate"] = a.lr
    if a.checkpoint_dir:
        cfg.update(checkpoint_dir=a.checkpoint_dir, checkpoint_every=cfg.get("checkpoint_every") or 50)
    cfg = TrainingConfig.from_dict(cfg)
    if os.path.abspath(a.output) == os.path.abspath(a.model_dir):
        raise ValueError("the output folder must differ from the model folder (the original would be overwritten)")
    model, tok = hf.load_model(a.model_dir)
    if tok is None:
        raise ValueError(f"{a.model_dir} has no tokenizer files (tokenizer.json)")
    trainer = Trainer(model, cfg, a.text, eval_data=a.eval_text, tokenizer=tok)
    ckpt = os.path.join(a.checkpoint_dir, "trainer.pt") if a.checkpoint_dir else None
    if ckpt and os.path.isfile(ckpt):
        print(f"resuming from {ckpt} at step {trainer.resume(ckpt)}")
    if a.eval_text and trainer.step == 0:
        print(f"before: eval perplexity {trainer.evaluate()['perplexity']:.3f}")
    trainer.fit()
    if ckpt:
        trainer.save_checkpoint(ckpt)
    result = trainer.convert()
    if a.eval_text:
        print(f"after ({cfg.quantization_mode or 'float'}): eval perplexity {trainer.evaluate()['perplexity']:.3f}")
    last = trainer.history[-1]["loss"] if trainer.history else float("nan")
    print(f"trained {trainer.step} steps, last loss {last:.4f}")
    if any(True for _ in _quantized(model)):
        hf.save_quantized_pretrained(model, a.output, a.model_dir,
                                     info={"training": cfg.to_dict(), **(result.to_dict() if result is not None else {})})
    else:  # a float run: a Hugging Face folder, with the source's tokenizer files
        model.save_pretrained(a.output)
        hf.copy_model_files(a.model_dir, a.output, overwrite=False)
    print(f"wrote {a.output}")
    return 0


def _quantized(model):
    from .quant.nn import QuantizedLinear

    return (m for m in model.modules() if isinstance(m, QuantizedLinear))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from .errors import QuantizationError

    handlers = {"quantize": _cmd_quantize, "eval": _cmd_eval, "compare": _cmd_compare, "info": _cmd_info, "imatrix": _cmd_imatrix,
                "gguf": _cmd_gguf, "train": _cmd_train}
    try:
        return handlers[args.command](args)
    except (FileNotFoundError, QuantizationError, ValueError) as e:
        print(f"diffulex-quant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

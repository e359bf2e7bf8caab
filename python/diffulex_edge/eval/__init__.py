"""Evaluation: perplexity (with KL divergence and top-1 agreement against the original model),
latency and memory, on-disk size, and `compare_schemes` for a size / accuracy / speed table."""

from .compare import DEFAULT_SCHEMES, compare_schemes, parse_scheme
from .latency import LatencyResult, disk_size_bytes, measure_latency, measure_speedup
from .perplexity import PerplexityResult, llama_cpp_perplexity, logits_of, perplexity, tokenize
from .report import BenchmarkReport, SchemeResult

__all__ = [
    "BenchmarkReport",
    "DEFAULT_SCHEMES",
    "LatencyResult",
    "PerplexityResult",
    "SchemeResult",
    "compare_schemes",
    "disk_size_bytes",
    "llama_cpp_perplexity",
    "logits_of",
    "measure_latency",
    "measure_speedup",
    "parse_scheme",
    "perplexity",
    "tokenize",
]

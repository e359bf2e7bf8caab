import math

import pytest
import torch
import torch.nn.functional as F

from diffulex_edge.errors import ConfigError, UnsupportedFormatError
from diffulex_edge.eval import logits_of, perplexity, tokenize
from diffulex_edge.eval.perplexity import windows
from diffulex_edge.quant import INT4Quantizer, QuantizationConfig


def direct_nll(model, ids):
    """Independent computation for a bigram model: every target's NLL from its previous token."""
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:-1].unsqueeze(0))[0].double(), -1)
    return -logp.gather(1, ids[1:, None]).mean().item()


@pytest.mark.parametrize("seq_len,stride", [(16, None), (16, 16), (16, 5), (7, 1), (1000, None)])
def test_perplexity_is_exp_mean_nll(bigram, seq_len, stride):
    ids = torch.randint(0, 64, (300,), generator=torch.Generator().manual_seed(1))
    r = perplexity(bigram, ids, seq_len=seq_len, stride=stride, show_progress=False)
    assert r.n_tokens == 299  # every token after the first predicted exactly once
    assert r.mean_nll == pytest.approx(direct_nll(bigram, ids), rel=1e-6)
    assert r.perplexity == pytest.approx(math.exp(direct_nll(bigram, ids)), rel=1e-6)


def test_windows_cover_each_token_once():
    for n, L, s in [(10, 4, 4), (10, 4, 1), (10, 4, 3), (2, 2, 2), (100, 10, 7)]:
        scored = []
        for start, end, first in windows(n, L, s):
            assert end - start <= L and first >= 1
            scored.extend(range(start + first, end))
        assert scored == list(range(1, n))
    with pytest.raises(ConfigError):
        windows(10, 1, 1)
    with pytest.raises(ConfigError):
        windows(10, 4, 5)


def test_kl_and_top1_against_reference(bigram):
    ids = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(2))
    same = perplexity(bigram, ids, seq_len=32, reference_model=bigram, show_progress=False)
    assert abs(same.kl_divergence) < 1e-9 and same.top1_agreement == 1.0
    assert same.reference_perplexity == pytest.approx(same.perplexity)

    other = type(bigram)(seed=5)
    r = perplexity(other, ids, seq_len=32, reference_model=bigram, show_progress=False)
    with torch.no_grad():
        p = F.log_softmax(bigram(ids[:-1].unsqueeze(0))[0].double(), -1)
        q = F.log_softmax(other(ids[:-1].unsqueeze(0))[0].double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    assert r.kl_divergence == pytest.approx(kl, rel=1e-5)
    assert r.top1_agreement == pytest.approx(top1)
    assert "KL=" in repr(r) and "top-1" in repr(r)


def test_quantized_model_kl_is_small_but_positive(bigram):
    ids = torch.randint(0, 64, (400,), generator=torch.Generator().manual_seed(3))
    q = INT4Quantizer().quantize(bigram, QuantizationConfig(group_size=32)).model
    r = perplexity(q, ids, seq_len=64, reference_model=bigram, show_progress=False)
    assert 0 < r.kl_divergence < 0.05
    assert r.top1_agreement > 0.8


def test_text_needs_tokenizer_and_files_are_read(tmp_path, bigram):
    with pytest.raises(ConfigError, match="tokenizer"):
        tokenize("some text")

    class CharTok:
        def encode(self, text):
            return [ord(c) % 64 for c in text]

    f = tmp_path / "t.txt"
    f.write_text("hello world, hello perplexity")
    assert tokenize(f, CharTok()).tolist() == CharTok().encode(f.read_text())
    assert tokenize(str(f), CharTok()).numel() == len(f.read_text())
    assert tokenize("ab\ncd", CharTok()).numel() == 5
    assert tokenize([1, 2, 3]).tolist() == [1, 2, 3]
    with pytest.raises(ConfigError):
        tokenize([1])
    r = perplexity(bigram, str(f), CharTok(), seq_len=8, max_tokens=20, show_progress=False)
    assert r.n_tokens == 19


def test_logits_of_checks_output():
    class Bad(torch.nn.Module):
        def forward(self, ids):
            return ids.float()

    class HFLike(torch.nn.Module):
        def forward(self, ids):
            return type("Out", (), {"logits": torch.zeros(*ids.shape, 5)})()

    with pytest.raises(UnsupportedFormatError):
        logits_of(Bad(), torch.zeros(1, 3, dtype=torch.long))
    assert logits_of(HFLike(), torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 5)


def test_model_mode_restored(bigram):
    bigram.train()
    perplexity(bigram, torch.arange(50) % 64, seq_len=16, show_progress=False)
    assert bigram.training


def test_llama_cpp_protocol_scores_second_half_of_each_chunk(bigram):
    from diffulex_edge.eval import llama_cpp_perplexity

    ids = torch.randint(0, 64, (300,), generator=torch.Generator().manual_seed(2))
    n_ctx = 16
    r = llama_cpp_perplexity(bigram, ids, n_ctx=n_ctx, batch=5)
    # independent: per chunk, the bigram NLL of tokens first+1 .. n_ctx-1 (first = n_ctx // 2)
    n_chunk, first = 300 // n_ctx, n_ctx // 2
    nll = []
    with torch.no_grad():
        for c in range(n_chunk):
            x = ids[c * n_ctx : (c + 1) * n_ctx]
            logp = F.log_softmax(bigram(x.unsqueeze(0))[0].double(), -1)
            nll += [-logp[k, x[k + 1]].item() for k in range(first, n_ctx - 1)]
    assert r.n_tokens == n_chunk * (n_ctx - 1 - first) == len(nll)
    assert r.mean_nll == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    # a bigram model only sees the previous token, so BOS replacement of token 0 changes nothing
    # here, while a different n_ctx scores a different token set
    assert llama_cpp_perplexity(bigram, ids, n_ctx=n_ctx, bos_id=0).mean_nll == pytest.approx(r.mean_nll, rel=1e-6)
    assert llama_cpp_perplexity(bigram, ids, n_ctx=10).n_tokens == 30 * 4
    assert llama_cpp_perplexity(bigram, ids, n_ctx=n_ctx, max_chunks=3).n_tokens == 3 * 7
    with pytest.raises(ConfigError):
        llama_cpp_perplexity(bigram, ids[:10], n_ctx=16)

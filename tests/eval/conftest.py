import pytest
import torch
from torch import nn


class Bigram(nn.Module):
    """Logits depend only on the current token, so the NLL of each target is computable directly."""

    def __init__(self, vocab: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, 32)
        self.proj = nn.Linear(32, vocab)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, 32, generator=g))
            self.proj.weight.copy_(torch.randn(vocab, 32, generator=g) / 4)

    def forward(self, ids):
        return self.proj(self.embed(ids))


@pytest.fixture
def bigram():
    return Bigram()


@pytest.fixture(scope="session")
def wikitext_sample():
    from diffulex_edge.data import wikitext2

    # the sample bundled with the package: the same first 20,000 characters as the full split
    with open(wikitext2("test", sample=True), encoding="utf-8") as fh:
        return fh.read()[:20000]


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory, wikitext_sample):
    """A tiny Llama folder (config.json, model.safetensors, tokenizer.json) built locally."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        wikitext_sample.splitlines(),
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(d, safe_serialization=True)
    tok.save(str(d / "tokenizer.json"))
    return d

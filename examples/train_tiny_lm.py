"""Train a small Llama-architecture language model on WikiText-2 (valid split) on CPU.

It trains a byte-level BPE tokenizer with `tokenizers`, then a `transformers`
LlamaForCausalLM built from a config, and saves a Hugging Face folder (config.json,
model.safetensors, tokenizer.json). The checkpoint committed under
examples/tiny-llama-wikitext/ was made with the defaults:

    python examples/train_tiny_lm.py --out examples/tiny-llama-wikitext

(about 15-30 minutes on 2 CPU cores). Perplexity is then measured on test.txt, e.g.
`diffulex-quant eval examples/tiny-llama-wikitext --text wikitext2-test`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    return tok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default=None,
                   help="training text (default: WikiText-2 valid; the committed checkpoint was trained on the full split: set DIFFULEX_EDGE_WIKITEXT2 to its folder, else the bundled sample is used)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=384)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    if a.train is None:
        from diffulex_edge.data import wikitext2

        a.train = wikitext2("valid")
    with open(a.train, encoding="utf-8") as fh:
        text = fh.read()
    tok = train_tokenizer(text, a.vocab)
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    print(f"{len(ids)} training tokens, vocab {tok.get_vocab_size()}")

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=a.dim, intermediate_size=a.ffn, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=max(256, a.seq),
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps)))
    )
    model.train()
    t0 = time.time()
    for step in range(a.steps):
        starts = torch.randint(0, len(ids) - a.seq - 1, (a.batch,))
        batch = torch.stack([ids[s : s + a.seq] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == a.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - t0:6.0f} s", flush=True)

    os.makedirs(a.out, exist_ok=True)
    model.eval()
    model.save_pretrained(a.out, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(a.out)
    with open(os.path.join(a.out, "training.json"), "w") as fh:
        json.dump({**vars(a), "train": os.path.basename(a.train), "tokens": len(ids), "params": n_params,
                   "final_loss": loss.item(), "seconds": time.time() - t0}, fh, indent=1)
    print(f"saved to {a.out}")


if __name__ == "__main__":
    main()

"""Export a tiny randomly initialised Llama to GGUF (Q4_K_M) and read it back.

    PYTHONPATH=python python examples/export_gguf_tiny_llama.py [out.gguf]

With a real checkpoint, replace the model (and pass its tokenizer):
    model = AutoModelForCausalLM.from_pretrained(...); tok = AutoTokenizer.from_pretrained(...)
    export_gguf(model, "model-Q4_K_M.gguf", quant="Q4_K_M", tokenizer=tok, imatrix="imatrix.gguf")
"""

import sys
import tempfile

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from diffulex_edge.export import export_gguf
from diffulex_edge.gguf import GGUFFile


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mktemp(suffix=".gguf")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    report = export_gguf(model, out, quant="Q4_K_M", overrides={r"ffn_down": "Q5_K"})
    print(report)
    f = GGUFFile.read(out)
    w = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    err = np.sqrt(((f.tensor("blk.0.ffn_up.weight") - w) ** 2).mean()) / w.std()
    print(f"read back {len(f.tensors)} tensors; blk.0.ffn_up relative RMSE {err:.4f}")


if __name__ == "__main__":
    main()

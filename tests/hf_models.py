"""Tiny Hugging Face models of every supported family, built from configs (nothing downloaded)."""
import torch

VOCAB = 97


def tiny_config(model_type: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, pad_token_id=0)
    if model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "gemma": tf.GemmaConfig}[model_type]
        cfg = cls(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, attention_dropout=0.0,
                  **common)
    elif model_type == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **common)
    elif model_type == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=256, attention_dropout=0.0, hidden_dropout=0.0, **common)
    elif model_type == "opt":
        cfg = tf.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, max_position_embeddings=256, dropout=0.0, attention_dropout=0.0,
                           **common)
    elif model_type in ("bert", "roberta"):
        cls = tf.BertConfig if model_type == "bert" else tf.RobertaConfig
        cfg = cls(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  **common)
    else:
        raise ValueError(model_type)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2", "gpt_neox", "opt"]
ENCODERS = ["bert", "roberta"]


def tiny_model(model_type: str, head: str = "causal_lm", seed: int = 0, dtype=torch.float32, **overrides):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    cls = {"causal_lm": tf.AutoModelForCausalLM, "base": tf.AutoModel,
           "seq_cls": tf.AutoModelForSequenceClassification,
           "token_cls": tf.AutoModelForTokenClassification}[head]
    model = cls.from_config(cfg, attn_implementation="sdpa").to(dtype)
    return model.eval()


def padded_batch(B=3, n=9, seed=1, left=True):
    """input_ids [B, n] and attention_mask [B, n] with rows of different lengths (padding left or right)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, n), generator=gen)
    lengths = torch.tensor([n, max(2, n - 3), max(1, n - 5)][:B] + [n] * max(0, B - 3))
    pos = torch.arange(n)[None, :]
    mask = (pos >= n - lengths[:, None]) if left else (pos < lengths[:, None])
    ids = ids.masked_fill(~mask, 0)
    return ids, mask.long()

"""Shared by the parity tests (and by bench.py, whose reference side is built the same way)."""
import torch

# LLaVA's constants, written here again so that the reference does not borrow them from the code under test
IMAGE_TOKEN_INDEX, IGNORE_INDEX = -200, -100
# transformers' Florence-2 image placeholder id: Florence-2's 51,289-word vocabulary gets one more row
FLORENCE_IMAGE_TOKEN = 51289


@torch.no_grad()
def randomize_(model):
    """Move every weight away from its init, so that a wrong or missing mapping cannot hide behind ones and
    zeros: LayerNorms around 1 / 0, biases random, embeddings N(0, 0.25), matrices N(0, 1/fan_in)."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
        elif p.ndim == 1:
            p.copy_(0.1 * torch.randn_like(p))
        elif "embed" in name or "shared" in name:
            p.copy_(0.5 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)


def random_hf_model(cls, hf_cfg, seed=0):
    """A transformers model with weights away from init: norms ~ 1 + 0.2 N(0,1), embeddings N(0,1),
    matrices N(0, 4 / fan_in), so that logits are peaked and greedy decoding keeps moving."""
    torch.manual_seed(seed)
    model = cls(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif 'embed' in name:
                p.normal_(0, 1)
            else:
                p.normal_(0, 2 / p.shape[1] ** 0.5)
    return model


def florence2_hf_config(cfg, vocab_size: int, image_token_id: int, decoder_layers: int = 1):
    """A transformers Florence2Config with the shapes of our FlorenceConfig `cfg` (the encoder's shapes also
    size the decoder, which Florence-VL does not use)."""
    from transformers import Florence2Config
    v = cfg.vision
    vision = dict(embed_dim=list(v.dims), num_heads=list(v.heads), num_groups=list(v.groups), depths=list(v.depths),
                  window_size=v.window, patch_size=list(v.patch_size), patch_stride=list(v.patch_stride),
                  patch_padding=list(v.patch_padding), patch_prenorm=list(v.patch_prenorm),
                  drop_path_rate=v.drop_path_rate, projection_dim=cfg.d_model,
                  max_position_embeddings=cfg.image_pos_embed_size, max_temporal_embeddings=cfg.temporal_embed_size)
    text = dict(model_type="bart", vocab_size=vocab_size, d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
                encoder_attention_heads=cfg.encoder_heads, encoder_ffn_dim=cfg.encoder_ffn_dim,
                decoder_layers=decoder_layers, decoder_attention_heads=cfg.encoder_heads,
                decoder_ffn_dim=cfg.encoder_ffn_dim, max_position_embeddings=cfg.max_position_embeddings,
                dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                activation_dropout=cfg.activation_dropout)
    return Florence2Config(vision_config=vision, text_config=text, image_token_id=image_token_id)


def reference_splice(embed, input_ids, mask, labels, visual):
    """LLaVA's prepare_inputs_labels_for_multimodal, plainly: each <image> (-200) replaced by its visual tokens
    (M, N, H), in batch order; right-padded (embeds, mask, labels) for the LLM."""
    rows, row_labels, k = [], [], 0
    for b in range(input_ids.shape[0]):
        keep = mask[b].bool()
        ids, lab = input_ids[b][keep], labels[b][keep]
        emb = embed(ids.clamp(min=0))
        where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        if where:
            p = where[0]
            emb = torch.cat([emb[:p], visual[k].to(emb.dtype), emb[p + 1:]])
            lab = torch.cat([lab[:p], lab.new_full((visual.shape[1],), IGNORE_INDEX), lab[p + 1:]])
            k += 1
        rows.append(emb)
        row_labels.append(lab)
    T = max(len(r) for r in rows)
    embeds = rows[0].new_zeros(len(rows), T, rows[0].shape[-1])
    new_mask = mask.new_zeros(len(rows), T)
    new_labels = labels.new_full((len(rows), T), IGNORE_INDEX)
    for b, (r, lab) in enumerate(zip(rows, row_labels)):
        embeds[b, :len(r)], new_mask[b, :len(r)], new_labels[b, :len(r)] = r, 1, lab
    return embeds, new_mask, new_labels


def phi3_hf_config(cfg):
    """A transformers Phi3Config of an LLMConfig's shapes and LongRoPE factors (Phi-3.5-mini's)."""
    from transformers import Phi3Config
    return Phi3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                      num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                      original_max_position_embeddings=cfg.original_max_position_embeddings,
                      rms_norm_eps=cfg.rms_norm_eps, bos_token_id=1, eos_token_id=None, pad_token_id=cfg.pad_token_id,
                      rope_parameters=dict(rope_type="longrope", rope_theta=cfg.rope_theta,
                                           short_factor=list(cfg.short_factor),
                                           long_factor=list(cfg.long_factor)))


def reference_features(florence, pixels, prompt_ids, shared_davit: bool = False) -> list:
    """[V, V'_1, V'_2, V'_3], each (B, N, D), as the official tower computes them: the B x 3 (image, prompt)
    pairs in one batch, image-major, each with its own image features (shared_davit: one DaViT pass per
    image, expanded), merged at the placeholders, through the BART encoder, no attention mask. prompt_ids: (3, L), the
    three task prompts' Florence-2 token ids."""
    m = florence.model
    B, ids = pixels.shape[0], prompt_ids.to(pixels.device)
    K = ids.shape[0]
    if shared_davit:
        V = m.get_image_features(pixels).pooler_output                            # (B, N, D)
        features = V.repeat_interleave(K, 0)
    else:
        features = m.get_image_features(pixels.repeat_interleave(K, 0)).pooler_output  # (B*K, N, D)
        V = features[::K]
    N = features.shape[1]
    input_ids = torch.cat([torch.full((B * K, N), FLORENCE_IMAGE_TOKEN, device=pixels.device), ids.repeat(B, 1)], 1)
    embeds = m.get_input_embeddings()(input_ids)
    features = features.to(embeds.dtype)
    embeds = embeds.masked_scatter(m.get_placeholder_mask(input_ids, embeds, features), features)
    out = m.language_model.encoder(inputs_embeds=embeds).last_hidden_state[:, :N].view(B, K, N, -1)
    return [V] + [out[:, k] for k in range(K)]

"""Tiny random Stable Diffusion components, built offline (no Hub), for pipeline tests."""

import json

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

EMBED_DIM = 8


def tiny_tokenizer(tmp_path):
    """A CLIP BPE tokenizer over a 20-token vocabulary, written to ``tmp_path``."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    vocab.update({f"{c}</w>": i + 3 for i, c in enumerate("abcdefghijklmnop")})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8)


def tiny_sd_components(tmp_path, prediction_type="epsilon"):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=EMBED_DIM, attention_head_dim=2, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=EMBED_DIM, intermediate_size=16,
        num_attention_heads=2, num_hidden_layers=1, vocab_size=20, max_position_embeddings=8,
    ))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(tmp_path),
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def prompt_embeds(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, EMBED_DIM, generator=g), torch.randn(batch, 8, EMBED_DIM, generator=g)


def tiny_unet(sample_size=8, channels=1, out_channels=None):
    """A random unconditional UNet2DModel with few channels."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=out_channels or channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
    )

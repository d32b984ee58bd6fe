"""Tiny random-weight Hugging Face checkpoints for tests, saved with `save_pretrained` so every
loading path is the real one. Token ids of the vision specials sit at the top of the vocab."""

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

VOCAB = 320
IMAGE, VIDEO, VISION_START, VISION_END = 310, 311, 312, 313
MERGE = 2
PATCH_DIM = 3 * 2 * 14 * 14


def vl_config(tie=False, layers=2, hidden=64, vision_depth=3):
    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         tie_word_embeddings=tie, rms_norm_eps=1e-6),
        vision_config=dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[1], window_size=56, spatial_patch_size=14, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=MERGE, tokens_per_second=2),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=tie)


def draw_weights(model, seed):
    """Every weight drawn here, in the order of the sorted parameter names, so a seed gives the same
    network under any transformers version (5.x initialises in another order than 4.x): matrices
    normal(0, 0.02) as transformers initialises them; biases around 0 and norm weights around 1,
    perturbed by normal(0, 0.1) so parity covers every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "norm" in name or "ln_q" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)
    return model


def save_vl(path, seed=0, **kw):
    model = draw_weights(Qwen2_5_VLForConditionalGeneration(vl_config(**kw)).eval(), seed)
    model.save_pretrained(path)
    return model


def save_qwen2_text(path, seed=0, tie=True):
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tie,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = draw_weights(Qwen2ForCausalLM(cfg).eval(), seed)
    model.save_pretrained(path)
    return model


def mm_token_type_ids(input_ids, image_token_id=IMAGE):
    """transformers 5's modality mask for a Qwen2.5-VL forward (1 at image tokens, 0 elsewhere), as
    its processor returns it. Without it the oracle gives image tokens text positions, not M-RoPE."""
    return (input_ids == image_token_id).int()


def image_tokens(grid):
    t, h, w = grid
    return [VISION_START] + [IMAGE] * (t * h * w // MERGE**2) + [VISION_END]


def random_pixels(grid, generator=None):
    t, h, w = grid
    return torch.randn(t * h * w, PATCH_DIM, generator=generator)


def sample(text_lens, grids, seed):
    """input_ids interleaving random text of `text_lens` with the images of `grids`
    (len(text_lens) == len(grids) + 1), plus their pixel values and grid tensor."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for i, n in enumerate(text_lens):
        ids += torch.randint(0, 300, (n,), generator=g).tolist()
        if i < len(grids):
            ids += image_tokens(grids[i])
    pixels = torch.cat([random_pixels(gr, g) for gr in grids]) if grids else None
    grid = torch.tensor(grids) if grids else None
    return torch.tensor(ids), pixels, grid


def global_batch(seqs):
    """The FSDP workers' batch: `sample` of each (text lengths, grids) entry of `seqs`, seeded by its
    index, and the batch's next-token target count (every sequence's length - 1)."""
    samples = [sample(lens, grids, seed=i) for i, (lens, grids) in enumerate(seqs)]
    return samples, sum(len(s[0]) - 1 for s in samples)


def shared_prompt_groups(text_only, two_images):
    """Two GRPO groups for data.pack_shared_prompts, from two `sample`s (ids, pixels, grid): three
    random responses each (lengths 7, 0, 3 and 5, 9, 4: one empty), rows 0-5."""
    g = torch.Generator().manual_seed(5)
    groups = []
    for (ids, pixels, grid), lengths in zip([text_only, two_images], [(7, 0, 3), (5, 9, 4)]):
        groups.append({"input_ids": ids.tolist(), "pixel_values": pixels, "image_grid_thw": grid,
                       "continuations": [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths],
                       "rows": [len(groups) * 3 + i for i in range(3)]})
    return groups

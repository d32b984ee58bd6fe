"""A tiny random-weight Llama 3.2 Vision checkpoint for tests (tests/tiny.py's counterpart), saved with
`save_pretrained`, and its inputs as transformers' image processor makes them: per sequence
(`process`), as a padded batch (`padded_batch`) and packed (`pack`, which needs torch only: the
FSDP worker packs what the test process made)."""

import torch
import torch.nn.functional as F

VOCAB = 320
IMAGE = VOCAB  # <|image|> is the first embedding row past the vocabulary, as 128256 is in the released models
TILE = 28  # image_size: 2x2 patches of 14 and a class token per tile, 5 vectors padded to 8
MAX_TILES = 4
CROSS_LAYERS = [1, 3]


def config():
    from transformers import MllamaConfig

    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64)  # head_dim 16: all three llama3 bands (rope_inv_freq)
    return MllamaConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=CROSS_LAYERS,
                         rope_parameters=rope, rms_norm_eps=1e-5, pad_token_id=VOCAB - 1, bos_token_id=1,
                         eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=2,
                           attention_heads=2, image_size=TILE, patch_size=14, max_num_tiles=MAX_TILES,
                           intermediate_layers_indices=[2, 0], vision_output_dim=96),
        image_token_index=IMAGE)


def save(path, seed=0):
    """MllamaForConditionalGeneration of `config()` with tests/tiny.py's weights, and every tanh gate
    (zero at transformers' init: the images would not count) drawn from U(0.5, 1.5), saved in `path`."""
    from transformers import MllamaForConditionalGeneration

    from tests import tiny

    model = tiny.draw_weights(MllamaForConditionalGeneration(config()).eval(), seed)
    g = torch.Generator().manual_seed(seed)
    gates = ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate")
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.rsplit(".", 1)[-1] in gates:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    model.save_pretrained(path)
    return model


def images(sizes, seed):
    """Random RGB PIL images of (height, width) `sizes`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


def processor():
    # the PIL backend: transformers' default one needs torchvision
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=MAX_TILES)


def padded_batch(samples, seed=0):
    """transformers' inputs for `samples` [(token ids with IMAGE where each image stands, image sizes)]:
    right-padded input_ids / attention_mask, the processor's tiles, aspect-ratio ids and masks,
    and the cross-attention mask transformers' MllamaProcessor builds from the <|image|> positions."""
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    T = max(len(ids) for ids, _ in samples)
    input_ids = torch.zeros(len(samples), T, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, (ids, _) in enumerate(samples):
        input_ids[i, :len(ids)], attention_mask[i, :len(ids)] = torch.tensor(ids), 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if not any(sizes for _, sizes in samples):
        return batch
    tiles = processor()([images(sizes, seed + i) for i, (_, sizes) in enumerate(samples)], return_tensors="pt")
    token_masks = [get_cross_attention_token_mask(ids, IMAGE) for ids, _ in samples]
    cross = convert_sparse_cross_attention_mask_to_dense(token_masks, tiles["num_tiles"], MAX_TILES, T)
    return {**batch, "pixel_values": tiles["pixel_values"], "aspect_ratio_ids": tiles["aspect_ratio_ids"],
            "aspect_ratio_mask": tiles["aspect_ratio_mask"], "cross_attention_mask": torch.from_numpy(cross)}


def process(ids, sizes, seed=0):
    """One sequence's packed-forward inputs: input_ids [L], and with images pixel_values [n, tiles,
    3, TILE, TILE], aspect_ratio_ids [n], aspect_ratio_mask [n, tiles], cross_attention_mask [L, n, tiles]."""
    batch = padded_batch([(ids, sizes)], seed)
    one = {"input_ids": batch["input_ids"][0]}
    if sizes:
        one.update({key: batch[key][0] for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
                                                   "cross_attention_mask")})
    return one


def pack(sequences):
    """forward_packed's arguments for `process` outputs, in order: input_ids, cu_seqlens, then the
    images' keyword arguments (none when no sequence has an image)."""
    counts = [len(s["aspect_ratio_ids"]) if "pixel_values" in s else 0 for s in sequences]
    lengths = [len(s["input_ids"]) for s in sequences]
    ids = torch.cat([s["input_ids"] for s in sequences])
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    if not any(counts):
        return ids, cu, {}
    with_images = [s for s in sequences if "pixel_values" in s]
    cross = [F.pad(s["cross_attention_mask"], (0, 0, 0, max(counts) - n)) if n else
             torch.zeros(length, max(counts), MAX_TILES, dtype=torch.long)
             for s, n, length in zip(sequences, counts, lengths)]
    return ids, cu, {"pixel_values": torch.cat([s["pixel_values"] for s in with_images]),
                     "aspect_ratio_ids": torch.cat([s["aspect_ratio_ids"] for s in with_images]),
                     "aspect_ratio_mask": torch.cat([s["aspect_ratio_mask"] for s in with_images]),
                     "cross_attention_mask": torch.cat(cross), "image_counts": counts}

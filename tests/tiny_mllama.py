"""A tiny random-weight Llama 3.2 Vision checkpoint for tests (tests/tiny.py's counterpart), saved with
`save_pretrained` beside a byte-level BPE tokenizer with Llama 3's special tokens and chat format and
the image processor's config (the files data.ChatProcessor reads), and its inputs as transformers'
image processor makes them: per sequence (`process`), as a padded batch (`padded_batch`) and packed
(`pack`, data.collate's packing)."""

import torch

import synthetic

VOCAB = 320
IMAGE = VOCAB  # <|image|> is the first embedding row past the vocabulary, as 128256 is in the released models
TILE = 28  # image_size: 2x2 patches of 14 and a class token per tile, 5 vectors padded to 8
MAX_TILES = 4
CROSS_LAYERS = [1, 3]
# Llama 3's special tokens at the ids config() names: bos 1, eos 2, pad VOCAB - 1; <|image|> = IMAGE
# (synthetic.llama_tokenizer's layout, with its chat template)


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


def tokenizer():
    """A byte-level BPE over a few sentences, Llama 3's special tokens first, as a Llama 3 fast
    tokenizer of VOCAB text tokens (synthetic.llama_tokenizer: pad VOCAB - 1, <|image|> IMAGE)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = ["How many red squares are there? Count the cells of the grid, then check each row again.",
            "The answer is 12 because three rows hold four squares each. So the final answer is 12."] * 4
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB - 1,
                                                      special_tokens=synthetic.LLAMA_SPECIAL_TOKENS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return synthetic.llama_tokenizer(bpe, VOCAB)


def save(path, seed=0):
    """MllamaForConditionalGeneration of `config()` with tests/tiny.py's weights, and every tanh gate
    (zero at transformers' init: the images would not count) drawn from U(0.5, 1.5), saved in `path`
    with `tokenizer()` and `processor()`'s config."""
    from transformers import MllamaForConditionalGeneration

    from tests import tiny

    model = synthetic.open_gates(tiny.draw_weights(MllamaForConditionalGeneration(config()).eval(), seed), seed)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    processor().save_pretrained(path)
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
    images' keyword arguments (none when no sequence has an image), packed by data.collate."""
    import data

    batch = data.collate(sequences, range(len(sequences)))
    keys = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask", "image_counts")
    return batch["input_ids"], batch["cu_seqlens"], {key: batch[key] for key in keys if key in batch}

"""Tiny randomly initialised CLIP, SigLIP and SigLIP2 models with their processors, built and
saved with ``save_pretrained`` entirely offline (no hub): tokenizers come from a vocabulary
written here (CLIP, SigLIP2) or a sentencepiece model trained here (SigLIP)."""

from __future__ import annotations

import io
from pathlib import Path

import torch

LETTERS = list("abcdefghijklmnopqrstuvwxyz")
SENTENCES = [
    "a photo of a cat",
    "a red car on the road",
    "two dogs playing in the park",
    "the quick brown fox jumps over the lazy dog",
]
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def build_clip(folder: Path) -> Path:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) + i for i, c in enumerate(LETTERS)})
    vocab.update({f"{c}</w>": len(vocab) + i for i, c in enumerate(LETTERS)})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(
            TEXT, vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0,
            eos_token_id=1, pad_token_id=1,
        ),
        vision_config=VISION,
        projection_dim=24,
    )  # fmt: skip
    torch.manual_seed(0)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
    )
    return _save(CLIPModel(config), processor, folder)


def build_siglip(folder: Path) -> Path:
    import sentencepiece as spm
    from transformers import (
        SiglipConfig,
        SiglipImageProcessorPil,
        SiglipModel,
        SiglipProcessor,
        SiglipTokenizer,
    )

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20),
        model_writer=buf,
        vocab_size=40,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=3,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    spiece = folder / "spiece.model"
    spiece.write_bytes(buf.getvalue())
    tokenizer = SiglipTokenizer(vocab_file=str(spiece))
    config = SiglipConfig(
        text_config=dict(
            TEXT, vocab_size=64, max_position_embeddings=64, bos_token_id=None, eos_token_id=1,
            pad_token_id=0,
        ),
        vision_config=VISION,
    )  # fmt: skip
    torch.manual_seed(1)
    processor = SiglipProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    return _save(SiglipModel(config), processor, folder)


def build_siglip2(folder: Path) -> Path:
    from transformers import (
        Siglip2Config,
        Siglip2ImageProcessorPil,
        Siglip2Model,
        Siglip2Processor,
        Siglip2Tokenizer,
    )

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in [*LETTERS, "▁"]:
        vocab.setdefault(c, len(vocab))
    tokenizer = Siglip2Tokenizer(vocab=vocab, merges=[])
    vision = {k: v for k, v in VISION.items() if k != "image_size"}
    config = Siglip2Config(
        text_config=dict(
            TEXT, vocab_size=64, max_position_embeddings=64, bos_token_id=2, eos_token_id=1,
            pad_token_id=0,
        ),
        vision_config=dict(vision, num_patches=16),
    )  # fmt: skip
    torch.manual_seed(2)
    processor = Siglip2Processor(
        image_processor=Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16),
        tokenizer=tokenizer,
    )
    return _save(Siglip2Model(config), processor, folder)


def _save(model, processor, folder: Path) -> Path:
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


BUILDERS = {"clip": build_clip, "siglip": build_siglip, "siglip2": build_siglip2}

"""Build a tiny, randomly initialised Qwen2.5-VL offline (it prints its exact parameter count).

What it is for
    Every script in this project loads a Qwen2.5-VL checkpoint through the real code path
    (`transformers.AutoModelForImageTextToText.from_pretrained`, `vllm.LLM(model=...)`).
    On a CPU machine without access to a model hub we still want to run all of it, end to end:
    this script writes a folder with the *same architecture* (vision tower, merger, M-RoPE
    language model), a byte-level BPE tokenizer carrying Qwen's special tokens, the
    Qwen2.5-VL image/video processors and a Qwen-style chat template. transformers and vLLM
    load it exactly like `Qwen/Qwen2.5-VL-7B-Instruct`; only the sizes differ.

    The weights are random (seeded), so the model produces gibberish. Tests use it for
    transport, shapes and invariances; the training demo uses it to show the machinery move.

Sizes (chosen so that vLLM's CPU attention kernels accept them: head_dim 16 is rejected, 64 works):
    text:   hidden 128, 2 layers, 2 query heads, 1 KV head, head_dim 64, M-RoPE [8, 12, 12]
    vision: hidden 32, depth 2, 2 heads, patch 14, merge 2, out_hidden_size 128 (= text hidden)
    vocab:  byte-level BPE learned from a small corpus, at most `--vocab_size` tokens including
            Qwen's 8 special tokens (the corpus yields 701 with the default 1,024)

Usage
    python -m demo.tiny_model --output_dir tiny_model            # writes ./tiny_model
    python -m demo.tiny_model --output_dir /tmp/m --seed 1       # another deterministic draw
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import tyro

# Qwen2.5-VL's special tokens, in the order Qwen's tokenizer lists them after the BPE vocab.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A Qwen2.5-VL-style chat template (our own Jinja, same token layout as the released model):
# a default system turn when none is given, images as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclasses.dataclass
class Args:
    output_dir: str = "tiny_model"
    """folder to write (created if missing; existing files are overwritten)"""
    seed: int = 0
    """seed for the random weights; the same seed gives byte-identical weights"""
    vocab_size: int = 1024
    """upper bound on the tokenizer's size, special tokens included (BPE stops earlier when the
    small corpus has no more merges: 701 tokens at 1,024)"""
    min_pixels: int = 3136
    """image processor lower bound in pixels (paper/official: 3,136 = 4 patches of 28x28)"""
    max_pixels: int = 200_704
    """image processor upper bound in pixels (the paper uses 1,806,336; 200,704 = 256 merged
    tokens keeps CPU runs fast). Training/evaluation scripts pass their own bound anyway."""
    warm_start_data: str | None = None
    """optional: a JSONL in the training schema with a `solution` column (demo_data.py writes
    one). The random model is then fine-tuned on (prompt -> solution) for `warm_start_steps`,
    so that it writes the <think>/<answer> layout and some facts: a cold random model earns
    reward 0 everywhere and GRPO has nothing to learn from."""
    warm_start_steps: int = 150
    """optimizer steps of the warm start (batch 8, AdamW)"""
    warm_start_lr: float = 3e-3
    """learning rate of the warm start"""
    warm_start_max_pixels: int = 50_176
    """image size bound (pixels) used during the warm start (50,176 = 224 x 224 = 64 tokens)"""


def tokenizer_corpus() -> list[str]:
    """Deterministic text the BPE is trained on: the project's prompt words, math, tags, digits."""
    from data import INSTRUCTION  # the same words the model will see in prompts

    lines = [INSTRUCTION]
    lines += [f"<think>\n{a} + {b} = {a + b}\n</think>\n<answer>\n\\boxed{{{a + b}}}\n</answer>"
              for a in range(0, 60, 3) for b in range(1, 40, 7)]
    lines += [f"<info{k}>1</info{k}>" for k in range(1, 10)]
    words = ("find the measure of angle segment triangle circle radius diameter length area "
             "perimeter parallel perpendicular line point right isosceles rectangle square "
             "quadrilateral parallelogram hypotenuse in degrees units round to nearest tenth "
             "the diagram shows that is a with and of so therefore answer choice A B C D x y "
             "m \\angle \\odot \\frac \\sqrt \\pi = + - * / ( ) ° ∠ ∥ ⊥ △ π √").split()
    lines += [" ".join(words[i:i + 12]) for i in range(0, len(words), 5)]
    return lines * 3


def build_tokenizer(vocab_size: int):
    """Byte-level BPE (like Qwen's) trained on `tokenizer_corpus`, wrapped as Qwen2TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_config(tok, hidden_size: int = 128, num_layers: int = 2):
    """Qwen2.5-VL config with tiny sizes (benchmarks pass larger ones; head_dim stays 64);
    special-token ids point into our tokenizer."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = len(tok)
    text = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=1,  # head_dim = 64: vLLM's CPU attention rejects 16
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [8, 12, 12]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        out_hidden_size=hidden_size,
        fullatt_block_indexes=[1],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_processor(tok, min_pixels: int, max_pixels: int):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor()
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(output_dir: str | os.PathLike, seed: int = 0, vocab_size: int = 1024,
                     min_pixels: int = 3136, max_pixels: int = 200_704, hidden_size: int = 128,
                     num_layers: int = 2) -> Path:
    """Write the tiny checkpoint to `output_dir` and return its path. Deterministic for `seed`."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size)
    config = build_config(tok, hidden_size, num_layers)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    build_processor(tok, min_pixels, max_pixels).save_pretrained(out)
    # One record of how the folder was made, for humans and for cache checks in tests.
    (out / "tiny_model.json").write_text(json.dumps(
        {"seed": seed, "vocab_size": vocab_size, "min_pixels": min_pixels, "max_pixels": max_pixels,
         "parameters": sum(p.numel() for p in model.parameters())}, indent=2))
    return out


def warm_start(model_dir: str | os.PathLike, data_file: str | os.PathLike, steps: int = 150,
               lr: float = 3e-3, max_pixels: int = 50_176, batch_size: int = 8, seed: int = 0) -> list[float]:
    """Supervised fine-tuning of the tiny model on (prompt -> row["solution"]), loss on the
    solution tokens only; overwrites the weights in `model_dir`. Returns the loss per step. The
    prompt is the training prompt of the row (data.row_prompt: geometry or a perception task)."""
    import random

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import data

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    rows = [r for r in data.load_rows(str(data_file)) if r.get("solution")]
    if not rows:
        raise ValueError(f"{data_file}: no row has a 'solution' to warm-start on")
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    examples = []
    for row in rows:  # tokenise once: prompt ids from the processor (image tokens expanded)
        images = data.row_images(row, 3136, max_pixels)
        enc = processor(text=[data.row_prompt(processor, row, len(images))], images=images, return_tensors="pt")
        target = processor.tokenizer(row["solution"], add_special_tokens=False)["input_ids"] + [eos]
        examples.append((enc, target))
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        batch = collate_sft(rng.sample(examples, min(batch_size, len(examples))), processor.tokenizer.pad_token_id)
        opt.zero_grad()
        # image-token marks for Qwen2.5-VL's 3-D positions (as vLLM computes them)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       mm_token_type_ids=batch["mm_token_type_ids"], pixel_values=batch["pixel_values"],
                       image_grid_thw=batch["image_grid_thw"]).logits[:, :-1]
        targets = batch["input_ids"][:, 1:]
        mask = batch["loss_mask"][:, 1:]
        token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        loss = ((token_loss * mask).sum(1) / mask.sum(1)).mean()  # mean over sequences of their token mean
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    model.save_pretrained(model_dir)
    return losses


def collate_sft(examples: list, pad_id: int) -> dict:
    """Right-padded batch of (processor encoding of the prompt, target ids): the loss mask covers
    the target tokens only."""
    import torch

    lengths = [enc["input_ids"].shape[1] + len(target) for enc, target in examples]
    N, T = len(examples), max(lengths)
    batch = {"input_ids": torch.full((N, T), pad_id), "attention_mask": torch.zeros((N, T), dtype=torch.long),
             "mm_token_type_ids": torch.zeros((N, T), dtype=torch.long), "loss_mask": torch.zeros((N, T))}
    for i, (enc, target) in enumerate(examples):
        P, L = enc["input_ids"].shape[1], lengths[i]
        batch["input_ids"][i, :L] = torch.cat([enc["input_ids"][0], torch.tensor(target)])
        batch["attention_mask"][i, :L] = 1
        batch["mm_token_type_ids"][i, :P] = enc["mm_token_type_ids"][0]
        batch["loss_mask"][i, P:L] = 1.0
    batch["pixel_values"] = torch.cat([enc["pixel_values"] for enc, _ in examples])
    batch["image_grid_thw"] = torch.cat([enc["image_grid_thw"] for enc, _ in examples])
    return batch


def main(args: Args) -> None:
    out = build_tiny_model(args.output_dir, args.seed, args.vocab_size, args.min_pixels, args.max_pixels)
    info = json.loads((out / "tiny_model.json").read_text())
    print(f"wrote tiny Qwen2.5-VL ({info['parameters']:,} parameters) to {out}")
    if args.warm_start_data:
        losses = warm_start(out, args.warm_start_data, args.warm_start_steps, args.warm_start_lr,
                            args.warm_start_max_pixels, seed=args.seed)
        info.update(warm_start_data=str(args.warm_start_data), warm_start_steps=args.warm_start_steps,
                    warm_start_loss_first=losses[0], warm_start_loss_last=losses[-1])
        (out / "tiny_model.json").write_text(json.dumps(info, indent=2))
        print(f"warm start: {args.warm_start_steps} steps, loss {losses[0]:.2f} -> {losses[-1]:.2f}")


if __name__ == "__main__":
    main(tyro.cli(Args))

"""Write a Hugging Face `CLIPModel` folder of ViT-B-32's architecture (random weights) for Infinity.

    <infinity venv>/bin/python benchmarks/peers/infinity_clip_folder.py FOLDER

Run by benchmarks/bench_peer.py in Infinity's own virtualenv, with that venv's transformers. FOLDER
already holds `vocab.json` and `merges.txt`, which bench_peer converted from the CLIP BPE file
open_clip ships (no hub download: this machine reaches none). transformers' default `CLIPConfig`
is ViT-B/32's: 12-layer 768-wide image tower on 32 px patches of 224 px images, 12-layer 512-wide
text tower with 77 positions, 512-dimensional projections, as open_clip's `ViT-B-32` config.
Prints the ids of a check phrase, which bench_peer compares with open_clip's tokenizer.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

folder = Path(sys.argv[1])
torch.manual_seed(0)
CLIPModel(CLIPConfig()).save_pretrained(folder)
tokenizer = CLIPTokenizerFast(
    vocab_file=str(folder / "vocab.json"),
    merges_file=str(folder / "merges.txt"),
    bos_token="<|startoftext|>",
    eos_token="<|endoftext|>",
    unk_token="<|endoftext|>",
    pad_token="<|endoftext|>",
    model_max_length=77,
)
CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)
print(json.dumps({"check_ids": tokenizer(sys.argv[2] if len(sys.argv) > 2 else "a red circle")["input_ids"]}))

"""Ask a Florence-VL model about an image; the answer is printed as it is generated.

    python sample.py --model jiuhai/florence-vl-3b-sft --image photo.jpg --prompt "What is in the image?"
    python sample.py --model jiuhai/florence-vl-8b-sft --image photo.jpg --chat       # a conversation
    python sample.py --model runs/default/final --image scene.png --prompt "What word is written in the image?"

The answer goes to stdout; what was loaded, and how, goes to stderr. The prompt is built as the official
code builds it (see data.py), the image turned upright by its EXIF orientation and then processed as the
official processor does. A pretrain checkpoint (plain template) continues from the image with a caption
when --prompt is empty.
"""
import argparse
import sys
import time

import torch
from checkpoint import CheckpointError, pick_dtype, stored_numel, weight_files
from data import IMAGE_TOKEN, PROMPT_STYLES, TEMPLATE_NAMES, DataError, load_image, tokenize_prompt
from florence_encoder import preprocess
from fusion import FlorenceVL
from generate import stream_text
from lora import from_pretrained as load_checkpoint_or_adapter
from lora import weights_folder


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options of loading a model and building its prompts (sample.py and eval.py)."""
    p.add_argument("--model", required=True, help="a Florence-VL checkpoint: a local folder or a hub id "
                                                  "(jiuhai/florence-vl-{3b,8b}-{pretrain,sft})")
    p.add_argument("--tower", help="a Florence-2 checkpoint (folder or hub id) for the vision tower, when the model's "
                                   "own weights or config do not provide it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on a GPU (fp16 without bf16) and on a CPU with native bf16 (AVX512-BF16 / AMX); "
                        "on a CPU without it fp32 when the model fits in memory in fp32 (bf16 runs several times "
                        "slower there), else bf16")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: the LLM's Linears as int8 weights with a scale per row, quantized while loading "
                        "(half the memory of bf16; quantize.py)")
    p.add_argument("--conv-mode", choices=TEMPLATE_NAMES, default=None,
                   help="the conversation template (default: the checkpoint's; plain for a pretrain checkpoint)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="official",
                   help="official: the ids the released models were trained on (two BOS tokens for llama3); "
                        "clean: one BOS")


def load_model(args) -> FlorenceVL:
    """Load --model as asked, report it on stderr, and stop with a clear message if it cannot be used."""
    t0 = time.time()
    try:
        fp32_bytes = 4 * stored_numel(weight_files(weights_folder(args.model)))  # auto-dtype's question: does fp32 fit?
        dtype, why = pick_dtype(args.dtype, args.device, fp32_bytes)
        model = load_checkpoint_or_adapter(args.model, dtype=dtype, tower=args.tower,
                                           quantize=args.quantize).to(args.device)
    except CheckpointError as e:
        raise SystemExit(f"cannot load {args.model}: {e}")
    if model.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer: looked for tokenizer.json, or tokenizer.model with "
                         "tokenizer_config.json, next to its config.json")
    if args.conv_mode:
        model.template = args.conv_mode
    n = sum(t.numel() for t in [*model.parameters(), *model.buffers()] if t.dtype != torch.bool)
    size = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"
    precision = str(dtype).removeprefix("torch.") + (", LLM Linears int8" if args.quantize else "")
    print(f"{args.model}: {size} parameters, {precision} on {args.device} ({why}), "
          f"template {model.template}, tower {model.tower_note} ({time.time() - t0:.1f} s)", file=sys.stderr)
    return model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--image", help="the image to ask about (omit for a text-only question)")
    p.add_argument("--prompt", help="the question; with --chat, the first one (then read from stdin)")
    p.add_argument("--chat", action="store_true", help="keep a multi-turn conversation about the image")
    p.add_argument("--max-new-tokens", type=int, default=128, help="the official evaluation's default")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def answer(model, conversations, pixel_values, args, out=None) -> str:
    """Stream the reply to the conversation so far (LLaVA turns ending with a human one); return it."""
    out = out or sys.stdout  # looked up now, so that redirected stdout is honoured
    ids = tokenize_prompt(conversations, model.tokenizer, model.template, pixel_values is not None,
                          style=args.prompt_style)
    ids = torch.tensor([ids], device=args.device)
    embeds, mask = model.prompt_inputs(ids, None, pixel_values)
    text = []
    generator = torch.Generator(args.device).manual_seed(args.seed)
    for piece in stream_text(model.llm, model.tokenizer, None, inputs_embeds=embeds, attention_mask=mask, strip=True,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             generator=generator):
        out.write(piece)
        out.flush()
        text.append(piece)
    out.write("\n")
    return "".join(text)


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    if not args.chat and args.prompt is None:
        raise SystemExit("give --prompt, or --chat for a conversation")
    model = load_model(args)
    if model.template == "plain":
        print("plain template (a pretrain checkpoint): the model was trained to caption the image; an empty --prompt "
              "asks for exactly that", file=sys.stderr)
    pixel_values = None
    if args.image:
        try:
            image = load_image(args.image)  # RGB, upright; a bad file is named
        except DataError as e:
            raise SystemExit(str(e))
        dtype = next(model.parameters()).dtype
        pixel_values = preprocess([image], pad_to_square=model.cfg.image_aspect_ratio == "pad",
                                  size=model.cfg.vision.image_size).to(args.device, dtype)
    conversations = []
    question = args.prompt
    while True:
        if question is None:
            try:
                question = input("you> ").strip()
            except EOFError:
                return
            if not question:
                return
        prefix = IMAGE_TOKEN + "\n" if pixel_values is not None and not conversations else ""
        conversations.append({"from": "human", "value": prefix + question})
        if args.chat:
            sys.stdout.write("model> ")
        reply = answer(model, conversations, pixel_values, args)
        conversations.append({"from": "gpt", "value": reply})
        if not args.chat:
            return
        question = None


if __name__ == "__main__":
    main()

"""Ask a Florence-VL model about an image; the answer is printed as it is generated.

    python sample.py --model runs/default/final --image photo.png --prompt "What word is written in the image?"
    python sample.py --model jiuhai/florence-vl-3b-sft --image photo.jpg --chat      # a conversation
    python sample.py --model ... --image ... --prompt "..." --device cuda --dtype bf16 --temperature 0.7
"""
import argparse
import sys

import torch
from data import IMAGE_TOKEN, DataError, load_image, tokenize_prompt
from florence_encoder import preprocess
from fusion import FlorenceVL
from generate import stream_text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Florence-VL checkpoint folder or hub id")
    p.add_argument("--image", help="the image to ask about (omit for a text-only question)")
    p.add_argument("--prompt", help="the question; with --chat, the first one (then read from stdin)")
    p.add_argument("--chat", action="store_true", help="keep a multi-turn conversation about the image")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def answer(model, conversations, pixel_values, args, out=None) -> str:
    """Stream the reply to the conversation so far (LLaVA turns ending with a human one); return it."""
    out = out or sys.stdout  # looked up now, so that redirected stdout is honoured
    ids = tokenize_prompt(conversations, model.tokenizer, model.template, pixel_values is not None)
    ids = torch.tensor([ids], device=args.device)
    embeds, mask, _ = model.prepare_inputs(ids, None, pixel_values)
    text = []
    generator = torch.Generator(args.device).manual_seed(args.seed)
    for piece in stream_text(model.llm, model.tokenizer, None, inputs_embeds=embeds, attention_mask=mask,
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
    if not args.chat and not args.prompt:
        raise SystemExit("give --prompt, or --chat for a conversation")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = FlorenceVL.from_pretrained(args.model, dtype=dtype).to(args.device)
    if model.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer.json")
    pixel_values = None
    if args.image:
        try:
            image = load_image(args.image)  # RGB, upright; a bad file is named
        except DataError as e:
            raise SystemExit(str(e))
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

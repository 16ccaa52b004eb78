"""Benchmarks: this implementation against the transformers-based reference, side by side.

    python bench.py                                           # CPU, fp32, 1 thread, cases 1-4 (5 needs CUDA)
    python bench.py --cases 3 --repeats 5 --threads 2
    python bench.py --device cuda --dtype bf16 --cases 1,2,3,5
    python bench.py --cases 6,7,8 --threads 2 --checkpoints DIR     # CPU, real sizes, bf16 / int8 (minutes)

Cases 1-3 build one random model with transformers, copy its weights into ours (the same loaders the
parity tests use), check that both compute the same thing, then time them in the same process,
alternating ours / reference / reference / ours ..., after warm-up. The table shows medians and the
ratio ours / reference (lower is better). What each reference computes:

1  vision features [V, V'_1, V'_2, V'_3] of a batch of 768x768 images, Florence-2-base shapes.
   Reference = what the official Florence-VL tower does: `generate(input_ids=task_ids, pixel_values=...)`
   on Florence-2, i.e. every (image, prompt) pair is one encoder sample with its own image features, so
   DaViT runs 3 times per image (transformers: get_image_features on the pixels repeated per prompt,
   placeholder merge, BART encoder -- the encoder half of Florence2Model.forward). The one decoder step
   of generate(max_new_tokens=1) is left out, in the reference's favour. Row 1b: the reference given
   one DaViT pass per image (the same work as ours), to separate the saved work from the code.
2  one training step (forward + backward, everything trainable as in stage 1) of the whole model:
   Florence-2-base tower, mlp3x_gelu projector, a Phi-3.5-mini-wide decoder of --llm-layers layers.
   Reference = the official data flow from transformers parts: the features of case 1, the projector,
   the LLaVA splice, Phi3ForCausalLM(inputs_embeds, attention_mask, labels).loss.backward(). Row 2b: the
   same with one DaViT pass per image.
3  greedy decoding of 64 tokens after a 32-token prompt with a KV cache, batch 1 and 8, on a
   Phi-3.5-mini-wide decoder of --llm-layers layers: LLM.generate vs transformers' generate
   (do_sample=False, no stop token); the tokens must be identical.
4  data-parallel scaling of train.py's default (torchrun, gloo): tokens/s with 2 processes vs 1, each
   process with --threads intra-op threads, from train.py's own JSONL log.
5  (CUDA only) bf16 training MFU of a Phi-3.5-mini-wide decoder (as many layers as fit, autocast over
   fp32 weights + fused AdamW, as train.py does), FLOPs from torch.utils.flop_counter; batch-1 decode
   tokens/s as a share of the memory-bandwidth roofline, eager and through generate.compile_decode (CUDA
   graphs); time to first token of Florence-VL-3B (one 768 px image + a 30-token question). --dry-run runs
   it on the CPU at tiny sizes (device_check.py --device cpu); --json writes its figures.

6  (CPU, bench_real.py) Florence-VL-3B at its real shapes, bf16: Florence-2-large tower at 768 px, Phi-3.5-mini
   with all 32 layers, random weights. Time to first token (TTFT) of one image + a 30-token question (617
   tokens: the whole prompt path, vision features, projector, splice, LLM prefill, first token) and decode
   ms/token at batch 1 (--real-tokens new tokens, both forced to make as many; the tokens compared), from one
   answer's clock readings at each token. Reference = the official path from transformers parts: native
   Florence2ForConditionalGeneration features for the three task prompts, every (image, prompt) pair its own
   encoder sample (DaViT 3 times per image, as in case 1), channel concat, the projector, the LLaVA splice,
   Phi3ForCausalLM.generate(inputs_embeds=..., greedy, KV cache). transformers builds the models once; ours
   is given their tensors (shared storage: both fit in memory together). Also: each side's TTFT split into
   DaViT / encoder / projector / prefill (forward hooks), their FLOPs (FlopCounterMode, with a formula for
   the CPU SDPA kernel, which it does not count by itself), the share of a bare bf16 matmul each stage
   reaches, and the peak RSS of each side built alone in a child process (tests/memory.py) with one TTFT.
   Targets: TTFT <= 0.75 x the reference, decode <= 1.0 x.
7  (CPU) the same with ours quantize='int8' (the LLM's Linears int8, one scale per row), the reference still
   bf16 (what a user would pick instead): TTFT and decode ms/token (target: decode <= 0.6 x the reference's
   bf16), and each decode step as a share of the memory-bandwidth roofline, a bare matrix-vector pass over
   the same bytes (F.linear over the bf16 weight matrices, torch._weight_int8pack_mm over the int8 ones);
   ours' int8 peak RSS in a child.
8  (CPU, bench_loading.py) loading at full size: random Florence-VL-3B and -8B checkpoints in the official LLaVA layout
   (names and shapes from FlorenceVL on the meta device, bf16 shards <= 5 GB + model.safetensors.index.json,
   config.json, vision_tower/config.json; each tensor drawn as it is written, the builder never holds the
   model; in a temp folder, or --checkpoints DIR to keep and reuse them: ~26 GB), then, each in a child
   process, FlorenceVL.from_pretrained(folder, dtype, quantize) for int8, bf16, fp32: peak memory added,
   the loaded model's bytes, their ratio (target <= 1.15), seconds (what cannot fit in RAM is skipped, with
   the reason). Also save_pretrained of the loaded 3B bf16 model (peak added over it, target <= one 5 GB
   shard) and the 8B int8 whole-process peak (target <= 10 GiB).

On the CPU the times are process CPU time (wall time also counts other jobs' turns on our core; both
are printed); on CUDA wall time. Cases 6-7 use wall time when --threads > 1 (process CPU time sums the
threads), CPU time with 1 thread. Every repeat is printed, not only the medians.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
import bench_cases  # noqa: E402  cases 1-5


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="weights (cases 1, 3) / autocast (case 2); case 5 is always bf16, cases 6-8 bf16 (7: int8)")
    p.add_argument("--cases", default="1,2,3,4,5",
                   help="comma-separated case numbers (5 needs --device cuda; 6, 7, 8 run on the CPU, take minutes "
                        "and need ~20 GiB of RAM: not in the default)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (and OMP_NUM_THREADS per process in case 4). 1 by default: on a "
                        "busy 2-core machine 2 threads can be 10x slower than 1")
    p.add_argument("--vision-batch", type=int, default=2, help="case 1: images per batch")
    p.add_argument("--train-batch", type=int, default=1, help="case 2: samples per step")
    p.add_argument("--train-image-size", type=int, default=768, help="case 2: image size")
    p.add_argument("--llm-layers", type=int, default=2, help="cases 2 and 3: decoder layers at Phi-3.5-mini width")
    p.add_argument("--ddp-steps", type=int, default=12, help="case 4: optimiser steps per stage")
    p.add_argument("--ddp-repeats", type=int, default=2, help="case 4: runs of each process count")
    p.add_argument("--mfu-layers", default="32,24,16,12,8,4", help="case 5: layer counts to try, the first that fits")
    p.add_argument("--mfu-batch", type=int, default=4)
    p.add_argument("--mfu-seq", type=int, default=2048)
    p.add_argument("--decode-tokens", type=int, default=256, help="case 5: decode steps timed")
    p.add_argument("--dry-run", action="store_true",
                   help="case 5 on the CPU at tiny sizes: its code, not its figures (device_check.py --device cpu)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows and case 5's figures as JSON")
    import bench_loading  # case 8
    import bench_real  # cases 6-7
    bench_real.add_arguments(p)
    bench_loading.add_arguments(p)
    args = p.parse_args(argv)
    args.mfu_layers = [int(x) for x in args.mfu_layers.split(",")]
    args.figures = {}
    cases = [int(c) for c in args.cases.split(",") if c.strip()]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.set_num_threads(args.threads)

    reference = "transformers (not used)"
    if set(cases) - {5}:  # case 5 alone (device_check.py) has no reference: ~4 s of imports saved
        import transformers
        transformers.logging.set_verbosity_error()  # its notes on the rope config of a random Phi-3
        reference = f"transformers {transformers.__version__}"
    print(f"bench.py | {bench_cases.machine(device)} | torch {torch.__version__} | {reference} | "
          f"torch.set_num_threads({args.threads}) | {args.dtype} | repeats {args.repeats} (+{args.warmup} warm-up), "
          f"ours / reference alternating, medians of {'process CPU time' if device.type == 'cpu' else 'wall time'}")
    rows = []
    for c in cases:
        t0 = time.time()
        if c == 1:
            rows += bench_cases.case_vision(args, device, dtype)
        elif c == 2:
            rows += bench_cases.case_train(args, device, dtype)
        elif c == 3:
            rows += bench_cases.case_decode(args, device, dtype)
        elif c == 4:
            rows += bench_cases.case_ddp(args)
        elif c == 5:
            if device.type != "cuda" and not args.dry_run:
                print("case 5: skipped (needs --device cuda, or --dry-run)")
                rows.append(("5", "GPU MFU and decode roofline", "skipped: needs --device cuda", "-", "-", "-", "-"))
                continue
            rows += bench_cases.case_gpu(args, device)
        elif c in (6, 7, 8):
            if device.type != "cpu":
                raise SystemExit(f"case {c} runs on the CPU (drop --device {device.type})")
            rows += {6: bench_real.case_real_bf16, 7: bench_real.case_real_int8, 8: bench_loading.case_loading}[c](args)
        else:
            raise SystemExit(f"unknown case {c}")
        print(f"    ({time.time() - t0:.0f} s)\n", flush=True)

    head = ("case", "what", "ours", "reference", "ours/ref", "target", "met")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "figures": args.figures}, indent=1))


if __name__ == "__main__":
    main()

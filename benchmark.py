"""Speed and memory of XComposer2 generation, ours against the upstream way, in one run.

    python benchmark.py                      # CUDA: full size (XComposer2-VL-7B) with random bf16 weights
    python benchmark.py --size small         # CPU: a small model, same prompts scaled down
    python benchmark.py --size tiny --quick  # seconds; what the tests run
    python benchmark.py --hd --size small    # XComposer-2.5: prefill of one image at hd_num 24

Measures prefill latency (one image + 64 text tokens), time to first token, batch-1 decode tokens/s, batched
decode throughput, and peak memory, for each mode:
- ours: Partial LoRA on image rows by index (no host sync, no work on text rows or decode steps), SDPA (or
  FlashAttention-2 with --attn flash_attention_2), KV cache; with --compile, a static cache and torch.compile.
- upstream: what the original remote code does: eager attention, no KV cache (its config disables it),
  and Partial LoRA that checks `im_mask.sum() > 0` on the host in every linear.
On CUDA it also prints the memory-bandwidth bound: decoder bytes read per token / measured copy bandwidth.
With --hd it measures XComposer-2.5 instead: preprocessing and prefill of one 16:9 image at hd_num 24 (a global
view plus 24 tiles) with 64 text tokens, ours against the upstream way. Ends with one JSON line holding every
figure.
"""

import argparse
import contextlib
import json
import os
import resource
import sys
import time

import torch
from transformers import GenerationConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from configuration_xcomposer import XComposerConfig  # noqa: E402
from transformers_compat import set_attn_implementation  # noqa: E402
from modeling_xcomposer import PartialLoRALinear, XComposerForCausalLM  # noqa: E402
from processing_xcomposer import XComposerHDImageProcessor  # noqa: E402

SIZES = {
    "full": dict(preset="xcomposer2-vl-7b"),
    "small": dict(vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                     num_attention_heads=4, image_size=224, patch_size=14),
                  text_config=dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                                   num_attention_heads=8, num_key_value_heads=2, lora_rank=64, lora_alpha=64)),
    "tiny": dict(vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=56, patch_size=14),
                 text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, lora_rank=8, lora_alpha=8)),
}


# XComposer-2.5 at three sizes; small: 112 px tiles (8 x 8 patches, 16 tokens a view) and the small decoder.
HD_SIZES = {
    "full": dict(preset="xcomposer2d5-7b"),
    "small": dict(vision_config=dict(SIZES["small"]["vision_config"], image_size=112),
                  text_config=dict(SIZES["small"]["text_config"], max_position_embeddings=8192), hd_num=24,
                  hd_num_multi=6),
    "tiny": dict(SIZES["tiny"], hd_num=24, hd_num_multi=6),
}
HD_IMAGE = (1920, 1080)  # at 560 px tiles, hd_num 24: a 3 x 4 grid; smaller tiles give more of them


def build(size: str, device, dtype, sizes=SIZES) -> XComposerForCausalLM:
    spec = dict(sizes[size])
    config = XComposerConfig.from_preset(spec.pop("preset")) if "preset" in spec else XComposerConfig(**spec)
    with torch.device("meta"):
        model = XComposerForCausalLM(config)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():  # random weights; B non-zero so Partial LoRA does real work
            if name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model.to(dtype).eval()


def upstream_partial_lora(self, x, image_rows=None):
    """The original PLoRA: a dense mask over all rows and a host-synchronising `sum() > 0` in every linear."""
    y = torch.nn.functional.linear(x, self.weight, self.bias)
    if not self.rank:
        return y
    mask = torch.zeros(x.shape[:-1].numel(), dtype=torch.bool, device=x.device)
    if image_rows is not None:
        mask[image_rows] = True
    mask = mask.view(x.shape[:-1])
    if mask.sum() > 0:
        y[mask] += self.B(self.A(x[mask])) * self.scaling
    return y


@contextlib.contextmanager
def mode(model, name: str, attn: str):
    forward = PartialLoRALinear.forward
    set_attn_implementation(model, "eager" if name == "upstream" else attn)
    if name == "upstream":
        PartialLoRALinear.forward = upstream_partial_lora
    try:
        yield
    finally:
        PartialLoRALinear.forward = forward


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def prompt(config, batch: int, num_images: int, num_text: int, device):
    ids = [1] + [7] * (num_text // 2) + [config.image_token_id] * (config.num_image_tokens * num_images)
    ids += [7] * (num_text - num_text // 2)
    input_ids = torch.tensor([ids] * batch, device=device)
    size = config.vision_config.image_size
    pixels = torch.randn(batch * num_images, 3, size, size, device=device) if num_images else None
    return input_ids, pixels


def measure(model, name, args, device, num_images, num_text) -> dict:
    config, use_cache = model.config, name != "upstream"
    gen = dict(do_sample=False, use_cache=use_cache, pad_token_id=2, eos_token_id=None)
    if name == "ours" and args.compile:
        gen.update(cache_implementation="static")
    elif hasattr(GenerationConfig(), "disable_compile"):  # 4.51+: no automatic compile of the static cache
        gen.update(disable_compile=True)

    def run(batch, new_tokens):
        input_ids, pixels = prompt(config, batch, num_images, num_text, device)
        return lambda: model.generate(input_ids=input_ids, pixel_values=pixels, attention_mask=torch.ones_like(
            input_ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens, **gen)

    input_ids, pixels = prompt(config, 1, num_images, num_text, device)
    with torch.no_grad():
        prefill = timed(lambda: model(input_ids=input_ids, pixel_values=pixels, use_cache=use_cache), device,
                        args.repeats)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ttft = timed(run(1, 1), device, args.repeats)
    total = timed(run(1, args.new_tokens), device, args.repeats)
    batched = timed(run(args.batch, args.new_tokens), device, args.repeats)
    batched_ttft = timed(run(args.batch, 1), device, args.repeats)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "prompt_tokens": input_ids.shape[1],
        "prefill_ms": 1e3 * prefill,
        "ttft_ms": 1e3 * ttft,
        "decode_tok_s": (args.new_tokens - 1) / max(total - ttft, 1e-9),
        f"batch{args.batch}_decode_tok_s": args.batch * (args.new_tokens - 1) / max(batched - batched_ttft, 1e-9),
        "peak_memory_gb": peak / 2**30,
    }


def bandwidth_bound(model, device) -> dict:
    """Decode reads every decoder weight once per token: tokens/s <= bandwidth / decoder bytes."""
    decoder = model.model.language_model
    weight_bytes = sum(p.numel() * p.element_size() for n, p in decoder.named_parameters()
                       if not n.endswith((".A.weight", ".B.weight")))  # Partial LoRA is skipped on text tokens
    weight_bytes += model.output.weight.numel() * model.output.weight.element_size()
    if device.type != "cuda":
        return {"decoder_weight_gb": weight_bytes / 1e9}
    buffer = torch.empty(2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(buffer)
    seconds = timed(lambda: target.copy_(buffer), device, 10)
    bandwidth = 2 * buffer.numel() / seconds  # a copy reads and writes each byte
    return {"decoder_weight_gb": weight_bytes / 1e9, "copy_bandwidth_tb_s": bandwidth / 1e12,
            "bound_tok_s": bandwidth / weight_bytes}


def hd_inputs(config, device, num_text: int = 64) -> dict:
    """One 16:9 picture at the config's hd_num (24), after BOS, then `num_text` text tokens."""
    from PIL import Image

    image = Image.linear_gradient("L").resize(HD_IMAGE).convert("RGB")
    processor = XComposerHDImageProcessor.for_model(config)
    start = time.perf_counter()
    features = processor([image])
    preprocess = time.perf_counter() - start
    rows, cols = features["image_grid"][0].tolist()
    count = config.hd_num_image_tokens(rows, cols)
    input_ids = torch.tensor([[1] + [config.image_token_id] * count + [7] * num_text], device=device)
    return dict(input_ids=input_ids, pixel_values=features["pixel_values"].to(device),
                image_grid=features["image_grid"].to(device)), {"grid": [rows, cols], "preprocess_ms": 1e3 * preprocess}


def hd_main(args, device, dtype) -> dict:
    model = build(args.size, device, dtype, HD_SIZES)
    inputs, facts = hd_inputs(model.config, device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    results = {"size": args.size, "device": str(device), "dtype": str(dtype).split(".")[-1], "hd_num": 24,
               "image": list(HD_IMAGE), "tile": model.config.vision_config.image_size, **facts,
               "prompt_tokens": inputs["input_ids"].shape[1],
               "parameters_b": sum(p.numel() for p in model.parameters()) / 1e9}
    for name in args.modes.split(","):
        with mode(model, name, args.attn), torch.no_grad():
            results[f"{name}/prefill_ms"] = 1e3 * timed(lambda: model(**inputs, use_cache=name != "upstream"),
                                                        device, args.repeats)
    print(f"XComposer-2.5 prefill, one {HD_IMAGE[0]}x{HD_IMAGE[1]} image at hd_num 24: {results['grid']} tiles of "
          f"{results['tile']} px, {results['prompt_tokens']} tokens")
    for name in args.modes.split(","):
        print(f"  {name:<10}{results[f'{name}/prefill_ms']:>10.1f} ms")
    if "ours/prefill_ms" in results and "upstream/prefill_ms" in results:
        results["speedup/prefill"] = results["upstream/prefill_ms"] / results["ours/prefill_ms"]
        print(f"  speed-up over upstream-style: x{results['speedup/prefill']:.2f}")
    print(json.dumps(results))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), help="default: full on CUDA, small on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--attn", default="sdpa", help="our attention: sdpa or flash_attention_2")
    parser.add_argument("--compile", action="store_true", help="ours with a static cache and torch.compile")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to decode (default 64, quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 3, quick 1)")
    parser.add_argument("--modes", default="ours,upstream")
    parser.add_argument("--quick", action="store_true", help="few tokens and repeats, for smoke tests")
    parser.add_argument("--hd", action="store_true", help="XComposer-2.5: prefill of one image at hd_num 24")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.size = args.size or ("full" if device.type == "cuda" else "small")
    args.new_tokens = args.new_tokens or (4 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 3)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.hd:
        return hd_main(args, device, dtype)

    model = build(args.size, device, dtype)
    prompts = {"one_image_64_text": (1, 64), "text_heavy": (1, 512 if args.size != "tiny" else 64),
               "image_heavy": (4, 16)}
    results = {"size": args.size, "device": str(device), "dtype": str(dtype).split(".")[-1],
               "parameters_b": sum(p.numel() for p in model.parameters()) / 1e9, **bandwidth_bound(model, device)}
    for name in args.modes.split(","):
        with mode(model, name, args.attn):
            for prompt_name, (num_images, num_text) in prompts.items():
                results[f"{name}/{prompt_name}"] = measure(model, name, args, device, num_images, num_text)

    print(f"{'mode/prompt':<32}{'tokens':>7}{'prefill ms':>12}{'TTFT ms':>10}{'decode tok/s':>14}"
          f"{f'b{args.batch} tok/s':>12}{'peak GB':>9}")
    for key, row in results.items():
        if isinstance(row, dict):
            values = list(row.values())
            print(f"{key:<32}{values[0]:>7}" + "".join(f"{v:>{w}.1f}" for v, w in zip(values[1:], (12, 10, 14, 12, 9))))
    for prompt_name in prompts:
        if f"ours/{prompt_name}" in results and f"upstream/{prompt_name}" in results:
            ours, theirs = results[f"ours/{prompt_name}"], results[f"upstream/{prompt_name}"]
            speedup = ours["decode_tok_s"] / theirs["decode_tok_s"]
            results[f"speedup/{prompt_name}"] = speedup
            print(f"speed-up over upstream-style, {prompt_name}: decode x{speedup:.1f}, "
                  f"prefill x{theirs['prefill_ms'] / ours['prefill_ms']:.1f}")
    if "bound_tok_s" in results:
        print(f"bandwidth bound: {results['bound_tok_s']:.0f} tok/s "
              f"({results['decoder_weight_gb']:.1f} GB at {results['copy_bandwidth_tb_s']:.2f} TB/s)")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()

"""The numbers a transformers release must reproduce: one run of this script records them, in whatever
environment runs it, and tests/version_matrix.py compares every release's record with the pinned stack's.

    python tests/parity_probe.py fixtures DIR        # once, on the pinned stack: folders every release then loads
    python tests/parity_probe.py measure DIR OUT.pt  # in each environment: loads DIR's folders, records outputs

The fixtures are what users download: tiny v1 and v2 model folders written by this repository's writer on the
pinned stack, and tiny upstream-layout checkpoints for the converter. The record holds, for both generations:
Auto-class loading; logits of a prompt with an image; greedy, sampled (seeded) and beam-search tokens with and
without the KV cache; a left-padded batch; streaming; model.chat; the processor's and tokenizer's outputs; a
save/load round trip made in this environment; the converter's output and its logits; and the answers of the
embedded default_model to freshly drawn pictures.
"""

import io
import json
import os
import subprocess
import sys
import tempfile
from contextlib import redirect_stdout

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

VERSIONS = {"v2": 2, "v1": 1}


def picture(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_fixtures(folder: str) -> None:
    from conftest import build_model
    from tiny_sp import tiny_sp_path
    from upstream_reference import make_upstream_state_dict, tiny_upstream_config, write_upstream_checkpoint

    from model_folder import save_model_folder
    from processing_xcomposer import XComposerProcessor
    from tokenization_internlm import InternLMTokenizer

    for name, version in VERSIONS.items():
        model = build_model(version, max_position_embeddings=1024)
        tokenizer = InternLMTokenizer(vocab_file=tiny_sp_path(version))
        if version == 1:  # as upstream v1 (and the converter): two added tokens after the sentencepiece pieces
            tokenizer.add_tokens(["<ITG_TOKEN>", "<SOI_TOKEN>"])
        processor = XComposerProcessor.for_model(model.config, tokenizer)
        save_model_folder(model, processor, os.path.join(folder, name))
        config = tiny_upstream_config(version, torch_dtype="float32")
        write_upstream_checkpoint(os.path.join(folder, f"upstream_{name}"), config, make_upstream_state_dict(config),
                                  tokenizer_model_path=tiny_sp_path(version))


def measure(folder: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, TextIteratorStreamer

    torch.set_num_threads(1)  # the same reductions in every environment
    record = {}
    for name in VERSIONS:
        path = os.path.join(folder, name)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).float().eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        image, other = picture(1), picture(2, (17, 23))
        messages = [{"role": "system", "content": ""}, {"role": "user", "content": "<ImageHere>What is it?"}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=prompt, images=[image])
        gen = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   pixel_values=inputs["pixel_values"], max_new_tokens=6, min_new_tokens=6)
        with torch.no_grad():
            record[f"{name}/logits"] = model(**inputs).logits
            record[f"{name}/greedy"] = model.generate(**gen, do_sample=False).tolist()
            record[f"{name}/greedy_no_cache"] = model.generate(**gen, do_sample=False, use_cache=False).tolist()
            torch.manual_seed(0)
            record[f"{name}/sample"] = model.generate(**gen, do_sample=True, top_k=20).tolist()
            record[f"{name}/beam"] = model.generate(**gen, do_sample=False, num_beams=2).tolist()
            record[f"{name}/beam_no_cache"] = model.generate(**gen, do_sample=False, num_beams=2,
                                                             use_cache=False).tolist()
            batch = processor(text=["<ImageHere>a red circle", "Two<ImageHere> and <ImageHere>."],
                              images=[[image], [other, image]])
            record[f"{name}/batch_ids"] = batch["input_ids"].tolist()
            record[f"{name}/batch"] = model.generate(**batch, max_new_tokens=5, min_new_tokens=5,
                                                     do_sample=False).tolist()
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        model.generate(**gen, do_sample=False, streamer=streamer)
        record[f"{name}/streamed"] = "".join(streamer)
        record[f"{name}/chat"] = model.chat(processor, "What colour is it?", images=image, system="",
                                            max_new_tokens=8)[0]
        record[f"{name}/pixel_values"] = inputs["pixel_values"]
        record[f"{name}/tokens"] = tokenizer("a red circle\nand 浦语 😀")["input_ids"]
        record[f"{name}/decoded"] = tokenizer.decode(record[f"{name}/greedy"][0], skip_special_tokens=True)
        record[f"{name}/decoded_raw"] = tokenizer.decode(record[f"{name}/greedy"][0])
        with tempfile.TemporaryDirectory() as saved:  # a round trip made by this release
            model.save_pretrained(saved)
            processor.save_pretrained(saved)
            again = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True).float().eval()
            with torch.no_grad():
                record[f"{name}/reloaded_logits"] = again(**inputs).logits
        record[f"{name}/converted_logits"] = convert_and_run(os.path.join(folder, f"upstream_{name}"), image)
    record["default_model"] = default_model_answers()
    record[SAMPLER] = sampler_draws()
    return record


# Seeded draws of torch.multinomial, which generate samples with. Torch releases draw differently for the
# same seed (2.4 and 2.13 do), so sampled tokens are comparable only where these are equal.
SAMPLER = "torch_sampler"


def sampler_draws() -> list[int]:
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(32, 400, generator=generator), dim=-1)
    torch.manual_seed(0)
    return [torch.multinomial(row, 1).item() for row in probs]


def convert_and_run(upstream: str, image) -> torch.Tensor:
    """This release runs the converter's CLI on an upstream checkpoint and the result's logits."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    with tempfile.TemporaryDirectory() as out:
        target = os.path.join(out, "converted")
        done = subprocess.run([sys.executable, os.path.join(ROOT, "convert_checkpoint.py"), "--quiet", upstream,
                               target], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"convert_checkpoint.py failed: {done.stderr[-2000:]}")
        model = AutoModelForCausalLM.from_pretrained(target, trust_remote_code=True).float().eval()
        processor = AutoProcessor.from_pretrained(target, trust_remote_code=True)
        with torch.no_grad():
            return model(**processor(text="<ImageHere>Describe it.", images=[image])).logits


def default_model_answers() -> list[str]:
    """demo.py's answers (the README's main job), as printed, for fixed pictures."""
    import demo

    printed = io.StringIO()
    with tempfile.TemporaryDirectory() as out, redirect_stdout(printed):
        demo.main(["--seed", "7", "--out", out])
    return [line for line in printed.getvalue().splitlines() if line.startswith(("User:", "XComposer2:"))]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "fixtures":
        write_fixtures(argv[1])
    elif len(argv) == 3 and argv[0] == "measure":
        torch.save(measure(argv[1]), argv[2])
    else:
        raise SystemExit(__doc__)
    print(json.dumps({"done": argv[0]}))


if __name__ == "__main__":
    main()

"""The main job: a chat about freshly drawn pictures with the embedded default model.

    python demo.py [--model default_model] [--seed N] [--out outputs]

`default_model/` is a small XComposer2 trained from scratch on synthetic pictures of coloured shapes by
`python tiny_synthetic.py --output_dir default_model --link_code`; if the folder is missing, this command
trains it first (15-30 minutes on 2 CPU cores). The model is loaded the way any user loads a
checkpoint: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

import argparse
import os
import random
import subprocess
import sys

from transformers import AutoModelForCausalLM, AutoProcessor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tiny_synthetic  # noqa: E402
from processing_xcomposer import IMAGE_PLACEHOLDER  # noqa: E402

DEFAULT_MODEL = os.path.join(HERE, "default_model")


def ensure_model(folder: str) -> None:
    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    print(f"{folder} is missing: training it with the tiny-synthetic recipe (15-30 minutes on 2 cores)")
    # The shipped folder links to this checkout's code; any other folder gets its own copies.
    link = ["--link_code"] if os.path.abspath(folder) == DEFAULT_MODEL else []
    subprocess.run([sys.executable, os.path.join(HERE, "tiny_synthetic.py"), "--output_dir", folder, *link],
                   check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--seed", type=int, default=None, help="picture seed (default: a new one each run)")
    parser.add_argument("--out", default="outputs", help="where the pictures are saved")
    args = parser.parse_args(argv)
    ensure_model(args.model)

    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    size = model.config.vision_config.image_size
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    os.makedirs(args.out, exist_ok=True)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
          f"picture seed {seed}\n")

    rng = random.Random(seed)
    for kind in tiny_synthetic.KINDS:
        sample = tiny_synthetic.make_sample(rng, kind, size)
        paths = []
        for i, image in enumerate(sample["images"]):
            paths.append(os.path.join(args.out, f"demo_{kind}_{i}.png"))
            image.save(paths[-1])
        response, _ = model.chat(processor, sample["question"], images=sample["images"], system="", max_new_tokens=8)
        question = sample["question"].replace(IMAGE_PLACEHOLDER, "")
        print(f"[{', '.join(paths)}]\nUser: {question}\nXComposer2: {response}    (drawn: {sample['answer']})\n")


if __name__ == "__main__":
    main()

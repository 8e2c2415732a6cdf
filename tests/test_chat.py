"""model.chat: the familiar one-call use, for both generations."""

import pytest
import torch
from conftest import build_model
from PIL import Image
from tiny_sp import tiny_sp_path
from transformers import TextStreamer

from processing_xcomposer import END_OF_TURN, XComposerProcessor
from tokenization_internlm import InternLMTokenizer


def setup(version):
    model = build_model(version)
    return model, InternLMTokenizer(vocab_file=tiny_sp_path(version))


class Collector(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.text = ""

    def on_finalized_text(self, text, stream_end=False):
        self.text += text


def argmax_decode(model, processor, inputs, steps: int) -> list[int]:
    """Greedy decoding written out: the full forward again at every step, the argmax, stop at a stop id."""
    ids, stop, new = inputs["input_ids"], processor.stop_token_ids, []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, pixel_values=inputs.get("pixel_values"), use_cache=False).logits
            token = int(logits[0, -1].argmax())
            if token in stop:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def test_chat_is_greedy_and_streams_the_same_text(version):
    model, tokenizer = setup(version)
    processor = XComposerProcessor.for_model(model.config, tokenizer)
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    streamer = Collector(tokenizer)
    response, history = model.chat(processor, "What colour is it?", images=image, system="", max_new_tokens=8,
                                   streamer=streamer)
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "<ImageHere>What colour is it?"}]
    inputs = processor.apply_chat_template(messages, images=[image], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)
    assert response and response == tokenizer.decode(argmax_decode(model, processor, inputs, 8),
                                                     skip_special_tokens=True)
    assert streamer.text.startswith(response)
    assert history == [("<ImageHere>What colour is it?", response, [image])]


def test_chat_prompt_follows_the_chat_format_and_matches_generate(version):
    model, tokenizer = setup(version)
    processor = XComposerProcessor.for_model(model.config, tokenizer)
    image = Image.new("RGB", (40, 30), (10, 10, 200))
    response, _ = model.chat(processor, "Describe it.", images=[image], system="", max_new_tokens=6)
    turn = ("[UNUSED_TOKEN_146]user\n<ImageHere>Describe it.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
            if version == 2 else " <|User|>:<ImageHere>Describe it.\n<TOKENS_UNUSED_0> <|Bot|>:")
    inputs = processor(text=turn, images=[image])
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                         eos_token_id=[2, tokenizer.convert_tokens_to_ids(END_OF_TURN[model.config.connector])])
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == response


def test_chat_stops_at_the_end_of_turn_piece(version):
    model, tokenizer = setup(version)
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN[model.config.connector])
    steps = []

    def favour_end_of_turn(module, args, logits):
        steps.append(1)
        logits = logits.clone()
        logits[..., end] += 1e4
        return logits

    model.output.register_forward_hook(favour_end_of_turn)
    response, _ = model.chat(tokenizer, "Hello", system="", max_new_tokens=10)
    assert response == "" and len(steps) == 1


def test_chat_history_keeps_earlier_images_in_context(version):
    model, tokenizer = setup(version)
    image = Image.new("RGB", (40, 30), (200, 200, 10))
    _, history = model.chat(tokenizer, "What is it?", images=image, system="", max_new_tokens=3)
    seen = []
    model.model.vision_tower.register_forward_hook(lambda m, a, out: seen.append(out.last_hidden_state.shape[0]))
    _, history = model.chat(tokenizer, "And its colour?", history=history, system="", max_new_tokens=3)
    assert seen == [1] and len(history) == 2


def test_chat_sampling_samples_and_is_reproducible_with_a_seed():
    model, tokenizer = setup(2)
    greedy, _ = model.chat(tokenizer, "Hi", system="", max_new_tokens=8)

    def sampled(seed):
        torch.manual_seed(seed)
        return model.chat(tokenizer, "Hi", system="", max_new_tokens=8, do_sample=True, temperature=1.5)[0]

    answers = [sampled(seed) for seed in range(6)]
    assert sampled(3) == answers[3]  # the same seed, the same answer
    assert len(set(answers)) > 1 and any(a != greedy for a in answers)  # do_sample is not ignored


def test_chat_with_too_few_images_for_its_placeholders_is_a_clear_error():
    model, tokenizer = setup(2)
    with pytest.raises(ValueError, match="2 <ImageHere> placeholders but 1 images"):
        model.chat(tokenizer, "<ImageHere><ImageHere>Compare.", images=Image.new("RGB", (9, 9)), system="")


def test_unreadable_image_file_is_a_clear_error(tmp_path):
    model, tokenizer = setup(2)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        model.chat(tokenizer, "What is it?", images=str(bad), system="")

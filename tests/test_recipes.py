"""training_recipes.py: per-part optimizer groups and schedules of each stage preset, flags over presets,
weighted source sampling, training at another image size, and a real Trainer run."""

import math
import os
import sys
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import build_model, image_ids
from transformers_compat import set_warmup
from PIL import Image
from tiny_sp import tiny_sp_path
from transformers import HfArgumentParser, TrainingArguments

import training_recipes as tr
from processing_xcomposer import XComposerProcessor
from tokenization_internlm import InternLMTokenizer

# What each preset must give, written out from the papers (parts left out are frozen).
EXPECTED = {
    "xcomposer-pretrain": dict(version=1, lrs=dict(connector=2e-4, llm=4e-5), decay=1.0, warmup=200, min_lr=1e-5),
    "xcomposer-sft": dict(version=1, lrs=dict(connector=2e-5, lora=5e-5), decay=1.0, warmup=200, min_lr=1e-5),
    "xcomposer2-pretrain": dict(version=2, lrs=dict(vision=2e-4, connector=2e-4, lora=2e-4), decay=0.9,
                                warmup=None, min_lr=0.0),
    "xcomposer2-sft": dict(version=2, lrs=dict(vision=5e-5, connector=5e-5, llm=1e-5, lora=5e-5), decay=0.9,
                           warmup=None, min_lr=0.0),
    "xcomposer2-sft-composition": dict(version=2, lrs=dict(vision=5e-5, connector=5e-5, llm=1e-5, lora=5e-5),
                                       decay=0.9, warmup=None, min_lr=0.0),
}
# Tiny towers have 2 blocks: the top block at the vision rate, one decay step per layer below it.
VISION_LAYER_POWER = {"blocks.1.": 0, "blocks.0.": 1, "patch_embed": 2, "cls_token": 2, "pos_embed": 2,
                      "pre_norm": 2, "post_norm": 0}
TINY_LORA = dict(lora_rank=4, lora_alpha=4.0)
WEIGHT_DECAY = 0.05


def training_args(tmp_path, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no",
                             disable_tqdm=True, weight_decay=WEIGHT_DECAY, **kwargs)


def model_for(recipe):
    """A tiny model of the preset's generation, built with its config overrides (at tiny LoRA rank)."""
    return build_model(1 if recipe.connector == "perceive_sampler" else 2, **recipe.config_overrides)


def paper_style(rate):
    """2e-4, as the papers and --help write a rate."""
    return f"{rate:.0e}".replace("e-0", "e-")


def recipe_trainer(tmp_path, stage, steps=400, warmup_steps=None, **args):
    targs = training_args(tmp_path, **args)
    if warmup_steps is not None:  # as the user's --warmup_steps, in the spelling of the installed release
        set_warmup(targs, warmup_steps)
    recipe = tr.resolve_recipe(stage, targs, **(TINY_LORA if stage == "xcomposer-sft" else {}))
    model = model_for(recipe)
    tr.apply_freezing(model, recipe)
    trainer = tr.RecipeTrainer(model=model, args=targs, recipe=recipe)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    return trainer, recipe


def expected_part(name):
    if name.startswith("model.vision_tower."):
        return "vision"
    if name.startswith(("model.vision_proj.", "model.perceive_sampler.")):
        return "connector"
    return "lora" if name.endswith((".A.weight", ".B.weight")) else "llm"


def vision_power(name):
    return next(power for key, power in VISION_LAYER_POWER.items() if key in name)


# --------------------------------------------------------------------------- presets and --help


def test_help_documents_every_preset_with_its_numbers_and_paper():
    def squeeze(text):  # argparse wraps lines, also at hyphens
        return "".join(text.split())

    text = squeeze(HfArgumentParser((tr.RecipeArguments,)).format_help())
    for name, spec in EXPECTED.items():
        summary = tr.STAGE_PRESETS[name].summary()
        assert squeeze(summary) in text
        assert ("arXiv:2309.15112" if spec["version"] == 1 else "arXiv:2401.16420") in summary
        for lr in spec["lrs"].values():
            assert f"at {paper_style(lr)}" in summary
    for phrase in ("perceive sampler at 2e-4, LLM at 4e-5", "warm-up 200 steps, cosine to 1e-5",
                   "rank 256, alpha 256", "layer-wise decay 0.9", "LLM at 1e-5 (scale 0.2",
                   "betas (0.9, 0.95) eps 1e-8", "images at 224 px"):
        assert squeeze(phrase) in text, phrase


@pytest.mark.parametrize("stage", list(EXPECTED))
def test_preset_parameter_groups_rates_decay_and_membership(stage, tmp_path):
    trainer, recipe = recipe_trainer(tmp_path, stage)
    spec, model = EXPECTED[stage], trainer.model
    groups = trainer.optimizer.param_groups
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    assert set(grouped) == trainable, "a trainable parameter is missing or a frozen one is grouped"
    group_of = {id(p): g for g in groups for p in g["params"]}

    trained_parts = set()
    for name, param in model.named_parameters():
        part = expected_part(name)
        if part not in spec["lrs"] or "flag_image" in name:
            assert not param.requires_grad, name
            continue
        assert param.requires_grad, name
        trained_parts.add(part)
        group = group_of[id(param)]
        lr = spec["lrs"][part] * (spec["decay"] ** vision_power(name) if part == "vision" else 1)
        assert group["initial_lr"] == pytest.approx(lr, rel=1e-12), name  # the peak; "lr" follows the schedule
        no_decay = param.ndim < 2 or any(k in name for k in ("cls_token", "pos_embed", "query_tokens"))
        assert group["weight_decay"] == (0.0 if no_decay else WEIGHT_DECAY), name
        assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8
    assert trained_parts == set(spec["lrs"])
    assert groups[0]["initial_lr"] == recipe.learning_rate  # the rate Trainer logs


@pytest.mark.parametrize("stage", list(EXPECTED))
def test_preset_schedule_warms_up_linearly_then_decays_to_its_floor(stage, tmp_path):
    steps = 400
    trainer, recipe = recipe_trainer(tmp_path, stage, steps=steps, warmup_steps=0.125)  # ratio: 50 of 400
    spec, warmup = EXPECTED[stage], 50  # an explicit --warmup_steps overrides a preset's own
    peaks = [g["initial_lr"] for g in trainer.optimizer.param_groups]
    base = recipe.learning_rate
    history = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps + 1):
            history.append(trainer.lr_scheduler.get_last_lr())
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
    for peak, lrs in zip(peaks, zip(*history)):
        assert lrs[0] == 0.0
        assert lrs[warmup // 2] == pytest.approx(peak / 2)
        assert lrs[warmup] == pytest.approx(peak)
        assert all(a <= b + 1e-15 for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))
        assert all(a >= b - 1e-15 for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
        assert lrs[steps] == pytest.approx(peak * spec["min_lr"] / base, abs=1e-15)
        middle = warmup + (steps - warmup) // 2
        assert lrs[middle] == pytest.approx(peak * (spec["min_lr"] / base + 1) / 2)
    top = [lrs for g, lrs in zip(trainer.optimizer.param_groups, zip(*history)) if g["initial_lr"] == base]
    assert top and top[0][steps] == pytest.approx(spec["min_lr"], abs=1e-15)


def test_v1_preset_keeps_its_own_warmup_when_the_flag_is_left_at_its_default(tmp_path):
    trainer, _ = recipe_trainer(tmp_path, "xcomposer-pretrain", steps=1000)
    factor = trainer.lr_scheduler.lr_lambdas[0]
    assert factor(100) == pytest.approx(0.5) and factor(200) == pytest.approx(1.0)
    assert factor(1000) == pytest.approx(1e-5 / 2e-4)


def test_stage_does_not_fit_the_other_generation():
    with pytest.raises(ValueError, match=r"for XComposer \(v1\) models \(connector 'perceive_sampler'\); this "
                                         r"model's connector is 'mlp2x_gelu'"):
        tr.apply_freezing(build_model(2), tr.STAGE_PRESETS["xcomposer-pretrain"])


def test_lora_stage_needs_adapters_in_the_model():
    recipe = tr.resolve_recipe("xcomposer-sft")
    with pytest.raises(ValueError, match="config_overrides"):
        tr.apply_freezing(build_model(1), recipe)  # the tiny v1 model is merged (rank 0)


def test_v1_sft_overrides_add_fresh_adapters_to_a_merged_checkpoint(tmp_path):
    from modeling_xcomposer import XComposerForCausalLM

    merged = build_model(1)
    merged.save_pretrained(tmp_path / "merged")
    recipe = tr.resolve_recipe("xcomposer-sft", **TINY_LORA)
    assert recipe.config_overrides == dict(lora_rank=4, lora_alpha=4.0, lora_scope="all",
                                           lora_targets=["wqkv", "wo", "w1", "w2", "w3"])
    model = tr.load_model_for_recipe(tmp_path / "merged", recipe).eval()
    assert isinstance(model, XComposerForCausalLM) and model.config.text_config.lora_scope == "all"
    adapters = {n: p for n, p in model.named_parameters() if tr.part_of(n) == "lora"}
    assert len(adapters) == 2 * 5 * 2  # A and B on five linears in two layers
    assert all(not p.any() for n, p in adapters.items() if n.endswith(".B.weight"))
    ids = torch.tensor([[1, 5, 9, 7]])
    torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits)
    assert tr.apply_freezing(model, recipe)["lora"] == sum(p.numel() for p in adapters.values())


# --------------------------------------------------------------------------- flags over presets


def test_flags_override_a_preset_one_by_one():
    targs = TrainingArguments(output_dir="unused", report_to=[], learning_rate=1e-4, adam_beta2=0.98)
    recipe = tr.resolve_recipe("xcomposer-pretrain", targs, vision_lr=1e-6, train_vision_tower=True,
                               vision_layer_decay=0.8, min_lr=2e-6)
    # a new base rate scales the preset's rates with it; explicit values win
    assert recipe.part_lrs() == dict(vision=1e-6, connector=pytest.approx(1e-4), llm=pytest.approx(2e-5),
                                     lora=pytest.approx(1e-4))
    assert recipe.train_vision_tower and recipe.vision_layer_decay == 0.8 and recipe.min_lr == 2e-6
    assert recipe.betas == (0.9, 0.98) and recipe.warmup_steps == 200  # beta2 given, warm-up left to the preset
    assert (targs.learning_rate, targs.adam_beta2, targs.warmup_steps) == (pytest.approx(1e-4), 0.98, 200)
    sft = tr.resolve_recipe("xcomposer2-sft", llm_lr_scale=0.5, train_vision_tower=False)
    assert sft.part_lrs()["llm"] == pytest.approx(2.5e-5) and not sft.train_vision_tower


def test_no_recipe_without_a_stage_or_a_rate_flag():
    assert tr.resolve_recipe(None, train_llm=False, image_size=224) is None
    targs = TrainingArguments(output_dir="unused", report_to=[], learning_rate=3e-4, adam_beta2=0.99)
    recipe = tr.resolve_recipe(None, targs, llm_lr_scale=0.1)
    assert recipe.part_lrs() == dict(vision=3e-4, connector=3e-4, llm=pytest.approx(3e-5), lora=3e-4)
    assert recipe.betas == (0.9, 0.99) and recipe.min_lr == 0.0


def test_recipe_from_parsed_flags_and_peft_lora():
    from dataclasses import dataclass

    @dataclass
    class ModelArgs:  # finetune.py's switches, None meaning "the preset's"
        train_vision_tower: bool | None = None
        train_llm: bool | None = None
        use_lora: bool = False
        lora_rank: int | None = None

    parser = HfArgumentParser((tr.RecipeArguments, ModelArgs, TrainingArguments))
    rargs, margs, targs = parser.parse_args_into_dataclasses(
        ["--stage", "xcomposer-sft", "--connector_lr", "3e-5", "--output_dir", "unused", "--report_to", "none"])
    recipe = tr.recipe_from_args(rargs, targs, margs)
    assert recipe.part_lrs()["connector"] == 3e-5 and recipe.config_overrides["lora_rank"] == 256
    margs.lora_rank = 64  # without PEFT: the rank of the decoder's own adapters
    assert tr.recipe_from_args(rargs, targs, margs).config_overrides["lora_rank"] == 64
    margs.use_lora, margs.train_vision_tower = True, True  # with PEFT: its rank, no built-in adapters
    recipe = tr.recipe_from_args(rargs, targs, margs)
    assert recipe.config_overrides == {} and not recipe.train_llm and recipe.train_vision_tower

    @dataclass
    class OldModelArgs:  # bool defaults: only a value other than the default overrides the preset
        train_llm: bool = True
        train_connector: bool = True

    recipe = tr.recipe_from_args(tr.RecipeArguments(stage="xcomposer2-pretrain"), targs, OldModelArgs())
    assert not recipe.train_llm
    recipe = tr.recipe_from_args(tr.RecipeArguments(stage="xcomposer2-pretrain"), targs, OldModelArgs(True, False))
    assert not recipe.train_connector
    with pytest.raises(SystemExit):
        with open(os.devnull, "w") as devnull:
            sys.stderr, stderr = devnull, sys.stderr
            try:
                parser.parse_args_into_dataclasses(["--stage", "nope", "--output_dir", "x"])
            finally:
                sys.stderr = stderr


# --------------------------------------------------------------------------- a real Trainer run


class Samples(torch.utils.data.Dataset):
    def __init__(self, config, n, seed):
        generator = torch.Generator().manual_seed(seed)
        ids = image_ids(config) + [5, 9, 7, 11]
        self.items = [{"input_ids": torch.tensor(ids), "labels": torch.tensor([-100] * (len(ids) - 4) + ids[-4:]),
                       "pixel_values": torch.randn(1, 3, 28, 28, generator=generator)} for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(features):
    return {"input_ids": torch.stack([f["input_ids"] for f in features]),
            "labels": torch.stack([f["labels"] for f in features]),
            "pixel_values": torch.cat([f["pixel_values"] for f in features])}


def test_recipe_trainer_trains_a_preset_through_trainer(tmp_path):
    targs = training_args(tmp_path, max_steps=3, per_device_train_batch_size=2, warmup_steps=1, logging_steps=1,
                          remove_unused_columns=False, dataloader_num_workers=0)
    recipe = tr.resolve_recipe("xcomposer2-pretrain", targs, min_lr=4e-6)
    model = build_model(2).train()
    tr.apply_freezing(model, recipe)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = tr.concat_sources([Samples(model.config, 6, 0), Samples(model.config, 2, 1)], "3,1")
    trainer = tr.RecipeTrainer(model=model, args=targs, recipe=recipe, train_dataset=data, data_collator=collate)
    result = trainer.train()
    assert math.isfinite(result.training_loss)

    groups = trainer.optimizer.param_groups
    assert isinstance(trainer.optimizer.optimizer, torch.optim.AdamW)
    assert {g["part"] for g in groups} == {"vision", "connector", "lora"}
    vision = {g["layer"]: g for g in groups if g["part"] == "vision" and g["weight_decay"]}
    assert [vision[layer]["initial_lr"] for layer in (2, 1, 0)] == pytest.approx([2e-4, 1.8e-4, 1.62e-4])
    # after 3 of 3 steps every group sits at the floor, in proportion to its peak (4e-6 / 2e-4 = 2%)
    assert trainer.lr_scheduler.get_last_lr() == pytest.approx([g["initial_lr"] * 0.02 for g in groups])
    assert [g["lr"] for g in groups] == trainer.lr_scheduler.get_last_lr()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == param.requires_grad or "flag" in name, name
    assert not any(p.requires_grad for n, p in model.named_parameters() if tr.part_of(n) == "llm")


# --------------------------------------------------------------------------- weighted sources


def test_source_weights_are_respected_within_sampling_noise():
    sampler = tr.WeightedSourceSampler([10, 100, 40], [3, 1, 1], num_samples=20000, seed=0)
    counts = Counter(0 if i < 10 else 1 if i < 110 else 2 for i in sampler)
    for source, share in enumerate([0.6, 0.2, 0.2]):
        assert abs(counts[source] / 20000 - share) < 0.02  # std ~0.0035


def test_sampler_is_deterministic_per_epoch_and_covers_a_source_before_repeating():
    sampler = tr.WeightedSourceSampler([5, 50], [1, 1], num_samples=40, seed=3)
    first = list(sampler)
    assert first == list(tr.WeightedSourceSampler([5, 50], [1, 1], num_samples=40, seed=3))
    small = [i for i in first if i < 5]
    for start in range(0, len(small) - 4, 5):  # each round of the small source is a permutation
        assert sorted(small[start:start + 5]) == list(range(5))
    sampler.set_epoch(1)
    assert list(sampler) != first and len(sampler) == 40


def test_zero_weight_source_is_never_drawn_and_bad_weights_fail():
    assert all(i >= 3 for i in tr.WeightedSourceSampler([3, 4], [0, 1], num_samples=100))
    with pytest.raises(ValueError, match="weights"):
        tr.WeightedSourceSampler([3, 4], [1], num_samples=10)
    with pytest.raises(ValueError, match="3 data files"):
        tr.concat_sources([[1], [2], [3]], "1,2")
    mix = tr.concat_sources([[1, 2], [3]])
    assert len(mix) == 3 and mix.source_weights == [1.0, 1.0] and mix.num_text_only == 0
    assert len(mix.sampler()) == 3 and mix[2] == 3


def drawn_items(trainer):
    return [i for batch in trainer.get_train_dataloader() for i in batch["item"].tolist()]


def item_collate(features):
    return {"item": torch.tensor(features)}


def test_the_trainer_draws_a_source_mix_by_its_weights(tmp_path):
    small, large = list(range(100)), list(range(1000, 1400))  # 20 % of the items, 75 % of the draws
    targs = training_args(tmp_path, per_device_train_batch_size=50, remove_unused_columns=False, seed=3)
    trainer = tr.RecipeTrainer(model=build_model(2), args=targs, train_dataset=tr.concat_sources([small, large], "3,1"),
                               data_collator=item_collate)
    drawn = drawn_items(trainer)
    assert len(drawn) == 500 and abs(sum(i < 1000 for i in drawn) / 500 - 0.75) < 0.06  # std 0.019
    assert drawn == drawn_items(trainer)  # deterministic for the seed


# --------------------------------------------------------------------------- image size


def processor_for(model):
    version = 1 if model.config.connector == "perceive_sampler" else 2
    return XComposerProcessor.for_model(model.config, InternLMTokenizer(vocab_file=tiny_sp_path(version)))


@pytest.mark.parametrize("version, tokens_after", [(2, 16), (1, 6)])
def test_new_image_size_runs_and_sets_the_image_token_count(version, tokens_after):
    model = build_model(version)
    processor = processor_for(model)
    tr.apply_freezing(model, tr.StagePreset("frozen vision", "", "", train_vision_tower=False, train_lora=False))
    tr.set_image_size(model, processor, 56)  # 28 px -> 56 px: a 2x2 patch grid becomes 4x4
    assert model.model.vision_tower.embeddings.pos_embed.shape[1] == 1 + 16
    assert not model.model.vision_tower.embeddings.pos_embed.requires_grad
    assert model.config.num_image_tokens == processor.num_image_tokens == tokens_after
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    inputs = processor(text="<ImageHere>What is it?", images=[picture])
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens_after
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1] and torch.isfinite(logits).all()


def test_preset_image_size_is_the_papers_224_for_composition():
    assert tr.resolve_recipe("xcomposer2-sft-composition").image_size == 224
    assert tr.resolve_recipe("xcomposer2-sft", image_size=224).image_size == 224


def test_without_a_recipe_it_is_a_plain_trainer(tmp_path):
    model = build_model(2)
    trainer = tr.RecipeTrainer(model=model, args=training_args(tmp_path, lr_scheduler_type="linear"))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert len(trainer.optimizer.param_groups) == 2  # Trainer's own: decay and no decay
    assert type(trainer.lr_scheduler).__name__ == "LambdaLR" and "part" not in trainer.optimizer.param_groups[0]
    trainer = tr.RecipeTrainer(model=model, args=training_args(tmp_path, per_device_train_batch_size=5,
                                                               remove_unused_columns=False),
                               train_dataset=list(range(20)), data_collator=item_collate)
    drawn = drawn_items(trainer)
    assert sorted(drawn) == list(range(20)) and drawn != list(range(20))  # Trainer's own shuffled epoch

"""Training recipes of the XComposer papers, inside the ordinary Trainer workflow.

- Stage presets (`STAGE_PRESETS`): what each stage of InternLM-XComposer (2023) and XComposer2 (2024)
  trains, at which rates, with which optimizer and schedule. Every value can be overridden flag by flag.
- The one partition of a model's parameters into what trains (`part_of`: the vision tower, the connector
  (perceive sampler or projector), the LLM, the (Partial) LoRA adapters), `set_trainable` by part, and
  `acts_on_images_only` (what a text-only batch leaves without gradients); finetune.py's switches use it too.
- Per-part optimisation: separate rates for those four parts; layer-wise rate decay in the vision tower,
  the top block at the vision rate; AdamW with the papers' betas and eps; linear warm-up from 0, then
  cosine to a floor.
  `RecipeTrainer` builds these in Trainer's own `create_optimizer` / `create_scheduler`.
- Data: `concat_sources` mixes several sources with a weight each, drawn by `WeightedSourceSampler`;
  `set_image_size` trains a stage at another resolution, interpolating the position embeddings.

Typical use (finetune.py wires it to its flags):

    recipe = recipe_from_args(recipe_args, training_args, model_args)   # None: no recipe asked for
    model = load_model_for_recipe(path, recipe)   # with the stage's built-in LoRA, if any
    apply_freezing(model, recipe)
    set_image_size(model, processor, recipe.image_size)
    trainer = RecipeTrainer(model=model, args=training_args, recipe=recipe,
                            train_dataset=concat_sources(datasets, weights), ...)
"""

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from configuration_xcomposer import LORA_TARGETS
from transformers_compat import get_warmup, set_warmup

# What trains, in four parts: the vision tower, the connector (perceive sampler / projector), the LLM
# (decoder, embeddings, LM head) and the low-rank adapters (built-in (P)LoRA or PEFT's). See `part_of`.
PARTS = ("vision", "connector", "llm", "lora")
XCOMPOSER_2023 = "InternLM-XComposer (Zhang et al., 2023, arXiv:2309.15112)"
XCOMPOSER_2024 = "InternLM-XComposer2 (Dong et al., 2024, arXiv:2401.16420)"
GENERATIONS = {"perceive_sampler": "XComposer (v1)", "mlp2x_gelu": "XComposer2"}
# Tokens and tables rather than weights: never decayed (BEiT/timm's no_weight_decay list, plus v1's queries).
NO_DECAY_NAMES = ("cls_token", "pos_embed", "query_tokens", "flag_image_start", "flag_image_end")
# Frozen as upstream keeps them, whatever the stage.
ALWAYS_FROZEN = ("model.perceive_sampler.flag_image_start", "model.perceive_sampler.flag_image_end")
# Name segments that PEFT, DDP, FSDP and torch.compile put in front of the model's own parameter names.
WRAPPER_PREFIX = re.compile(r"^(base_model\.model\.|module\.|_orig_mod\.|_fsdp_wrapped_module\.|"
                            r"_checkpoint_wrapped_module\.)+")


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class StagePreset:
    """One training stage. Part rates left at None take `learning_rate` (the LLM: times `llm_lr_scale`);
    `warmup_steps` None takes TrainingArguments' (steps if >= 1, else a fraction of training);
    `weight_decay` None takes TrainingArguments'. `lora_rank` set: build the model with the decoder's own
    adapters at this rank (see `config_overrides`); None: train the adapters the checkpoint has."""

    name: str
    paper: str
    description: str
    connector: str | None = None  # the config.connector it suits ("perceive_sampler", "mlp2x_gelu"); None: either
    train_vision_tower: bool = False
    train_connector: bool = True
    train_llm: bool = True
    train_lora: bool = True
    learning_rate: float = 5e-5
    vision_lr: float | None = None
    connector_lr: float | None = None
    llm_lr: float | None = None
    lora_lr: float | None = None
    vision_layer_decay: float = 1.0
    llm_lr_scale: float = 1.0
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_scope: str | None = None
    lora_targets: tuple[str, ...] | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float | None = None
    warmup_steps: float | None = None
    min_lr: float = 0.0
    image_size: int | None = None

    def part_lrs(self) -> dict[str, float]:
        """Peak learning rate of each part; the vision rate is its top block's."""
        llm = self.llm_lr if self.llm_lr is not None else self.learning_rate * self.llm_lr_scale
        rates = dict(vision=self.vision_lr, connector=self.connector_lr, llm=llm, lora=self.lora_lr)
        return {part: self.learning_rate if lr is None else lr for part, lr in rates.items()}

    def trains(self, part: str) -> bool:
        return getattr(self, {"vision": "train_vision_tower", "connector": "train_connector", "llm": "train_llm",
                              "lora": "train_lora"}[part])

    @property
    def config_overrides(self) -> dict:
        """`text_config` fields to build the model with (before loading weights), e.g. v1 SFT's LoRA:
        `{"lora_rank": 256, "lora_alpha": 256.0, "lora_scope": "all", "lora_targets": [...]}`.
        Missing adapters then start fresh (B = 0) when a merged checkpoint is loaded."""
        if self.lora_rank is None:
            return {}
        overrides = {"lora_rank": self.lora_rank, "lora_alpha": float(self.lora_alpha or self.lora_rank)}
        if self.lora_scope is not None:
            overrides["lora_scope"] = self.lora_scope
        if self.lora_targets is not None:
            overrides["lora_targets"] = list(self.lora_targets)
        return overrides

    def summary(self) -> str:
        """One line with every number of the stage, as --help shows it."""
        names = _part_names(self.connector)
        lrs = self.part_lrs()
        trained, frozen = [], []
        for part in PARTS:
            if not self.trains(part):
                frozen.append(names[part])
                continue
            text = f"{names[part]} at {_num(lrs[part])}"
            if part == "vision" and self.vision_layer_decay != 1:
                text += f" with layer-wise decay {_num(self.vision_layer_decay)} (top block at {_num(lrs[part])})"
            if part == "llm" and self.llm_lr is None and self.llm_lr_scale != 1:
                text += f" (scale {_num(self.llm_lr_scale)} x {_num(self.learning_rate)})"
            if part == "lora" and self.lora_rank is not None:
                scope = "all rows" if self.lora_scope == "all" else "image rows"
                text += (f" (rank {self.lora_rank}, alpha {_num(self.lora_alpha or self.lora_rank)}, on "
                         f"{'/'.join(self.lora_targets or LORA_TARGETS)}, {scope})")
            trained.append(text)
        warmup = ("--warmup_steps" if self.warmup_steps is None else f"{_num(self.warmup_steps)} steps")
        parts = [f"trains {', '.join(trained)}", f"frozen: {', '.join(frozen) or 'nothing'}",
                 f"AdamW betas ({_num(self.betas[0])}, {_num(self.betas[1])}) eps {_num(self.eps)}",
                 f"linear warm-up {warmup}, cosine to {_num(self.min_lr)}"
                 + (f" at the {_num(self.learning_rate)} rate, other rates in proportion" if self.min_lr else "")]
        if self.image_size:
            parts.append(f"images at {self.image_size} px")
        return f"{self.name} [{self.paper}]: {self.description}. " + "; ".join(parts) + "."


def _part_names(connector: str | None) -> dict[str, str]:
    lora = {"perceive_sampler": "LoRA", "mlp2x_gelu": "Partial LoRA"}.get(connector, "(P)LoRA")
    connector = {"perceive_sampler": "perceive sampler", "mlp2x_gelu": "projector"}.get(connector, "connector")
    return dict(vision="vision encoder", connector=connector, llm="LLM", lora=lora)


def _num(x: float) -> str:
    """Numbers as the papers write them: 2e-4, 0.9, 200."""
    if x == 0 or abs(x) >= 1e-2:
        return f"{x:g}"
    mantissa, exponent = f"{x:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


STAGE_PRESETS = {p.name: p for p in (
    StagePreset(
        "xcomposer-pretrain", XCOMPOSER_2023 + ", pre-training",
        "vision encoder frozen, perceive sampler and LLM trained", connector="perceive_sampler",
        train_vision_tower=False, train_connector=True, train_llm=True, train_lora=False,
        learning_rate=2e-4, connector_lr=2e-4, llm_lr=4e-5, warmup_steps=200, min_lr=1e-5),
    StagePreset(
        "xcomposer-sft", XCOMPOSER_2023 + ", supervised fine-tuning",
        "LLM frozen, LoRA on its attention and FFN, perceive sampler trained", connector="perceive_sampler",
        train_vision_tower=False, train_connector=True, train_llm=False, train_lora=True,
        learning_rate=5e-5, lora_lr=5e-5, connector_lr=2e-5, lora_rank=256, lora_alpha=256.0, lora_scope="all",
        lora_targets=LORA_TARGETS, warmup_steps=200, min_lr=1e-5),
    StagePreset(
        "xcomposer2-pretrain", XCOMPOSER_2024 + ", pre-training",
        "LLM frozen, vision encoder, projector and Partial LoRA trained (warm-up and floor not from the paper)",
        connector="mlp2x_gelu", train_vision_tower=True, train_connector=True, train_llm=False, train_lora=True,
        learning_rate=2e-4, vision_layer_decay=0.9),
    StagePreset(
        "xcomposer2-sft", XCOMPOSER_2024 + ", supervised fine-tuning",
        "everything trained, the LLM at a fixed scale (warm-up and floor not from the paper)",
        connector="mlp2x_gelu", train_vision_tower=True, train_connector=True, train_llm=True, train_lora=True,
        learning_rate=5e-5, vision_layer_decay=0.9, llm_lr_scale=0.2),
    StagePreset(
        "xcomposer2-sft-composition", XCOMPOSER_2024 + ", free-form composition fine-tuning",
        "as xcomposer2-sft with images reduced to 224 px (16x16 = 256 image tokens)", connector="mlp2x_gelu",
        train_vision_tower=True, train_connector=True, train_llm=True, train_lora=True,
        learning_rate=5e-5, vision_layer_decay=0.9, llm_lr_scale=0.2, image_size=224),
)}


def describe_presets() -> str:
    return ("Training stage preset; every value can be overridden by its own flag. " +
            " ".join(f"({i}) {p.summary()}" for i, p in enumerate(STAGE_PRESETS.values(), 1)))


# --------------------------------------------------------------------------- resolving flags


@dataclass
class RecipeArguments:
    """Flags for HfArgumentParser. Unset (None) values come from --stage, or without one from
    TrainingArguments (one rate for every part, as before)."""

    stage: str | None = field(default=None, metadata={"help": describe_presets(), "choices": list(STAGE_PRESETS)})
    vision_lr: float | None = field(default=None, metadata={"help": "peak rate of the vision tower's top block"})
    connector_lr: float | None = field(default=None, metadata={"help": "rate of the perceive sampler / projector"})
    llm_lr: float | None = field(default=None, metadata={"help": "rate of the LLM's own weights (overrides "
                                                                 "--llm_lr_scale)"})
    lora_lr: float | None = field(default=None, metadata={"help": "rate of the (Partial) LoRA adapters"})
    vision_layer_decay: float | None = field(default=None, metadata={
        "help": "layer-wise rate decay in the vision tower: block i of L at decay**(L-i), embeddings at decay**L"})
    llm_lr_scale: float | None = field(default=None, metadata={"help": "LLM rate = --learning_rate x this"})
    min_lr: float | None = field(default=None, metadata={
        "help": "cosine floor of the --learning_rate group; every group ends at the same fraction of its peak"})
    image_size: int | None = field(default=None, metadata={
        "help": "train at this image size: position embeddings interpolated, image tokens follow"})
    source_weights: str | None = field(default=None, metadata={
        "help": "comma-separated sampling weight per --data_path file: each file's share of the draws"})


# Fields that only shape a recipe; train_* switches and image_size alone do not ask for one.
_RECIPE_FIELDS = ("vision_lr", "connector_lr", "llm_lr", "lora_lr", "vision_layer_decay", "llm_lr_scale", "min_lr",
                  "lora_rank", "lora_alpha")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
_SHARED_ARGS = ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "warmup_steps")


def resolve_recipe(stage: str | None = None, training_args: TrainingArguments | None = None,
                   **overrides) -> StagePreset | None:
    """The preset `stage` with `overrides` (StagePreset field names; None means unset) applied, or None when
    neither a stage nor a rate flag is given (plain Trainer behaviour).

    With a stage, TrainingArguments' learning_rate, adam_beta1/2, adam_epsilon and warmup_steps override the
    preset only where they differ from TrainingArguments' defaults; a new learning_rate scales the preset's
    part rates with it. Without one, they define the recipe. The chosen values are written back into
    `training_args` so logs and checkpoints show them."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(StagePreset)})
    if unknown:
        raise TypeError(f"unknown recipe fields {unknown}")
    if stage is None and not any(k in overrides for k in _RECIPE_FIELDS):
        return None
    if stage is not None and stage not in STAGE_PRESETS:
        raise ValueError(f"unknown stage {stage!r}; choose from {sorted(STAGE_PRESETS)}")
    args = {name: getattr(training_args, name, _DEFAULTS[name]) for name in _SHARED_ARGS}
    args["warmup_steps"] = get_warmup(training_args) if training_args is not None else 0
    if stage is None:
        recipe = StagePreset("custom", "", "per-part rates from flags", learning_rate=args["learning_rate"],
                             betas=(args["adam_beta1"], args["adam_beta2"]), eps=args["adam_epsilon"])
    else:
        recipe = STAGE_PRESETS[stage]
        changed = {name: value for name, value in args.items() if value != _DEFAULTS[name]}
        if "learning_rate" in changed:
            recipe = _scale_rates(recipe, changed["learning_rate"] / recipe.learning_rate)
        betas = (changed.get("adam_beta1", recipe.betas[0]), changed.get("adam_beta2", recipe.betas[1]))
        recipe = dataclasses.replace(recipe, betas=betas, eps=changed.get("adam_epsilon", recipe.eps),
                                     warmup_steps=changed.get("warmup_steps", recipe.warmup_steps))
    recipe = dataclasses.replace(recipe, **overrides)
    if training_args is not None:
        training_args.learning_rate = recipe.learning_rate
        training_args.adam_beta1, training_args.adam_beta2 = recipe.betas
        training_args.adam_epsilon = recipe.eps
        if recipe.warmup_steps is not None:
            set_warmup(training_args, recipe.warmup_steps)
    return recipe


def _scale_rates(recipe: StagePreset, factor: float) -> StagePreset:
    """Every rate (and the floor) times `factor`: a new base rate keeps the preset's ratios."""
    scaled = {name: getattr(recipe, name) * factor for name in ("learning_rate", "vision_lr", "connector_lr",
                                                                "llm_lr", "lora_lr", "min_lr")
              if getattr(recipe, name) is not None}
    return dataclasses.replace(recipe, **scaled)


def recipe_from_args(recipe_args: RecipeArguments, training_args: TrainingArguments,
                     model_args=None) -> StagePreset | None:
    """`resolve_recipe` from parsed flags. `model_args` may carry finetune.py's train_vision_tower,
    train_connector, train_llm, train_plora, use_lora, lora_rank and lora_alpha. Declare the train_* switches
    `bool | None = None` (None: the preset's) so that either value can override a preset; with bool defaults
    only a value other than the default does. Without PEFT, lora_rank/lora_alpha build the decoder's own
    adapters at that rank (as the v1 SFT preset does at 256). With PEFT LoRA (use_lora) they are PEFT's, the
    LLM's own weights stay frozen and the preset's built-in adapters are not added (PEFT's lora_* weights
    take the LoRA rate)."""
    r = recipe_args
    use_lora = getattr(model_args, "use_lora", False)
    overrides = dict(vision_lr=r.vision_lr, connector_lr=r.connector_lr, llm_lr=r.llm_lr, lora_lr=r.lora_lr,
                     vision_layer_decay=r.vision_layer_decay, llm_lr_scale=r.llm_lr_scale, min_lr=r.min_lr,
                     image_size=r.image_size)
    if not use_lora:
        overrides.update(lora_rank=getattr(model_args, "lora_rank", None),
                         lora_alpha=getattr(model_args, "lora_alpha", None))
    defaults = {f.name: f.default for f in dataclasses.fields(model_args)} if model_args is not None else {}
    for name, key in (("train_vision_tower", "train_vision_tower"), ("train_connector", "train_connector"),
                      ("train_llm", "train_llm"), ("train_plora", "train_lora")):
        value = getattr(model_args, name, None)
        # A None default means "the preset's"; with a bool default only a changed value counts as given.
        overrides[key] = None if value == defaults.get(name) else value
    recipe = resolve_recipe(r.stage, training_args, **overrides)
    if recipe is not None and use_lora:
        recipe = dataclasses.replace(recipe, train_llm=False, lora_rank=None)
    return recipe


def apply_config_overrides(config, overrides: dict):
    """Set `text_config` fields (a recipe's `config_overrides`) on an XComposerConfig before the model is built."""
    text = config.text_config
    unknown = sorted(name for name in overrides if not hasattr(text, name))
    if unknown:
        raise ValueError(f"text_config has no fields {unknown}")
    type(text)(**{**text.to_dict(), **overrides})  # validates the combination (scope, targets, rank)
    for name, value in overrides.items():
        setattr(text, name, value)
    return config


def load_model_for_recipe(path, recipe: StagePreset | None = None, **kwargs):
    """XComposerForCausalLM.from_pretrained(path, **kwargs), built with the recipe's `config_overrides`;
    adapters the checkpoint lacks (v1 SFT's LoRA on a merged checkpoint) start as the identity (B = 0)."""
    from configuration_xcomposer import XComposerConfig
    from modeling_xcomposer import XComposerForCausalLM

    config = XComposerConfig.from_pretrained(path)
    apply_config_overrides(config, recipe.config_overrides if recipe is not None else {})
    return XComposerForCausalLM.from_pretrained(path, config=config, **kwargs)


# --------------------------------------------------------------------------- parts and freezing


def part_of(name: str) -> str:
    """'vision', 'connector', 'lora' or 'llm' (decoder, embeddings, LM head) for a parameter name, with or
    without a wrapper's prefix (PEFT, DDP, FSDP, torch.compile)."""
    name = WRAPPER_PREFIX.sub("", name)
    if name.startswith("model.vision_tower."):
        return "vision"
    if name.startswith(("model.vision_proj.", "model.perceive_sampler.")):
        return "connector"
    if is_builtin_adapter(name) or ".lora_" in name:  # built-in (P)LoRA, PEFT's lora_A/lora_B
        return "lora"
    return "llm"


def is_builtin_adapter(name: str) -> bool:
    """The decoder's own (Partial) LoRA factors (`... .A.weight` / `... .B.weight`), not PEFT's."""
    return re.search(r"\.(A|B)\.weight$", name) is not None


def acts_on_images_only(model, name: str) -> bool:
    """The vision tower, the connector and Partial LoRA (built-in adapters with lora_scope "image") see image
    tokens only: a text-only batch leaves them without gradients."""
    part = part_of(name)
    return part in ("vision", "connector") or (
        part == "lora" and is_builtin_adapter(name) and model.config.text_config.lora_scope == "image")


def set_trainable(model, trains: dict[str, bool]) -> dict[str, int]:
    """requires_grad by part (`trains` maps each of PARTS to a bool; v1's image start/end flags always stay
    frozen, as upstream); returns the number of trainable parameters per part."""
    missing = sorted(set(PARTS) - set(trains))
    if missing:
        raise ValueError(f"say whether {missing} train")
    counts = dict.fromkeys(PARTS, 0)
    for name, param in model.named_parameters():
        part = part_of(name)
        trainable = bool(trains[part]) and WRAPPER_PREFIX.sub("", name) not in ALWAYS_FROZEN
        param.requires_grad_(trainable)
        counts[part] += param.numel() if trainable else 0
    return counts


def apply_freezing(model, recipe: StagePreset) -> dict[str, int]:
    """Train exactly the parts the recipe trains (see `set_trainable`); returns the number of trainable
    parameters per part. Raises if the model does not fit the stage."""
    if recipe.connector not in (None, model.config.connector):
        raise ValueError(f"stage {recipe.name!r} is for {GENERATIONS[recipe.connector]} models (connector "
                         f"{recipe.connector!r}); this model's connector is {model.config.connector!r}")
    counts = set_trainable(model, {part: recipe.trains(part) for part in PARTS})
    if recipe.train_lora and not any(part_of(n) == "lora" for n, _ in model.named_parameters()):
        raise ValueError(f"stage {recipe.name!r} trains LoRA adapters but the model has none; build it with "
                         f"the recipe's config_overrides {recipe.config_overrides or '(set --lora_rank)'}")
    return counts


# --------------------------------------------------------------------------- optimizer and schedule


def vision_layer_id(name: str, num_layers: int) -> int:
    """BEiT-style layer id inside the vision tower: embeddings (patch, CLS, positions, pre-norm) 0,
    block k (0-based) k + 1, the final norm with the top block at num_layers."""
    local = WRAPPER_PREFIX.sub("", name).removeprefix("model.vision_tower.")
    match = re.match(r"blocks\.(\d+)\.", local)
    if match:
        return int(match.group(1)) + 1
    return num_layers if local.startswith("post_norm") else 0


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and other 1-D parameters, and token/position tables."""
    return param.ndim < 2 or any(key in name for key in NO_DECAY_NAMES)


def parameter_groups(model, lrs: dict[str, float], vision_layer_decay: float = 1.0,
                     weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters, one per (part, vision layer, decay or not).
    Vision layer id i of L gets lrs['vision'] * vision_layer_decay**(L - i): the top block at the vision
    rate, the embeddings at decay**L. Each group carries its `name`, `part`, `layer` and `lr_scale`."""
    num_layers = model.config.vision_config.num_hidden_layers
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(name)
        layer = vision_layer_id(name, num_layers) if part == "vision" else None
        scale = vision_layer_decay ** (num_layers - layer) if part == "vision" else 1.0
        decay = not no_weight_decay(name, param)
        key = (part, layer, decay)
        if key not in groups:
            label = part + ("" if layer is None else f".layer{layer}") + (".decay" if decay else ".no_decay")
            groups[key] = {"name": label, "part": part, "layer": layer, "lr_scale": scale, "params": [],
                           "lr": lrs[part] * scale, "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(param)
    return list(groups.values())


def create_optimizer(model, recipe: StagePreset, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over `parameter_groups` with the recipe's betas and eps, a group at the base rate first."""
    groups = parameter_groups(model, recipe.part_lrs(), recipe.vision_layer_decay, weight_decay)
    if not groups:
        raise ValueError("no trainable parameters")
    groups.sort(key=lambda g: g["lr"] != recipe.learning_rate)  # Trainer logs the first group's rate
    return torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=recipe.betas, eps=recipe.eps)


class RecipeTrainer(Trainer):
    """Trainer with a recipe's optimizer (per-part groups, AdamW) and schedule (Trainer's own linear warm-up
    from 0, then cosine to the floor: one factor for all groups, so they keep their ratios), and weighted
    sampling for a `concat_sources` dataset. With `recipe=None` it is a plain Trainer (except the sampler).
    With a recipe, --optim and --lr_scheduler_type are not used; DeepSpeed configs that define their own
    optimizer or scheduler take precedence, as for any Trainer."""

    def __init__(self, *args, recipe: StagePreset | None = None, **kwargs):
        self.recipe = recipe
        super().__init__(*args, **kwargs)

    def create_optimizer(self, *model):  # Trainer passes the model since 5.5, nothing before
        if self.recipe is None:
            return super().create_optimizer(*model)
        if self.optimizer is None:
            weight_decay = self.recipe.weight_decay if self.recipe.weight_decay is not None else self.args.weight_decay
            self.optimizer = create_optimizer(model[0] if model else self.model, self.recipe, weight_decay)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.recipe is not None:
            self.args.lr_scheduler_type = "cosine_with_min_lr"
            self.args.lr_scheduler_kwargs = {"min_lr_rate": self.recipe.min_lr / self.recipe.learning_rate}
            if self.recipe.warmup_steps is not None:  # >= 1: steps, below 1: a fraction of training
                set_warmup(self.args, self.recipe.warmup_steps)
        return super().create_scheduler(num_training_steps, optimizer)

    def _get_train_sampler(self, *dataset):  # Trainer's sampler hook; it passes the dataset since 4.57
        source = dataset[0] if dataset else self.train_dataset
        if isinstance(source, SourceMix):
            return source.sampler(seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed)
        return super()._get_train_sampler(*dataset)


# --------------------------------------------------------------------------- data: weighted sources


class WeightedSourceSampler(torch.utils.data.Sampler[int]):
    """Indices into concatenated sources: each draw picks a source with probability weight / sum(weights)
    (whatever its size), then the next item of that source's shuffled order, reshuffled when used up.

    Deterministic for a seed and epoch (`set_epoch`, which Trainer calls), so under DDP every rank draws
    the same sequence and accelerate's batch sharding gives each rank its own batches; do not wrap it in
    a DistributedSampler. An epoch is `num_samples` draws (default: all sources' items once)."""

    def __init__(self, source_sizes, weights, num_samples: int | None = None, seed: int = 0):
        self.sizes, self.weights = [int(n) for n in source_sizes], [float(w) for w in weights]
        if len(self.sizes) != len(self.weights):
            raise ValueError(f"{len(self.weights)} weights for {len(self.sizes)} sources")
        if any(w < 0 or not math.isfinite(w) for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {self.weights}")
        if any(w > 0 and n == 0 for n, w in zip(self.sizes, self.weights)):
            raise ValueError("a source with a positive weight is empty")
        self.offsets = [0]
        for n in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.num_samples = sum(self.sizes) if num_samples is None else int(num_samples)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        sources = torch.multinomial(torch.tensor(self.weights, dtype=torch.double), self.num_samples,
                                    replacement=True, generator=generator)
        indices = torch.empty(self.num_samples, dtype=torch.long)
        for s, (size, offset) in enumerate(zip(self.sizes, self.offsets)):
            slots = (sources == s).nonzero().squeeze(1)
            if len(slots):
                order = torch.cat([torch.randperm(size, generator=generator) for _ in range(-(-len(slots) // size))])
                indices[slots] = order[: len(slots)] + offset
        return iter(indices.tolist())


class SourceMix(torch.utils.data.ConcatDataset):
    """Several datasets with a sampling weight each (see `WeightedSourceSampler`)."""

    def __init__(self, datasets, weights):
        super().__init__(datasets)
        self.source_weights = [float(w) for w in weights]
        self.sampler(0)  # validate now, not at the first epoch

    @property
    def num_text_only(self) -> int:
        return sum(getattr(d, "num_text_only", 0) for d in self.datasets)

    def sampler(self, seed: int = 0, num_samples: int | None = None) -> WeightedSourceSampler:
        return WeightedSourceSampler([len(d) for d in self.datasets], self.source_weights, num_samples, seed)


def parse_source_weights(text: str | None, num_sources: int) -> list[float]:
    """'2,1,1' -> [2.0, 1.0, 1.0]; None -> equal shares."""
    if text is None:
        return [1.0] * num_sources
    weights = [float(w) for w in text.split(",")]
    if len(weights) != num_sources:
        raise ValueError(f"--source_weights has {len(weights)} weights for {num_sources} data files")
    return weights


def concat_sources(datasets, weights=None) -> SourceMix:
    """Mix datasets (one per data file): `weights` (a list or '2,1,1'; None: equal shares) set each
    source's share of the draws, as the papers mix captioning, VQA, conversation and composition data."""
    datasets = list(datasets)
    if weights is None or isinstance(weights, str):
        weights = parse_source_weights(weights, len(datasets))
    return SourceMix(datasets, weights)


# --------------------------------------------------------------------------- resolution


def set_image_size(model, processor=None, image_size: int | None = None) -> None:
    """Train (and run) at `image_size`: the vision tower's position embeddings are interpolated (bicubic),
    the config's image size follows, and with it `num_image_tokens` (v2: (size / patch)^2; v1 keeps its
    query count). The processor, if given, resizes images and expands placeholders to match. Call it before
    building the dataset (encodings hold image tokens) and the optimizer (the table is a new parameter)."""
    if image_size is None or image_size == model.config.vision_config.image_size:
        return
    tower = model.model.vision_tower
    requires_grad = tower.embeddings.pos_embed.requires_grad
    tower.resize_position_embeddings(image_size)
    tower.embeddings.pos_embed.requires_grad_(requires_grad)
    model.config.vision_config.image_size = image_size
    if processor is not None:
        processor.image_processor.image_size = image_size
        processor.num_image_tokens = model.config.num_image_tokens

"""convert_checkpoint.py --from-components: fresh models from raw LLM, CLIP, EVA and Q-Former checkpoints keep
the components' numerics; what no component holds starts from our model's init."""

import torch
import torch.nn.functional as F
from convert_helpers import ATOL, images, load, our_logits, text_ids, upstream_config
from tiny_sp import tiny_sp_path
from upstream_reference import make_upstream_state_dict, spliced_input_ids, upstream_logits, write_upstream_checkpoint

import convert_checkpoint as cc


def _internlm2_llm(folder, seed=0):
    """An InternLM2 checkpoint in the HF remote-code layout, from the decoder part of a tiny v2 state dict."""
    config = upstream_config(2)
    sd = make_upstream_state_dict(config, seed=seed)
    llm = {k: v for k, v in sd.items() if k.startswith(("model.", "output.")) and ".Plora_" not in k}
    llm_config = {k: v for k, v in config.items() if k != "img_size"}
    llm_config.update(model_type="internlm2", architectures=["InternLM2ForCausalLM"])
    write_upstream_checkpoint(folder, llm_config, llm, n_shards=2, tokenizer_model_path=tiny_sp_path(2))
    return config, sd


def position_table(clip):
    return getattr(clip, "vision_model", clip).embeddings.position_embedding.weight  # transformers 5 flattened it


def _clip_vision(folder):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=28, patch_size=14)).eval()
    with torch.no_grad():  # make the position table non-trivial so interpolation is visible
        position_table(clip).normal_()
    clip.save_pretrained(folder)
    return clip


def test_components_v2_fresh_model_keeps_llm_and_clip_numerics(tmp_path):
    config, sd = _internlm2_llm(tmp_path / "llm")
    clip = _clip_vision(tmp_path / "clip")
    common = ["--from-components", "--llm", str(tmp_path / "llm"), "--vision", str(tmp_path / "clip")]
    assert cc.main(common + ["--lora-rank", "4", "--img-size", "42", str(tmp_path / "at42")]) == 0
    assert cc.main(common + [str(tmp_path / "at28")]) == 0

    model = load(tmp_path / "at42")
    assert model.config.text_config.lora_rank == 4 and model.config.num_image_tokens == 9
    ids = text_ids()
    torch.testing.assert_close(our_logits(model, ids, None, []), upstream_logits(config, sd, ids, lora=False),
                               rtol=0, atol=ATOL)
    # Position table: CLS row kept, the 2x2 patch grid resized bicubic (align_corners=False) to 3x3.
    table = position_table(clip).detach()
    grid = F.interpolate(table[1:].reshape(1, 2, 2, 64).permute(0, 3, 1, 2), size=(3, 3), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1).reshape(9, 64)
    torch.testing.assert_close(model.model.vision_tower.embeddings.pos_embed[0], torch.cat([table[:1], grid]),
                               rtol=0, atol=1e-6)
    # Fresh parts come from our model's init: PLoRA B zero (identity at start), A and the projector random.
    state = model.state_dict()
    b = [v for k, v in state.items() if k.endswith(".B.weight")]
    a = [v for k, v in state.items() if k.endswith(".A.weight")]
    assert len(b) == len(a) == 10 and all(not t.any() for t in b) and all(t.std() > 0 for t in a)
    assert a[0].shape == (4, 64) and 0.01 < state["model.vision_proj.0.weight"].std() < 0.03
    assert model(spliced_input_ids(ids, [2], 9, 384), pixel_values=images(1, 42)).logits.isfinite().all()

    default = load(tmp_path / "at28")
    assert default.config.text_config.lora_rank == 256 and default.config.vision_config.image_size == 28
    pixels = images(2)
    with torch.no_grad():
        expected = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(default.model.vision_tower(pixels).last_hidden_state, expected, rtol=0, atol=ATOL)


def test_components_v1_fresh_model_from_eva_qformer_and_internlm(tmp_path):
    config = upstream_config(1)
    sd = make_upstream_state_dict(config, seed=4)
    eva = {k: v for k, v in sd.items() if k.startswith(("visual_encoder.", "ln_vision."))}
    qformer = {k: v for k, v in sd.items() if k.startswith("Qformer.") or k == "query_tokens"}
    qformer |= {"Qformer.cls.predictions.bias": torch.zeros(3), "temp": torch.ones(()),  # BLIP-2 extras, unused
                "Qformer.bert.embeddings.word_embeddings.weight": torch.zeros(3, 128)}
    torch.save(eva, tmp_path / "eva.pth")
    torch.save({"model": qformer}, tmp_path / "blip2.pth")  # LAVIS wraps its state dict
    llm = {k.removeprefix("internlm_model."): v for k, v in sd.items()
           if k.startswith("internlm_model.") and ".lora_" not in k}
    llm_config = {k: v for k, v in config.items() if k not in ("internlm_lora", "num_query_token")}
    llm_config.update(model_type="internlm", architectures=["InternLMForCausalLM"])
    write_upstream_checkpoint(tmp_path / "llm", llm_config, llm, tokenizer_model_path=tiny_sp_path(1))

    assert cc.main(["--from-components", "--llm", str(tmp_path / "llm"), "--eva", str(tmp_path / "eva.pth"),
                    "--qformer", str(tmp_path / "blip2.pth"), str(tmp_path / "ours")]) == 0
    model = load(tmp_path / "ours")
    ids = text_ids(vocab=386)
    torch.testing.assert_close(our_logits(model, ids, None, []), upstream_logits(config, sd, ids, lora=False),
                               rtol=0, atol=ATOL)
    state = model.state_dict()
    assert torch.equal(state["model.perceive_sampler.layers.0.cross_attn.key.weight"],
                       sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"])
    assert torch.equal(state["model.vision_tower.blocks.1.attn.v_bias"], sd["visual_encoder.blocks.1.attn.v_bias"])
    assert torch.equal(state["model.vision_tower.post_norm.weight"], sd["ln_vision.weight"])
    flag = state["model.perceive_sampler.flag_image_start"]
    assert flag.shape == (1, 1, 64) and 0.005 < flag.std() < 0.05  # fresh, from our init
    assert model(spliced_input_ids(ids, [1], 6, 386), pixel_values=images(1)).logits.isfinite().all()

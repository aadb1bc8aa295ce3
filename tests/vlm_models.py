"""Tiny random-init vision-language checkpoints built with transformers for the VLM tests and
benchmarks (LLaVA, LLaVA-NeXT, Idefics3, SmolVLM): a BPE tokenizer with an `<image>` token (and
Idefics3's tile tokens), a chat template, the image processor, and the weights saved in the
current, old or transformers' own weight-name layout."""
import numpy as np
import torch
from safetensors.torch import save_file

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")

# name: (vision kind, vision kw, text kind, text kw, llava kw, image processor kind, processor kw, layout)
SPECS = {
    "clip_llama": ("clip", dict(hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                                image_size=30, patch_size=6),
                   "llama", dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, attention_bias=True),
                   dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
                   "clip", dict(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}), "current"),
    "siglip_qwen2": ("siglip", dict(hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=3,
                                    image_size=28, patch_size=7),
                     "qwen2", dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                                   num_key_value_heads=2),
                     dict(vision_feature_layer=-1, vision_feature_select_strategy="full",
                          projector_hidden_act="gelu_pytorch_tanh"),
                     "siglip", dict(size={"height": 28, "width": 28}), "old"),
    "clip_list_pad": ("clip", dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                                   image_size=24, patch_size=8),
                      "llama", dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=5,
                                    num_key_value_heads=1, tie_word_embeddings=True),
                      dict(vision_feature_layer=[-3, 0, -1], vision_feature_select_strategy="full",
                           multimodal_projector_bias=False, projector_hidden_act="silu"),
                      "llava", dict(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}, do_pad=True),
                      "transformers"),
}
VOCAB = 320


IDEFICS3_TOKENS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'] is string %}"
    "{{': ' + message['content']}}{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}"
    "{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def make_vlm_tokenizer(extra=()):
    """A BPE with <s>, </s> and <image> (and `extra`) special tokens (no post-processor: the template adds <s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<image>", *extra],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = "what is in the image describe a cat dog red blue photo of USER ASSISTANT User Assistant picture it".split()
    g = torch.Generator().manual_seed(0)
    tok.train_from_iterator([" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g).tolist())
                             for _ in range(300)], trainer)
    return tok


def image_processor(kind, kw):
    import transformers

    cls = {"clip": transformers.CLIPImageProcessor, "siglip": transformers.SiglipImageProcessor,
           "llava": transformers.LlavaImageProcessor}[kind]
    return cls(**kw)


def rename(key: str, layout: str) -> str:
    """transformers' in-memory names (model.vision_tower.X, model.multi_modal_projector.X,
    model.language_model.X, lm_head.X) -> a published layout."""
    if layout == "current":
        return key.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1)
    if key.startswith("lm_head."):
        return "language_model." + key
    for a, b in (("model.vision_tower.", "vision_tower.vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."),
                 ("model.language_model.", "language_model.model."), ("model.image_newline", "image_newline")):
        if key.startswith(a):
            return b + key[len(a):]
    raise KeyError(key)


# Benchmark shape: a LLaVA with a CLIP ViT-B/16 tower and a SmolLM2-135M-shaped text model.
BENCH_SPEC = ("clip", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16),
              "llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                            num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                            max_position_embeddings=2048, vocab_size=49152),
              dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
              "clip", dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}), "current")


def text_config(kind: str, kw: dict):
    import transformers

    kw = dict(kw)
    return (transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config)(
        vocab_size=kw.pop("vocab_size", VOCAB), max_position_embeddings=kw.pop("max_position_embeddings", 512),
        initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)


def save_llava_weights(hf, folder, layout: str) -> None:
    """save_pretrained, then (unless layout is "transformers") the weights renamed to a published layout."""
    hf.save_pretrained(folder)
    if layout != "transformers":
        sd = {rename(k, layout): v.contiguous() for k, v in hf.state_dict().items()
              if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)}
        (folder / "model.safetensors").unlink()
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def build_llava(spec, folder, seed: int = 0, tokenizer=None):
    """Save a random-init LlavaForConditionalGeneration (+ processor files) of `spec` (a SPECS name
    or a spec tuple) to `folder`; return (hf model, hf processor)."""
    import transformers

    vkind, vkw, tkind, tkw, lkw, pkind, pkw, layout = SPECS[spec] if isinstance(spec, str) else spec
    tok = tokenizer or make_vlm_tokenizer()
    vcfg = (transformers.CLIPVisionConfig if vkind == "clip" else transformers.SiglipVisionConfig)(**vkw)
    cfg = transformers.LlavaConfig(vision_config=vcfg, text_config=text_config(tkind, tkw),
                                   image_token_index=tok.token_to_id("<image>"), **lkw)
    torch.manual_seed(seed)
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the default init leaves the projector small: make image features matter
        for p in hf.model.multi_modal_projector.parameters():
            p.normal_(0, 0.2)
    save_llava_weights(hf, folder, layout)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    ip = image_processor(pkind, pkw)
    n_patch = vkw["image_size"] // vkw["patch_size"]
    proc = transformers.LlavaProcessor(image_processor=ip, tokenizer=hf_tok, patch_size=vkw["patch_size"],
                                       vision_feature_select_strategy=lkw["vision_feature_select_strategy"],
                                       chat_template=CHAT_TEMPLATE, image_token="<image>",
                                       num_additional_image_tokens=1 if vkind == "clip" else 0)
    proc.save_pretrained(folder)
    assert n_patch
    return hf, proc


def random_image(h: int, w: int, seed: int, mode: str = "RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    c = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    return Image.fromarray(a[:, :, 0] if c == 1 else a, mode=mode)


# LLaVA-NeXT: name -> (vision kind, vision kw, text kind, text kw, llava_next kw, processor kw, layout)
NEXT_SPECS = {
    "next_clip_llama": ("clip", dict(hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=30, patch_size=6),
                        "llama", dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=1024),
                        dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=[[30, 60], [60, 30], [60, 60], [90, 30], [30, 90]]),
                        dict(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}), "current"),
    "next_siglip_qwen2": ("siglip", dict(hidden_size=36, intermediate_size=52, num_hidden_layers=2,
                                         num_attention_heads=3, image_size=28, patch_size=7),
                          "qwen2", dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                                        num_key_value_heads=2, max_position_embeddings=1024),
                          dict(vision_feature_layer=[-1, 0], vision_feature_select_strategy="full",
                               projector_hidden_act="gelu_pytorch_tanh",
                               image_grid_pinpoints=[[28, 56], [56, 28], [56, 56], [84, 28], [28, 84], [84, 56]]),
                          dict(size={"height": 28, "width": 28}, crop_size={"height": 28, "width": 28}, resample=2),
                          "old"),
}


def build_llava_next(spec, folder, seed: int = 0):
    """Save a random-init LlavaNextForConditionalGeneration (+ processor files); return (hf model, hf processor)."""
    import transformers

    vkind, vkw, tkind, tkw, lkw, pkw, layout = NEXT_SPECS[spec] if isinstance(spec, str) else spec
    tok = make_vlm_tokenizer()
    vcfg = (transformers.CLIPVisionConfig if vkind == "clip" else transformers.SiglipVisionConfig)(**vkw)
    cfg = transformers.LlavaNextConfig(vision_config=vcfg, text_config=text_config(tkind, tkw),
                                       image_token_index=tok.token_to_id("<image>"), **lkw)
    torch.manual_seed(seed)
    hf = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.model.multi_modal_projector.parameters():
            p.normal_(0, 0.2)
        hf.model.image_newline.normal_(0, 1.0)
    save_llava_weights(hf, folder, layout)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    ip = transformers.LlavaNextImageProcessor(image_grid_pinpoints=lkw["image_grid_pinpoints"], **pkw)
    proc = transformers.LlavaNextProcessor(image_processor=ip, tokenizer=hf_tok, patch_size=vkw["patch_size"],
                                           vision_feature_select_strategy=lkw["vision_feature_select_strategy"],
                                           chat_template=CHAT_TEMPLATE, image_token="<image>",
                                           num_additional_image_tokens=1 if vkind == "clip" else 0)
    proc.save_pretrained(folder)
    return hf, proc


# Idefics3 / SmolVLM: name -> (model_type, vision kw, text kw, scale_factor, image processor kw)
IDEFICS3_SPECS = {
    "idefics3": ("idefics3", dict(hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=3,
                                  image_size=28, patch_size=7),
                 dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024),
                 2, dict(size={"longest_edge": 84}, max_image_size={"longest_edge": 28})),
    "smolvlm": ("smolvlm", dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                                image_size=24, patch_size=4),
                dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=5,
                     num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=1024),
                3, dict(size={"longest_edge": 72}, max_image_size={"longest_edge": 24}, resample=2)),
}


def build_idefics3(spec, folder, seed: int = 0):
    """Save a random-init Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration (+ processor
    files, written by Idefics3Processor; SmolVLM's processor type renamed); return (hf model, hf processor)."""
    import json

    import transformers

    kind, vkw, tkw, scale, pkw = IDEFICS3_SPECS[spec] if isinstance(spec, str) else spec
    tok = make_vlm_tokenizer(IDEFICS3_TOKENS)
    image_id = tok.token_to_id("<image>")
    tcfg = transformers.LlamaConfig(**{**text_config("llama", tkw).to_dict(), "rms_norm_eps": 1e-5})
    if kind == "idefics3":
        cfg = transformers.Idefics3Config(vision_config=transformers.Idefics3VisionConfig(**vkw), text_config=tcfg,
                                          scale_factor=scale, image_token_id=image_id)
        model_cls = transformers.Idefics3ForConditionalGeneration
    else:
        cfg = transformers.SmolVLMConfig(vision_config=transformers.SmolVLMVisionConfig(**vkw).to_dict(),
                                         text_config=tcfg.to_dict(), scale_factor=scale, image_token_id=image_id,
                                         tie_word_embeddings=tkw.get("tie_word_embeddings", False))
        model_cls = transformers.SmolVLMForConditionalGeneration
    torch.manual_seed(seed)
    hf = model_cls(cfg).eval()
    with torch.no_grad():
        hf.model.connector.modality_projection.proj.weight.normal_(0, 0.2)
    hf.save_pretrained(folder)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    ip = transformers.Idefics3ImageProcessor(**pkw)
    n = (vkw["image_size"] // vkw["patch_size"]) ** 2 // scale ** 2
    proc = transformers.Idefics3Processor(image_processor=ip, tokenizer=hf_tok, image_seq_len=n,
                                          chat_template=SMOLVLM_TEMPLATE)
    proc.save_pretrained(folder)
    if kind == "smolvlm":  # as published SmolVLM folders name their processor
        path = folder / "processor_config.json"
        pc = json.loads(path.read_text())
        pc["image_processor"]["image_processor_type"] = "SmolVLMImageProcessor"
        path.write_text(json.dumps(pc))
    return hf, proc


ALL_SPECS = sorted(SPECS) + sorted(NEXT_SPECS) + sorted(IDEFICS3_SPECS)


def build_vlm(name: str, folder, seed: int = 0):
    """Any of the named test models: (hf model, hf processor)."""
    if name in NEXT_SPECS:
        return build_llava_next(name, folder, seed)
    if name in IDEFICS3_SPECS:
        return build_idefics3(name, folder, seed)
    return build_llava(name, folder, seed)


def flat_pixels(inputs, counts):
    """transformers' pixel_values as one (tiles, 3, H, W) batch: llava_next pads each image's tiles
    to the batch's largest count, idefics3 nests them per prompt."""
    px = inputs["pixel_values"]
    if "image_sizes" in inputs:
        return torch.cat([px[i, :n] for i, n in enumerate(counts)])
    return px.flatten(0, 1) if px.dim() == 5 else px


# Benchmark shape: SmolVLM-256M (SigLIP-B/16 tower at 512 px, pixel shuffle 4 -> 64 tokens per tile,
# SmolLM2-135M text model); `longest_edge` is the processor's size.longest_edge (2048 in the published folder).
def smolvlm_bench_spec(longest_edge: int = 2048):
    return ("smolvlm", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=512, patch_size=16),
            dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192,
                 vocab_size=49280),
            4, dict(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": 512}, resample=1))

"""Writes the example workflows (ComfyUI UI-format JSON) in this folder: `python make_workflows.py`.

Node types and widget orders are those of ComfyUI 0.29 (nodes.py, comfy_extras) and of this pack.
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_, widgets, inputs=(), outputs=(), pos=(0, 0), title=None):
        n = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": [320, 60 + 26 * len(widgets)],
             "flags": {}, "order": len(self.nodes), "mode": 0,
             "inputs": [{"name": name, "type": t, "link": None} for name, t in inputs],
             "outputs": [{"name": t, "type": t, "links": [], "slot_index": i} for i, t in enumerate(outputs)],
             "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            n["title"] = title
        self.nodes.append(n)
        return n

    def link(self, src, slot, dst, input_name):
        lid = len(self.links) + 1
        t = src["outputs"][slot]["type"]
        idx = next(i for i, inp in enumerate(dst["inputs"]) if inp["name"] == input_name)
        dst["inputs"][idx]["link"] = lid
        src["outputs"][slot]["links"].append(lid)
        self.links.append([lid, src["id"], slot, dst["id"], idx, t])

    def dump(self, path):
        wf = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
              "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}
        with open(path, "w") as f:
            json.dump(wf, f, indent=1)


def int8_loader(g, name, pos, title):
    # unet_name, model_type, quantization_mode, offload_to_cpu, auto_convert_to_int8, debug_mode, rotation
    return g.node("WanVideoINT8Loader", [name, "wan", "auto", "disable", "enable", False, "off"],
                  outputs=["MODEL"], pos=pos, title=title)


def lora(g, model_src, name, strength, pos):
    # model; lora_name, strength, offload_to_cpu, (optional) debug
    n = g.node("WanLoRALoaderINT8", [name, strength, "disable", False], inputs=[("model", "MODEL")],
               outputs=["MODEL"], pos=pos)
    g.link(model_src, 0, n, "model")
    return n


def speed_nodes(g, model_src, pos, attention="off"):
    """Wan INT8 Attention (off by default: the node's own default) then Wan INT8 Fused Blocks (on: same function
    as ComfyUI's block, fewer passes).  Switch attention to "int8 (P·V fp8 where supported)" for the fastest run."""
    attn = g.node("WanINT8Attention", [attention, True], inputs=[("model", "MODEL")], outputs=["MODEL"], pos=pos)
    g.link(model_src, 0, attn, "model")
    fused = g.node("WanINT8FusedBlocks", [True], inputs=[("model", "MODEL")], outputs=["MODEL"],
                   pos=(pos[0], pos[1] + 110))
    g.link(attn, 0, fused, "model")
    return fused


def text_side(g, y=0):
    clip = g.node("CLIPLoader", ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"], outputs=["CLIP"],
                  pos=(0, 400 + y))
    pos = g.node("CLIPTextEncode", ["a red fox running through fresh snow, cinematic, soft morning light"],
                 inputs=[("clip", "CLIP")], outputs=["CONDITIONING"], pos=(380, 350 + y), title="Positive")
    neg = g.node("CLIPTextEncode", ["blurry, low quality, static, watermark, text"], inputs=[("clip", "CLIP")],
                 outputs=["CONDITIONING"], pos=(380, 550 + y), title="Negative")
    g.link(clip, 0, pos, "clip")
    g.link(clip, 0, neg, "clip")
    vae = g.node("VAELoader", ["wan_2.1_vae.safetensors"], outputs=["VAE"], pos=(0, 650 + y))
    return pos, neg, vae


def sampling_inputs():
    return [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")]


def decode_and_save(g, latent_src, vae, fps, prefix, x):
    dec = g.node("VAEDecode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=["IMAGE"], pos=(x, 300))
    g.link(latent_src, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    video = g.node("CreateVideo", [fps, 8], inputs=[("images", "IMAGE")], outputs=["VIDEO"], pos=(x, 420))
    g.link(dec, 0, video, "images")
    save = g.node("SaveVideo", [prefix, "auto", "auto"], inputs=[("video", "VIDEO")], pos=(x, 540))
    g.link(video, 0, save, "video")


def i2v_two_experts():
    """Wan 2.2 I2V A14B: two INT8 experts, lightx2v 4-step LoRA + a style LoRA on each, steps split 2 + 2."""
    g = Graph()
    high = int8_loader(g, "wan2.2_i2v_high_noise_14B_fp16.safetensors", (0, 0), "High-noise expert (INT8)")
    low = int8_loader(g, "wan2.2_i2v_low_noise_14B_fp16.safetensors", (0, 200), "Low-noise expert (INT8)")
    high_l = lora(g, high, "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors", 1.0, (380, 0))
    high_s = lora(g, high_l, "my_style_high_noise.safetensors", 0.8, (760, 0))
    low_l = lora(g, low, "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors", 1.0, (380, 200))
    low_s = lora(g, low_l, "my_style_low_noise.safetensors", 0.8, (760, 200))
    high_f = speed_nodes(g, high_s, (1140, -260))
    low_f = speed_nodes(g, low_s, (1140, 420))
    shift_h = g.node("ModelSamplingSD3", [5.0], inputs=[("model", "MODEL")], outputs=["MODEL"], pos=(1140, 0))
    shift_l = g.node("ModelSamplingSD3", [5.0], inputs=[("model", "MODEL")], outputs=["MODEL"], pos=(1140, 200))
    g.link(high_f, 0, shift_h, "model")
    g.link(low_f, 0, shift_l, "model")
    pos, neg, vae = text_side(g)
    image = g.node("LoadImage", ["example.png", "image"], outputs=["IMAGE", "MASK"], pos=(0, 800))
    i2v = g.node("WanImageToVideo", [832, 480, 81, 1],
                 inputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "VAE"),
                         ("clip_vision_output", "CLIP_VISION_OUTPUT"), ("start_image", "IMAGE")],
                 outputs=["CONDITIONING", "CONDITIONING", "LATENT"], pos=(760, 450))
    i2v["outputs"][1]["name"] = "negative"
    i2v["outputs"][0]["name"] = "positive"
    g.link(pos, 0, i2v, "positive")
    g.link(neg, 0, i2v, "negative")
    g.link(vae, 0, i2v, "vae")
    g.link(image, 0, i2v, "start_image")
    # add_noise, noise_seed, control_after_generate, steps, cfg, sampler, scheduler, start, end, leftover noise
    ks_h = g.node("KSamplerAdvanced", ["enable", 42, "fixed", 4, 1.0, "euler", "simple", 0, 2, "enable"],
                  inputs=sampling_inputs(), outputs=["LATENT"], pos=(1520, 0), title="High noise: steps 0-2")
    ks_l = g.node("KSamplerAdvanced", ["disable", 42, "fixed", 4, 1.0, "euler", "simple", 2, 4, "disable"],
                  inputs=sampling_inputs(), outputs=["LATENT"], pos=(1900, 0), title="Low noise: steps 2-4")
    for ks, model in ((ks_h, shift_h), (ks_l, shift_l)):
        g.link(model, 0, ks, "model")
        g.link(i2v, 0, ks, "positive")
        g.link(i2v, 1, ks, "negative")
    g.link(i2v, 2, ks_h, "latent_image")
    g.link(ks_h, 0, ks_l, "latent_image")
    decode_and_save(g, ks_l, vae, 16.0, "video/wan22_i2v_int8", 2280)
    g.dump(os.path.join(HERE, "wan22_i2v_a14b_int8_two_experts_loras.json"))


def t2v_minimal():
    """Wan 2.1/2.2 T2V with one INT8 loader (e.g. the 1.3B), default sampler settings."""
    g = Graph()
    model = int8_loader(g, "wan2.1_t2v_1.3B_fp16.safetensors", (0, 0), "Wan T2V (INT8)")
    fast = speed_nodes(g, model, (380, -260))
    shift = g.node("ModelSamplingSD3", [8.0], inputs=[("model", "MODEL")], outputs=["MODEL"], pos=(380, 0))
    g.link(fast, 0, shift, "model")
    pos, neg, vae = text_side(g)
    latent = g.node("EmptyHunyuanLatentVideo", [832, 480, 33, 1], outputs=["LATENT"], pos=(380, 750))
    ks = g.node("KSampler", [42, "fixed", 30, 6.0, "uni_pc", "simple", 1.0], inputs=sampling_inputs(),
                outputs=["LATENT"], pos=(760, 0))
    g.link(shift, 0, ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(latent, 0, ks, "latent_image")
    decode_and_save(g, ks, vae, 16.0, "video/wan_t2v_int8", 1140)
    g.dump(os.path.join(HERE, "wan_t2v_int8_minimal.json"))


if __name__ == "__main__":
    i2v_two_experts()
    t2v_minimal()

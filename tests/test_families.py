"""Family detection and keep-in-high-precision rules, against real key lists dumped from ComfyUI's models
(tests/data/model_keys: ComfyUI 4f874c5, model classes instantiated on the meta device)."""
import glob
import json
import os
import re

import pytest

from wan_int8.models.families import detect_family, get_family, wan_variant

DATA = os.path.join(os.path.dirname(__file__), "data", "model_keys")

# file -> (family, block linears expected to be INT8 = blocks x linears per block)
EXPECTED = {
    "wan21_t2v_14b": ("wan", 40 * 10), "wan21_i2v_14b": ("wan", 40 * 12), "wan22_ti2v_5b": ("wan", 30 * 10),
    "wan21_t2v_1_3b": ("wan", 30 * 10), "flux2_dev": ("flux2", 8 * 8 + 48 * 2), "flux2_klein_4b": ("flux2", 5 * 8 + 20 * 2),
    "flux2_klein_9b": ("flux2", 8 * 8 + 24 * 2), "chroma": ("chroma", 19 * 8 + 38 * 2), "z_image": ("z-image", 30 * 5),
    "qwen_image": ("qwen-image", 60 * 12), "ltx2": ("ltx2", 48 * 28), "anima": ("anima", 28 * 10),
}
# Never INT8, in any family: embedders, modulation/adaLN, heads, final layers, refiners, guidance, adapters.
NEVER = re.compile(r"(embed|modulation|adaln|adaLN|head|final_layer|refiner|guidance|_in$|img_in|txt_in|proj_out|"
                   r"norm_out|llm_adapter|_mod\.|time_)")


def load(name):
    with open(os.path.join(DATA, name + ".json")) as f:
        return json.load(f)["keys"]


def test_every_fixture_is_covered():
    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(DATA, "*.json"))}
    assert names == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_detection_and_rules_on_real_keys(name):
    keys = load(name)
    family, count = EXPECTED[name]
    fam = detect_family(keys)
    assert fam is not None and fam.name == family
    linears = [k[:-len(".weight")] for k, s in keys.items() if k.endswith(".weight") and len(s) == 2]
    chosen = [n for n in linears if fam.wants_int8(n)]
    assert len(chosen) == count
    assert not [n for n in chosen if NEVER.search(n)]
    # the chosen ones are the big per-block projections: both dims >= 1024 in these real configs
    assert all(min(keys[n + ".weight"]) >= 1024 for n in chosen)


def test_other_families_do_not_claim_wan_keys():
    keys = load("wan21_t2v_14b")
    for other in ("flux2", "chroma", "z-image", "qwen-image", "ltx2", "anima"):
        assert not get_family(other).matches(list(keys))


def test_kohya_style_prefix_collisions_are_impossible():
    wan = get_family("wan")
    assert wan.wants_int8("blocks.3.cross_attn.k") and wan.wants_int8("blocks.3.cross_attn.k_img")
    assert not wan.wants_int8("blocks.3.cross_attn.norm_k_img") and not wan.wants_int8("text_embedding.0")
    assert not wan.wants_int8("xblocks.3.ffn.0") and not wan.wants_int8("blocks.3.ffn.0.lora")


def test_wan_variant_labels():
    assert wan_variant(load("wan21_t2v_14b")) == "14B t2v"
    assert wan_variant(load("wan21_i2v_14b")) == "14B i2v (2.1)"
    assert wan_variant(load("wan22_ti2v_5b")) == "5B ti2v"
    assert wan_variant(load("wan21_t2v_1_3b")) == "1.3B t2v"
    with pytest.raises(ValueError):
        get_family("sd15")

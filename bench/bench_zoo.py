#!/usr/bin/env python
"""Every classification architecture in torchvision, 104 timm CNNs, 36 timm transformers and 12 timm token-mixing MLPs:
group channels, permute at random, compare outputs.

    python bench/bench_zoo.py [--only resnext50_32x4d,convnext_tiny] [--size 224] [--time-limit 120]
    python bench/bench_zoo.py --source timm          # needs timm (pip install -e .[timm]); nothing is downloaded
    python bench/bench_zoo.py --source timm-transformers   # each at the image size it was made for
    python bench/bench_zoo.py --source timm-mlp            # MLP-Mixer, ResMLP, gMLP: the same

Each model is built with random weights, random BatchNorm statistics and random values for parameters
initialised to a constant (a zero classifier, LayerNorm affines, class tokens; num_classes=10), grouped
on one image, permuted with random maps and run on two images. A row is `exact` (largest output
difference relative to the largest output), `refused` (the project's own one-line error, quoted),
`crash` (any other exception: a bug) or `WRONG` (permuted but not exact: the worst bug). Rows go to
bench/zoo-<source>.csv with the seconds each step took, each as it finishes; with --only, the listed
models' rows are replaced and the others kept. timm rows name the model's family (its timm module).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision
from harness import HERE, Table

from otfuse import channel_groups, permute, random_maps
from otfuse.errors import OtfuseError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import randomize_bn, randomize_constants  # noqa: E402  (the tests' own randomisers: one way to do it)

# CNNs only (transformers and attention hybrids are counted apart), small variants, 30 families
TIMM_CNNS = """resnet10t resnet14t resnet18 resnet18d resnet26 resnet26d resnet34 resnet50 resnet50d seresnet18
seresnext26t_32x4d seresnext26d_32x4d ecaresnet26t ecaresnet50t resnetblur18 resnetrs50 resnext26ts resnet26t
regnetz_b16 repvgg_a0 repvgg_a2 gernet_s gernet_m mobileone_s0 skresnet18 skresnet34 skresnext50_32x4d resnest14d
resnest26d res2net50_14w_8s res2net50_26w_4s res2next50 cspresnet50 cspresnext50 cspdarknet53 darknet17 darknet21
cs3darknet_s cs3darknet_m cs3edgenet_x cs3sedarknet_l dla34 dla46_c dla46x_c dla60 dla60x_c dpn48b dpn68
efficientnet_b0 efficientnet_lite0 efficientnet_es tf_efficientnetv2_b0 efficientnetv2_rw_t mixnet_s mixnet_m
tf_mixnet_s mnasnet_small mnasnet_100 fbnetc_100 spnasnet_100 semnasnet_075 mobilenetv2_050 tinynet_a tinynet_e
ghostnet_050 ghostnet_100 ghostnetv2_100 repghostnet_050 hrnet_w18_small inception_v3 inception_v4
inception_next_atto mobilenetv3_small_050 mobilenetv3_large_100 lcnet_050 lcnet_100 mobilenetv4_conv_small
nf_resnet26 nf_regnet_b0 dm_nfnet_f0 regnetx_002 regnetx_004 regnety_002 regnety_004 rexnet_100 rexnetr_100
selecsls42b legacy_seresnet18 tresnet_m vgg11 vgg11_bn vovnet39a ese_vovnet19b_dw xception41 xception65
convnext_atto convnext_femto convnextv2_atto densenet121 densenetblur121d hardcorenas_a hardcorenas_f hgnet_tiny
hgnetv2_b0""".split()


# ViT-style, hierarchical and hybrid transformers (and one LSTM mixer), small variants, 20 families
TIMM_TRANSFORMERS = """vit_tiny_patch16_224 vit_small_patch16_224 vit_base_patch16_224 vit_base_patch32_224
vit_little_patch16_reg4_gap_256 vit_medium_patch16_gap_256 vit_wee_patch16_reg1_gap_256 vit_base_patch16_clip_224
deit_tiny_patch16_224 deit_tiny_distilled_patch16_224 deit_small_patch16_224 deit3_small_patch16_224
deit3_medium_patch16_224 beit_base_patch16_224 beitv2_base_patch16_224 flexivit_small vit_relpos_small_patch16_224
vit_srelpos_small_patch16_224 crossvit_tiny_240 cait_xxs24_224 swin_tiny_patch4_window7_224 swin_s3_tiny_224
swinv2_tiny_window8_256 swinv2_cr_tiny_224 xcit_nano_12_p16_224 levit_128s pit_ti_224 convit_tiny twins_svt_small
pvt_v2_b0 eva02_tiny_patch14_224 vit_small_patch16_rope_224 maxvit_tiny_tf_224 coat_lite_tiny tnt_s_patch16_224
sequencer2d_s""".split()
# token-mixing MLPs (timm's mlp_mixer module: MLP-Mixer, gMixer, ResMLP, gMLP), up to base size
TIMM_MLPS = """mixer_s32_224 mixer_s16_224 mixer_b32_224 mixer_b16_224 gmixer_12_224 gmixer_24_224 resmlp_12_224 resmlp_24_224
resmlp_36_224 gmlp_ti16_224 gmlp_s16_224 gmlp_b16_224""".split()
SOURCES = {"torchvision": None, "timm": TIMM_CNNS, "timm-transformers": TIMM_TRANSFORMERS, "timm-mlp": TIMM_MLPS}
OWN_SIZE = ("timm-transformers", "timm-mlp")  # a position table or a token MLP fixes the image side


def build(source: str, name: str) -> tuple[torch.nn.Module, str]:
    """(a model with random weights and 10 classes, its family)."""
    if source.startswith("timm"):
        import timm  # optional: only this source needs it

        return timm.create_model(name, pretrained=False, num_classes=10), _timm_family(name)
    kwargs = {"num_classes": 10}
    if name.startswith(("inception", "googlenet")):
        kwargs.update(aux_logits=False, init_weights=False)
    return torchvision.models.get_model(name, **kwargs), name.rstrip("0123456789_").split("_")[0]


def _timm_family(name: str) -> str:
    import timm

    return timm.models._registry._model_to_module.get(name, "").rpartition(".")[2] or name.split("_")[0]


def check(source: str, name: str, size: int | None, limit: float) -> dict:
    """One row; `size` None: the image side the model was made for (a transformer's position table fixes it)."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    try:
        model, family = build(source, name)
    except Exception as exc:
        return {"model": name, "result": "crash", "message": f"build: {type(exc).__name__}: {str(exc)[:200]}", "total_s": "0"}
    model = randomize_bn(randomize_constants(model)).eval()
    size = size or getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    row = {
        "model": name,
        "family": family,
        "size": size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_s": f"{time.perf_counter() - t0:.1f}",
    }
    try:
        t1 = time.perf_counter()
        groups = channel_groups(model, x[:1], time_limit=limit)
        t2 = time.perf_counter()
        out = permute(model, groups, random_maps(groups, seed=3))
        t3 = time.perf_counter()
        with torch.no_grad():
            a, b = model(x), out(x)
        err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
        if err > 1e-5:  # deep random networks reach outputs of 1e8, where float32 rounds at 1e-4: decide in float64
            with torch.no_grad():
                a, b = model.double()(x.double()), out.double()(x.double())
            err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
        row.update(
            result="exact" if err <= 1e-5 else "WRONG",
            groups=len(groups),
            rel_error=f"{err:.1e}",
            groups_s=f"{t2 - t1:.1f}",
            permute_s=f"{t3 - t2:.1f}",
            message="",
        )
    except OtfuseError as exc:
        row.update(result="refused", message=str(exc)[:300])
    except Exception as exc:  # what the bench is for: anything but the project's own error is a bug
        row.update(result="crash", message=f"{type(exc).__name__}: {str(exc)[:200]}")
    row["total_s"] = f"{time.perf_counter() - t0:.1f}"
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default="torchvision", choices=list(SOURCES))
    p.add_argument("--only", default="", help="comma-separated model names (default: every classification model of the source)")
    p.add_argument("--size", type=int, default=None, help="image side (default: 224; timm-transformers and timm-mlp: each model's own)")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds channel_groups may take per model (default: 120)")
    p.add_argument("--out", default="", help="default: bench/zoo-<source>.csv")
    args = p.parse_args()
    every = SOURCES[args.source] or torchvision.models.list_models(module=torchvision.models)
    size = args.size or (None if args.source in OWN_SIZE else 224)
    names = [n for n in args.only.split(",") if n] or every
    fields = [
        "model",
        "family",
        "result",
        "rel_error",
        "groups",
        "size",
        "parameters",
        "build_s",
        "groups_s",
        "permute_s",
        "total_s",
        "message",
    ]
    # rows of models not rerun are kept: a stopped run, or one with --only, leaves the others as they were
    table = Table(Path(args.out or HERE / f"zoo-{args.source}.csv"), ("model",), fields)
    for name in names:
        r = check(args.source, name, size, args.time_limit)
        table.put(r)
        print(f"{name:<22} {r['result']:<8} {r.get('rel_error', ''):>8} {r['total_s']:>6} s  {r['message'][:110]}", flush=True)
    table.rewrite(sorted((r for r in table.rows if r["model"] in every or r["model"] in names), key=lambda r: r["model"]))
    rows = table.rows
    print(f"wrote {table.path}: " + ", ".join(f"{k} {sum(r['result'] == k for r in rows)}" for k in ("exact", "refused", "crash", "WRONG")))
    return 0 if not any(r["result"] in ("crash", "WRONG") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

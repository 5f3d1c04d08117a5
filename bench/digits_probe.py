"""Which protections hold on scikit-learn's digits? (the demo's data; no shared data needed)

One probe = generate a perturbation in memory (EMN with the given options, random class-wise noise, or
none), quantise to 8 bits, train a victim with ueguard's engine and print its per-epoch test accuracy.
The demo budget's table in docs/results.md was made with this script, e.g.

    python bench/digits_probe.py --gen emn_cw --genaug cropflip --json bench/results/digits-probe.jsonl

``--quick`` trains the victim 4 epochs and caps EMN at 4 rounds. The clean baseline is ``--gen none``
(the ratio printed is protected ÷ clean only when ``--baseline`` is given).
"""
import time, json, argparse
import numpy as np, torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from ueguard.data.working_set import WorkingSet
from ueguard.engine.runtime import Runtime, seed_everything
from ueguard.engine.fit import fit, FitConfig
from ueguard.engine.augment import crop_flip
from ueguard.defenses.base import Defense
from ueguard import models
from ueguard.methods import create_method

p = argparse.ArgumentParser()
p.add_argument("--gen", default="emn_cw")   # emn_cw, emn_sw, rand_cw, none, or any registered method
p.add_argument("--eps", type=float, default=8)
p.add_argument("--genaug", default="none")  # none, crop, cropflip
p.add_argument("--vaug", default="cropflip")  # none crop cropflip
p.add_argument("--size", type=int, default=32)
p.add_argument("--rounds", type=int, default=8)
p.add_argument("--epochs", type=int, default=10)
p.add_argument("--rgb", action="store_true")
p.add_argument("--arch", default="resnet18_cifar_slim")
p.add_argument("--opts", default="{}")
p.add_argument("--quick", action="store_true")
p.add_argument("--json", default=None, help="append the record to this JSON-lines file")
p.add_argument("--baseline", action="store_true", help="also train on the clean images and print the ratio")
a = p.parse_args()
if a.quick:
    a.epochs, a.rounds = min(a.epochs, 4), min(a.rounds, 4)
import os; torch.set_num_threads(int(os.environ.get("NT", "2")))
d = load_digits(); imgs = np.round(d.images * (255/16)).astype(np.uint8)
tr, te = train_test_split(np.arange(len(imgs)), test_size=0.25, stratify=d.target, random_state=0)
def ws(ids):
    arr = np.stack([np.asarray(Image.fromarray(imgs[i], "L").resize((a.size, a.size), Image.BICUBIC)) for i in ids])
    x = torch.from_numpy(arr)[:, None].repeat(1, 3, 1, 1)
    return WorkingSet(x, torch.from_numpy(d.target[ids]).long(), torch.full((len(ids),), not a.rgb), tuple(map(str, range(10))), [str(i) for i in ids])
train, test = ws(tr), ws(te)
rt = Runtime.create("cpu", "fp32")
eps = a.eps / 255
t0 = time.time()
class Aug(Defense):
    name = "x"; description = ""
    def __init__(self, mode): self.mode = mode
    def augment(self, x, g, standard=None):
        if self.mode == "none": return x
        return crop_flip(x, g, flip=self.mode == "cropflip")
info = {}
if a.gen == "none":
    ptrain = train
elif a.gen == "rand_cw":
    g = torch.Generator().manual_seed(0)
    delta = (torch.rand(10, 3, a.size, a.size, generator=g) * 2 - 1) * eps
    if not a.rgb: delta = delta.mean(1, keepdim=True).expand(-1, 3, -1, -1) / delta.mean(1, keepdim=True).abs().max() * eps
    x = (train.images.float() / 255 + delta[train.labels]).clamp(0, 1)
    ptrain = WorkingSet(torch.round(x * 255).to(torch.uint8), train.labels, train.grayscale, train.classes, train.ids)
else:
    seed_everything(0)
    sur = models.create_model(a.arch, 10)
    if a.gen.startswith("emn_"):
        method = "emn"
        opts = dict(perturbation="classwise" if a.gen == "emn_cw" else "samplewise", max_rounds=a.rounds, **json.loads(a.opts))
        if a.genaug != "none": opts["augment"] = a.genaug
    else:  # another registered method: its own defaults plus --opts
        method, opts = a.gen, json.loads(a.opts)
    m = create_method(method, budget="quick", runtime=rt, surrogate=sur, eps=eps, seed=0, **opts)
    pert = m(train)
    info = pert.info
    idx = torch.arange(len(train))
    x = (train.images.float() / 255 + pert.for_samples(idx, train.labels, train.grayscale)).clamp(0, 1)
    ptrain = WorkingSet(torch.round(x * 255).to(torch.uint8), train.labels, train.grayscale, train.classes, train.ids)
tg = time.time() - t0
gen = seed_everything(0)
model = models.create_model(a.arch, 10)
hist = fit(model, ptrain, test, FitConfig(epochs=a.epochs), defense=Aug(a.vaug), params=list(model.parameters()), runtime=rt, generator=gen)
record = {"args": vars(a), "gen_s": round(tg), "total_s": round(time.time() - t0),
          "info": {k: v for k, v in info.items() if k != "surrogate_train_accuracy"},
          "sur_acc": [round(v, 3) for v in info.get("surrogate_train_accuracy", [])],
          "test": [h["test_accuracy"] for h in hist], "train": [h["train_accuracy"] for h in hist]}
if a.baseline:
    gen = seed_everything(0)
    model = models.create_model(a.arch, 10)
    clean = fit(model, train, test, FitConfig(epochs=a.epochs), defense=Aug(a.vaug), params=list(model.parameters()), runtime=rt, generator=gen)
    record["clean_test"] = [h["test_accuracy"] for h in clean]
    record["ratio_protected_to_clean"] = round(hist[-1]["test_accuracy"] / clean[-1]["test_accuracy"], 4)
    print(f"protected {hist[-1]['test_accuracy']:.3f} / clean {clean[-1]['test_accuracy']:.3f} = {record['ratio_protected_to_clean']:.3f}")
print(json.dumps(record), flush=True)
if a.json:
    with open(a.json, "a") as f:
        f.write(json.dumps(record) + "\n")

"""otfuse finetune: the training loop started from a fused checkpoint's weights."""

from __future__ import annotations

import torch

from otfuse.checkpoints import load_checkpoint
from otfuse.cli import main
from otfuse.evaluate import accuracy
from otfuse.precision import Precision


def test_one_epoch_of_finetuning_improves_a_fused_model(trained, tmp_path, capsys):
    _, data, paths, root = trained
    fused_path = tmp_path / "fused.pt"
    base = ["--data-dir", str(root / "data"), "--device", "cpu"]
    # the plain aligned average (no refit): a start well below its parents, which one epoch lifts on any machine
    assert (
        main(
            ["fuse", str(paths[0]), str(paths[1]), "--method", "weight", "--no-refit", "--bn-batches", "4", "--out", str(fused_path), *base]
        )
        == 0
    )
    assert main(["finetune", str(fused_path), "--batch-size", "64", *base]) == 0
    assert "saved" in capsys.readouterr().out
    out = tmp_path / "fused-ft1.pt"
    tuned, meta, _ = load_checkpoint(out)
    fused = load_checkpoint(fused_path)[0]
    assert meta["kind"] == "finetuned" and meta["init"] == str(fused_path) and meta["epoch"] == 1
    assert not meta["kept_start"]
    assert (
        accuracy(tuned, data.val_x, data.val_y, data.norm, Precision.FP32)
        > accuracy(fused, data.val_x, data.val_y, data.norm, Precision.FP32) + 1
    )
    # fine-tuning from the same weights with the same seed is reproducible
    again = tmp_path / "again.pt"
    assert main(["finetune", str(fused_path), "--batch-size", "64", "--out", str(again), *base]) == 0
    a, b = tuned.state_dict(), load_checkpoint(again)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_bad_inputs_are_one_line(trained, tmp_path, capsys):
    _, _, paths, root = trained
    base = ["--data-dir", str(root / "data"), "--device", "cpu", "--out", str(tmp_path / "x.pt")]
    assert main(["finetune", str(tmp_path / "missing.pt"), *base]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["finetune", str(paths[0]), "--width", "32", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert "--width 32 differs" in err and "\n" not in err and not (tmp_path / "x.pt").exists()


def test_distillation_mixes_the_teachers_loss_with_the_label_loss_by_distill_weight(trained, tmp_path):
    """distill_weight 0 is training on labels alone (the teachers run but weigh nothing); 0.5 is not
    (1, label-free distillation, is tests/test_results.py's fused_ft_distill column)."""
    from otfuse.train import finetune

    _, data, paths, root = trained
    run = lambda name, **kw: load_checkpoint(
        finetune(
            paths[0], tmp_path / f"{name}.pt", str(root / "data"), "cpu", data, batch_size=256, precision="fp32", keep_start=False, **kw
        )
    )[0].state_dict()
    labels, zero = run("labels"), run("zero", distill=True, teachers=f"{paths[0]},{paths[1]}", distill_weight=0.0)
    half = run("half", distill=True, teachers=f"{paths[0]},{paths[1]}", distill_weight=0.5)
    assert all(torch.equal(labels[k], zero[k]) for k in labels)
    assert not torch.equal(half["fc.weight"], labels["fc.weight"])


def test_a_finetune_that_ends_below_its_start_on_validation_keeps_the_start(trained, tmp_path):
    from otfuse.train import finetune

    _, data, paths, root = trained
    start, start_meta, _ = load_checkpoint(paths[0])
    # a learning rate far too high for these weights: the run ends worse than it began
    out = finetune(paths[0], tmp_path / "hot.pt", str(root / "data"), "cpu", data, batch_size=64, lr=3.0, warmup=0.0, precision="fp32")
    model, meta, _ = load_checkpoint(out)
    assert meta["kept_start"] and meta["history"][-1]["val_acc"] < meta["start_val_acc"] == meta["val_acc"]
    assert all(torch.equal(model.state_dict()[k], start.state_dict()[k]) for k in start.state_dict())
    gentle = load_checkpoint(
        finetune(paths[0], tmp_path / "gentle.pt", str(root / "data"), "cpu", data, batch_size=64, lr=0.01, precision="fp32")
    )[1]
    assert gentle["val_acc"] >= gentle["start_val_acc"]


def test_finetune_defaults_follow_the_checkpoint():
    """A fusion of parents that fit their augmented training set gets the recipe chosen for them (2 epochs, lr 0.02,
    augmented, half the loss from its parents); the underfit proxies, trained models and digits keep FINETUNE."""
    from otfuse.train import FINETUNE, FINETUNE_FITTED, finetune_config

    fused = {"kind": "fused", "dataset": "fashion-mnist", "arch": "resnet18", "width": 16, "parent_train_acc": [99.8, 99.6]}
    cfg = finetune_config(fused, "f.pt", "o.pt", lr=0.01)
    assert (cfg.epochs, cfg.lr, cfg.augment, cfg.distill, cfg.distill_weight) == (2, 0.01, True, True, 0.5)  # options still win
    assert FINETUNE_FITTED["epochs"] == 2 and FINETUNE["epochs"] == 1
    for meta in ({**fused, "parent_train_acc": [99.8, 91.5]}, {**fused, "dataset": "digits"}, {**fused, "kind": "trained"}):
        cfg = finetune_config(meta, "f.pt", "o.pt")
        assert (cfg.epochs, cfg.lr, cfg.augment, cfg.distill) == (1, 0.05, False, False)


def test_models_trained_with_adamw_are_finetuned_with_adamw():
    """A fusion of AdamW-trained parents (the ViT), or such a model itself, gets AdamW at a quarter of its training
    peak: SGD's learning rates would wreck it."""
    from otfuse.train import FINETUNE_ADAMW, finetune_config

    trained = {"kind": "trained", "dataset": "fashion-mnist", "arch": "vit", "width": 64, "config": {"optimizer": "adamw"}}
    fused = {
        "kind": "fused",
        "dataset": "fashion-mnist",
        "arch": "vit",
        "width": 64,
        "parent_optimizer": "adamw",
        "parent_train_acc": [99.8, 99.6],
    }
    for meta in (trained, fused):
        cfg = finetune_config(meta, "f.pt", "o.pt")
        assert (cfg.optimizer, cfg.lr, cfg.epochs) == ("adamw", FINETUNE_ADAMW["lr"], 1)


def test_distilling_from_parents_that_moved_is_one_line(trained, tmp_path, capsys):
    _, _, paths, root = trained
    fused = tmp_path / "fused.pt"
    base = ["--data-dir", str(root / "data"), "--device", "cpu"]
    assert (
        main(["fuse", str(paths[0]), str(paths[1]), "--no-refit", "--bn-batches", "2", "--n-images", "64", "--out", str(fused), *base]) == 0
    )
    ckpt = torch.load(fused, weights_only=True)
    ckpt["meta"]["parents"] = [str(tmp_path / "gone0.pt"), str(tmp_path / "gone1.pt")]
    torch.save(ckpt, fused)
    capsys.readouterr()
    assert main(["finetune", str(fused), "--distill", "--out", str(tmp_path / "x.pt"), *base]) == 2
    err = capsys.readouterr().err.strip()
    assert "gone0.pt does not exist" in err and "--teachers" in err and "\n" not in err and not (tmp_path / "x.pt").exists()

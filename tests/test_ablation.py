"""dcccl ablate: the shipped variants parse, share what they may with the reference, and make the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dcccl.commands import ablate
from dcccl.errors import ConfigError
from dcccl.methods.ablation import Ablation, ablation_markdown, ablation_table, read_variants
from dcccl.pipeline.steps import StageCall
from tests.commands import dcccl

VARIANTS = Path("configs/ablations/variants.yaml")


def _ablation(tmp_path: Path, *extra: str) -> Ablation:
    parser = ablate.ablate_parser()
    cfg = parser.parse_args(["--config", "configs/quickstart.yaml", "--variants", str(VARIANTS),
                             "--run_dir", str(tmp_path), *extra])
    variants = ablate.variant_settings(parser, cfg, read_variants(VARIANTS, cfg.only))
    return Ablation(variants, [0, 1], tmp_path / "ablation")


def _stages(plan: list) -> list[str]:
    return [step.stage for step in plan if isinstance(step, StageCall)]


def test_every_shipped_variant_parses_and_trains_only_what_it_changes(tmp_path: Path) -> None:
    runs = {run.name: run for run in _ablation(tmp_path).runs(seed=1)}
    assert list(runs)[0] == "defaults" and len(runs) == 11
    reference = runs["defaults"]
    assert _stages(reference.plan)[:2] == ["cloud", "distill"]
    assert reference.settings.run.root == tmp_path / "ablation" / "defaults" / "seed_1"
    assert reference.settings.seed_everything == 1
    for name in ("paper_rounds", "parallel_rounds", "cross_entropy", "class_aware_fusion", "logit_adjustment",
                 "finetune_head", "finetune_cloud_rows"):  # same f and g as the reference: neither is trained again
        assert runs[name].cloud_submodel == reference.settings.run.cloud_submodel, name
        assert runs[name].control_model == reference.settings.run.control_model, name
        assert "cloud" not in _stages(runs[name].plan) and "distill" not in _stages(runs[name].plan), name
    for name in ("kl_distillation", "mixup_distillation", "synthesised_distillation"):  # another g, f kept
        assert runs[name].cloud_submodel == reference.settings.run.cloud_submodel
        assert _stages(runs[name].plan)[0] == "distill"
        assert runs[name].control_model == runs[name].settings.run.control_model
    assert runs["paper_rounds"].settings.round_order == "parallel"
    assert runs["class_aware_fusion"].settings.aggregation.class_aware_head
    assert not runs["defaults"].settings.aggregation.class_aware_head
    assert "head" in _stages(runs["finetune_head"].plan) and "head" not in _stages(reference.plan)


def test_only_keeps_the_reference_and_refuses_unknown_variants(tmp_path: Path) -> None:
    assert [r.name for r in _ablation(tmp_path, "--only", "kl_distillation").runs(0)] == ["defaults",
                                                                                         "kl_distillation"]
    with pytest.raises(ConfigError, match=r"has no variants \['nope'\]"):
        read_variants(VARIANTS, ["nope"])
    empty = tmp_path / "empty.yaml"
    empty.write_text("variants: {}\n")
    with pytest.raises(ConfigError, match="holds no variants"):
        read_variants(empty)


def test_table_gives_mean_and_std_over_seeds() -> None:
    def metrics(acc: float) -> dict:
        return {"served/acc": acc, "served/acc_cloud_classes": acc + 0.1, "served/acc_device_classes": acc - 0.2,
                "fidelity": {"cloud_test": {"agreement": 0.9}, "device_test": {"agreement": acc}}}

    table = ablation_table({"defaults": {0: metrics(0.9), 1: metrics(0.8)}, "other": {0: metrics(0.5),
                                                                                    1: metrics(0.5)}})
    assert table["variants"] == ["defaults", "other"]
    assert table["defaults"]["acc"] == pytest.approx(0.85)
    assert table["defaults"]["acc_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert table["defaults"]["acc_device_classes"] == pytest.approx(0.65)
    assert table["other"]["agreement_device_test_std"] == 0.0
    text = ablation_markdown(table, {"other": "something else"})
    assert "| defaults | 85.0 ± 7.1 | 95.0 ± 7.1 | 65.0 ± 7.1 | 90.0 ± 0.0 | 85.0 ± 7.1 |  |" in text
    assert text.splitlines()[3].endswith("| something else |") and "Seeds: 0, 1 (mean ± std)." in text


@pytest.mark.slow
def test_tiny_ablation_through_the_cli(tmp_path: Path) -> None:
    result = dcccl("ablate", "--config", "configs/quickstart.yaml", "--variants", str(VARIANTS), "--only",
                   "kl_distillation", "--run_dir", str(tmp_path), "--rounds", "1", "--trainer.max_steps", "3",
                   "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "2",
                   "--trainer.enable_progress_bar", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
    assert table["variants"] == ["defaults", "kl_distillation"]
    assert 0.0 <= table["kl_distillation"]["acc"] <= 1.0 and table["defaults"]["seeds"] == [0]
    # kl_distillation trained its own g and took the reference's f: no cloud stage in its run directory.
    assert (tmp_path / "ablation" / "kl_distillation" / "seed_0" / "distill").is_dir()
    assert not (tmp_path / "ablation" / "kl_distillation" / "seed_0" / "cloud").exists()
    assert "| kl_distillation |" in (tmp_path / "ablation" / "ablation.md").read_text()


@pytest.mark.parametrize("path", sorted(Path("configs/ablations").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_variants_file_parses_into_settings(path: Path, tmp_path: Path) -> None:
    parser = ablate.ablate_parser()
    base = "configs/privacy.yaml" if path.name == "privacy.yaml" else "configs/fleet_1000.yaml"
    cfg = parser.parse_args(["--config", base, "--variants", str(path), "--run_dir", str(tmp_path)])
    variants = ablate.variant_settings(parser, cfg, read_variants(path, cfg.only))
    assert len(variants) == len(read_variants(path)) >= 2
    for name, entry in read_variants(path).items():  # a rule a variant names is the rule its settings hold
        rule = entry["settings"].get("aggregation", {}).get("class_path")
        assert rule is None or type(variants[name].rule).__name__ == rule, name

"""The papers' claims the default experiment tests, each as a paired difference between two result rows.

A claim names a *treatment* row and a *baseline* row (keys of
:func:`.report.summarise`: ``"kd@ce"``, ``"ce"``, ``"teacher:ce"``,
``"dual-student@ce:mlp"``, ...), a metric and the direction the paper
predicts (+1: the treatment is higher, -1: lower).  Its verdict comes from the
95 % interval of the paired per-seed difference (:func:`.stats.verdict`):
``holds``, ``reversed`` or ``not resolved``.  A claim whose rows were not run
is ``not run``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping

from .stats import paired_difference, verdict


@dataclass(frozen=True)
class Claim:
    """``metric(treatment) - metric(baseline)`` has the sign ``direction``, according to ``source``."""

    name: str
    source: str
    statement: str
    treatment: str
    baseline: str
    metric: str = "accuracy"
    direction: int = 1


CLAIMS: List[Claim] = [
    Claim("kd-vs-ce", "Hinton et al., 2015",
          "KD from an equal-label teacher (transfer set) beats CE only", "kd@ce", "ce"),
    Claim("kd-more-labels-vs-ce", "Hinton et al., 2015",
          "KD from a teacher with more labels beats CE only", "kd@ce-more", "ce"),
    Claim("mse-teacher", "Hamidi et al., ECCV 2024",
          "an MSE-trained teacher gives a better KD student than a CE-trained one (equal labels)", "kd@mse", "kd@ce"),
    Claim("mse-teacher-more-labels", "Hamidi et al., ECCV 2024",
          "the same with the teachers given more labels", "kd@mse-more", "kd@ce-more"),
    Claim("ttm", "Zheng & Yang, ICLR 2024", "TTM beats KD", "ttm@ce", "kd@ce"),
    Claim("wttm", "Zheng & Yang, ICLR 2024", "WTTM beats KD", "wttm@ce", "kd@ce"),
    Claim("dist", "Huang et al., NeurIPS 2022", "DIST beats KD", "dist@ce", "kd@ce"),
    Claim("dkd", "Zhao et al., CVPR 2022", "DKD beats KD", "dkd@ce", "kd@ce"),
    Claim("grouped-kd-vs-kd", "Zhao et al., AAAI 2023 (Grouped KD)",
          "Grouped KD (Primary-KD + Binary-KD, Secondary-KD omitted) beats KD", "grouped-kd@ce", "kd@ce"),
    Claim("grouped-kd-vs-dkd", "Zhao et al., AAAI 2023 (Grouped KD)",
          "Grouped KD beats DKD (both distil the labelled rows only)", "grouped-kd@ce", "dkd@ce"),
    Claim("label-revision", "Lan et al., 2024 (Label Revision)",
          "label revision improves KD (it can only revise the 500 labelled rows the teacher gets wrong; "
          "the unlabelled transfer rows are distilled as in KD)", "kd-lr@ce", "kd@ce"),
    Claim("label-revision-data-selection", "Lan et al., 2024 (Label Revision + Data Selection)",
          "label revision with data selection improves KD (both act on the 500 labelled rows only)",
          "kd-lr-ds@ce", "kd@ce"),
    Claim("dual-student-mlp", "Gore et al., 2025",
          "the dual student's MLP beats the same MLP distilled alone", "dual-student@ce:mlp", "entropy-kd@ce"),
    Claim("dual-student-cnn", "Gore et al., 2025",
          "the dual student's CNN beats the same CNN distilled alone", "dual-student@ce:cnn", "entropy-kd-cnn@ce"),
    Claim("mean-teacher", "Tarvainen & Valpola, NeurIPS 2017",
          "the mean teacher (EMA) with unlabelled data beats CE only", "mean-teacher:ema", "ce"),
    Claim("mean-teacher-ema", "Tarvainen & Valpola, NeurIPS 2017",
          "the EMA beats its own student", "mean-teacher:ema", "mean-teacher:student"),
    Claim("ssd-vs-teacher", "Aslam et al., ECML-PKDD 2025",
          "stochastic self-distillation beats its teacher (the same model, CE only)", "ssd@self", "ce"),
    Claim("ssd-vs-self-kd", "Aslam et al., ECML-PKDD 2025",
          "stochastic self-distillation beats deterministic self-distillation", "ssd@self", "self-kd@self"),
    Claim("online-kd", "Jin et al., ICCV 2019 (route-constrained)",
          "distilling the teacher's checkpoints early to late beats distilling the final teacher",
          "online-kd@ce", "kd@ce"),
    Claim("multi-teacher", "confidence-aware multi-teacher KD",
          "KD from the MSE and CE teachers together beats KD from the CE teacher", "multi-teacher@mse+ce", "kd@ce"),
    Claim("kd-ece", "calibration: with student scaling (KD, T on both)",
          "with the dropout-regularised teacher, the KD student's ECE is below the teacher's",
          "kd@ce", "teacher:ce", "ece", -1),
    Claim("unscaled-ece", "calibration: without student scaling (T on the teacher only)",
          "with the dropout-regularised teacher, that student's ECE is below the teacher's",
          "kd-unscaled@ce", "teacher:ce", "ece", -1),
    Claim("kd-ece-overconfident", "calibration: with student scaling (KD, T on both)",
          "with an over-confident teacher, the KD student's ECE is below the teacher's",
          "kd@ce-overconfident", "teacher:ce-overconfident", "ece", -1),
    Claim("unscaled-ece-overconfident", "calibration: without student scaling (T on the teacher only)",
          "with an over-confident teacher, that student's ECE is below the teacher's",
          "kd-unscaled@ce-overconfident", "teacher:ce-overconfident", "ece", -1),
    Claim("student-scaling-ece-overconfident", "calibration: without vs with student scaling",
          "with an over-confident teacher, dropping the student's temperature gives a better-calibrated student",
          "kd-unscaled@ce-overconfident", "kd@ce-overconfident", "ece", -1),
    Claim("ttm-ece-overconfident", "calibration: TTM (Zheng & Yang, ICLR 2024), published settings",
          "with an over-confident teacher, the TTM student's ECE is below the teacher's",
          "ttm@ce-overconfident", "teacher:ce-overconfident", "ece", -1),
]


def evaluate_claims(values: Mapping[str, Mapping[str, Mapping[int, float]]],
                    claims: List[Claim] = CLAIMS) -> List[Dict]:
    """Each claim's paired difference and verdict; ``values[row key][metric][seed]`` are the per-seed results."""
    out = []
    for claim in claims:
        treatment = values.get(claim.treatment, {}).get(claim.metric)
        baseline = values.get(claim.baseline, {}).get(claim.metric)
        difference = paired_difference(treatment, baseline) if treatment and baseline else None
        out.append({"claim": claim.name, "source": claim.source, "statement": claim.statement,
                    "treatment": claim.treatment, "baseline": claim.baseline, "metric": claim.metric,
                    "direction": claim.direction, "difference": difference,
                    "verdict": verdict(difference, claim.direction)})
    return out

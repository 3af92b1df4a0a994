"""The learning-curve plot written at the end of a run."""
import matplotlib.image

from fedsim.report import plot_learning_curve

BASELINES = {"popularity": {"auc": 0.62, "auc_ci_low": 0.57, "auc_ci_high": 0.67},
             "logistic_mf": {"auc": 0.70}}  # an older run's baseline: no interval


def history(rounds, every):
    out = []
    for r in range(rounds):
        h = {"round": r, "train_samples": 100.0}
        if (r + 1) % every == 0:
            a = 0.55 + 0.02 * r
            h.update(auc=a, auc_ci_low=a - 0.05, auc_ci_high=a + 0.05)
        out.append(h)
    return out


def test_learning_curve_is_drawn_from_two_evaluations(tmp_path):
    path = plot_learning_curve(history(6, 2), BASELINES, tmp_path / "curve.png")
    assert path == tmp_path / "curve.png"
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 600 and height > 400


def test_no_learning_curve_from_one_evaluation(tmp_path):
    assert plot_learning_curve(history(3, 3), BASELINES, tmp_path / "curve.png") is None
    assert not (tmp_path / "curve.png").exists()

"""Your own data (`data.dataset: interactions`): MovieLens-100K exported to CSV reads back to the
built-in loader's samples; every schema problem is one error naming the file, the column and a row."""
from __future__ import annotations

import re

import pandas as pd
import pytest

from fedsim.cli import main
from fedsim.config import ConfigError, load_config
from fedsim.data.interactions import InteractionsError, load_interactions
from fedsim.data.movielens import load_movielens_100k
from fedsim.prepare import build_all_samples


def test_movielens_exported_to_csv_gives_the_built_in_samples(tmp_path):
    ratings, items = load_movielens_100k(log=lambda *a: None)
    ratings.sample(frac=1.0, random_state=0).to_csv(tmp_path / "log.csv", index=False)  # any row order
    items.to_csv(tmp_path / "items.csv", index=False)
    back_ratings, back_items = load_interactions(tmp_path / "log.csv", tmp_path / "items.csv")
    pd.testing.assert_frame_equal(back_items, items)
    for protocol in ("global", "tallrec"):
        built_in = build_all_samples(load_config("configs/quickstart.yaml", [f"data.protocol={protocol}"]))[0]
        mine = build_all_samples(load_config("configs/quickstart.yaml", [
            f"data.protocol={protocol}", "data.dataset=interactions", f"data.path={tmp_path / 'log.csv'}",
            f"data.items={tmp_path / 'items.csv'}"]))[0]
        pd.testing.assert_frame_equal(mine, built_in)
    # Parquet, with a 0/1 label instead of a rating: the same samples (but for the rating column).
    threshold = load_config("configs/quickstart.yaml").data.like_threshold
    labels = ratings.assign(label=(ratings["rating"] > threshold).astype(int)).drop(columns="rating")
    labels.to_parquet(tmp_path / "log.parquet")
    mine = build_all_samples(load_config("configs/quickstart.yaml", [
        "data.dataset=interactions", f"data.path={tmp_path / 'log.parquet'}", f"data.items={tmp_path / 'items.csv'}"]))[0]
    pd.testing.assert_frame_equal(mine.drop(columns="rating"), built_in.drop(columns="rating"))


LOG = "user,item,rating,timestamp\n1,10,5,100\n1,11,2,200\n2,10,4,150\n2,12,1,250\n3,11,5,300\n3,12,4,400\n"
ITEMS = "item,title\n10,Alpha\n11,Beta\n12,Gamma\n"


@pytest.mark.parametrize("log, items, message", [
    (LOG.replace("rating", "score"), ITEMS, r"log\.csv: no column 'rating' or 'label' \(columns: user, item, score, timestamp\)"),
    (LOG.replace("1,11,2,200", "1,11,two,200"), ITEMS, r"log\.csv: column 'rating', line 3: 'two' is not a number"),
    (LOG.replace("2,12,1,250", "2,10,4,150"), ITEMS,
     r"log\.csv: columns 'user', 'item', 'timestamp': line 4 and line 5 are the same interaction \(user 2, item 10, "
     r"timestamp 150\); keep one"),
    (LOG, ITEMS.replace("Beta", ""), r"items\.csv: column 'title', line 3: item 11 has no title"),
    (LOG, ITEMS.replace("12,Gamma", "11,Gamma"), r"items\.csv: column 'item', line 4: item 11 appears twice"),
    (LOG + "4,99,3,500\n4,10,3,600\n", ITEMS, r"log\.csv: column 'item', line 8: item 99 is not in data\.items"),
    (LOG + "4,10,3,500\n", ITEMS, r"log\.csv: column 'user', line 8: user 4 has one interaction"),
    (LOG.replace("3,11,5,300", "3,11,5,yesterday-ish"), ITEMS,
     r"log\.csv: column 'timestamp', line 6: 'yesterday-ish' is neither a number nor a date-time"),
    (LOG.replace("3,12,4,400", "x,12,4,400"), ITEMS, r"log\.csv: column 'user', line 7: 'x' is not an integer id"),
    (LOG, ITEMS, r"log\.csv: column 'timestamp': the test split is empty \(3 samples"),
], ids=["missing column", "non-numeric rating", "duplicate", "no title", "item twice", "unknown item",
        "one interaction", "bad timestamp", "non-integer user", "empty split"])
def test_each_schema_problem_names_the_file_the_column_and_a_row(log, items, message, tmp_path, capsys):
    (tmp_path / "log.csv").write_text(log)
    (tmp_path / "items.csv").write_text(items)
    cfg = load_config("configs/tiny.yaml", ["data.dataset=interactions", f"data.path={tmp_path / 'log.csv'}",
                                            f"data.items={tmp_path / 'items.csv'}"])
    with pytest.raises(InteractionsError, match=message):
        build_all_samples(cfg, log=lambda *a: None)
    # Through the CLI: the same, as one line, before Ray, with no run directory left.
    assert main(["run", "configs/tiny.yaml", "--set", "data.dataset=interactions", "--set", f"data.path={tmp_path / 'log.csv'}",
                 "--set", f"data.items={tmp_path / 'items.csv'}", "--set", f"output_dir={tmp_path / 'runs'}",
                 "--set", "tracking.enabled=false"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("fedsim: error:")]
    assert len(err) == 1 and re.search(message, err[0])
    assert not any((tmp_path / "runs").glob("*"))


def test_the_config_names_missing_files():
    with pytest.raises(ConfigError, match=r"data\.path: None is needed by data\.dataset 'interactions'"):
        load_config("configs/tiny.yaml", ["data.dataset=interactions"])
    with pytest.raises(ConfigError, match=r"data\.items: '/no/items\.csv' does not exist"):
        load_config("configs/tiny.yaml", ["data.dataset=interactions", "data.path=configs/tiny.yaml",
                                          "data.items=/no/items.csv"])

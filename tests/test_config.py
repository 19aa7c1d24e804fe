"""Config rules a user meets before anything runs."""

import pytest

from orchestrator.config import ConfigError, load_config


def test_elastic_range_must_keep_the_global_batch_evenly_shared():
    cfg = load_config(None, ["scaling.num_workers=[1, 2]", "optim.batch_size=4"])
    assert cfg.scaling.elastic and (cfg.scaling.min_workers, cfg.scaling.max_workers) == (1, 2)
    assert not load_config(None, ["scaling.num_workers=2"]).scaling.elastic
    # 8 images over 3 workers would change the batch statistic InfoSAM is computed on.
    with pytest.raises(ConfigError, match=r"not over \[3\]"):
        load_config(None, ["scaling.num_workers=[2, 4]", "optim.batch_size=8"])
    for bad in ("[2, 1]", "[0, 2]", "[1, 2, 3]"):
        with pytest.raises(ConfigError, match=r"\[min, max\]"):
            load_config(None, [f"scaling.num_workers={bad}"])

"""Every shipped recipe in ``recipes/`` parses into registered configs and round-trips through JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

import slimlm.distill.config  # noqa: F401  (registers its configs)
import slimlm.lowrank  # noqa: F401
import slimlm.quant  # noqa: F401
import slimlm.sparsity  # noqa: F401
import slimlm.sparsity.structured  # noqa: F401
import slimlm.train.config  # noqa: F401
from slimlm.utils.config import BaseConfig, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_exist() -> None:
    assert len(RECIPES) >= 10


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_parses_and_round_trips(path: Path) -> None:
    for entry in load_recipe(path):
        cfg = BaseConfig.load_any(entry)
        assert BaseConfig.load_any(cfg.to_dict()) == cfg
